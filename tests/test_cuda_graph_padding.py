"""The CUDA-graph decode path, run eagerly on CPU: padding a decode batch to its batch and
block-table-width buckets must change neither the logits nor any real KV block; padded rows
may write only to the scratch block past the block manager's blocks."""
import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.cuda_graphs import DecodeGraphRunner, bucket_for, buckets
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.models.loader import read_hf_config
from engine_drive import drive_with_logits

transformers = pytest.importorskip("transformers")

MAX_LEN, BLOCK, MAX_SEQS = 128, 4, 8


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=MAX_LEN, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def run(model_dir, mode: str, device: str = "cpu"):
    """Greedy-decode five prompts that finish at different steps (batch 5, 4, 3, 2, 1).
    mode: "unpadded" (the existing path), "padded" (the graph path run eagerly) or "graph"
    (what ModelRunner sets up on CUDA). Returns the runner, per-sequence sampled logits and
    tokens, and the decode batch sizes that went through the padded path."""
    cfg = EngineConfig(model=model_dir, device=device, dtype="float32", block_size=BLOCK,
                       kv_cache_memory=1 << 20, max_num_seqs=MAX_SEQS, enforce_eager=mode == "unpadded")
    runner = ModelRunner(cfg, model_dir, read_hf_config(model_dir), MAX_LEN)
    padded_batches = []
    if mode == "padded":
        runner.decode_graphs = DecodeGraphRunner(runner.model, runner.kv_cache, BLOCK, MAX_SEQS, MAX_LEN,
                                                 runner.scratch_block, capture=False)
    assert (runner.decode_graphs is None) == (mode == "unpadded")
    if runner.decode_graphs is not None:
        graphs = runner.decode_graphs
        real_forward = graphs.forward
        graphs.forward = lambda ids, *a: padded_batches.append(len(ids)) or real_forward(ids, *a)
    sched = Scheduler(SchedulerConfig(max_num_seqs=MAX_SEQS, max_model_len=MAX_LEN),
                      BlockManager(runner.num_blocks, BLOCK))
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(str(i), torch.randint(0, 256, (n,), generator=g).tolist(),
                     SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
            for i, (n, steps) in enumerate([(3, 12), (9, 4), (14, 9), (6, 3), (2, 7)])]
    logits = drive_with_logits(runner, sched, seqs)
    logits = {rid: [row.cpu() for row in rows] for rid, rows in logits.items()}
    return runner, logits, {s.request_id: s.output_token_ids for s in seqs}, padded_batches


def check_same_decode(ref, got):
    """got (a padded run) decodes as ref (an unpadded one) and leaves the same real KV blocks;
    its padded rows wrote only to the scratch block."""
    (ref_runner, ref_logits, ref_tokens, _), (runner, logits, tokens, batches) = ref, got
    # the padded path ran, including batch sizes that are not buckets (so rows were padded)
    assert batches and {3, 5} <= set(batches), batches
    assert tokens == ref_tokens
    for rid in ref_logits:
        assert len(logits[rid]) == len(ref_logits[rid])
        for a, b in zip(logits[rid], ref_logits[rid]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n = runner.num_blocks
    assert runner.kv_cache.shape[2] == n + 1 and runner.scratch_block == n
    # every real block holds what an unpadded run wrote there (a padded row's K/V written into
    # a real block would differ by far more than the tolerance)
    torch.testing.assert_close(runner.kv_cache[:, :, :n].cpu(), ref_runner.kv_cache[:, :, :n].cpu(),
                               rtol=1e-5, atol=1e-5)
    # padded rows did write, and only into the scratch block; the unpadded run never did
    assert runner.kv_cache[:, :, n].abs().sum() > 0
    assert ref_runner.kv_cache[:, :, n].abs().sum() == 0


def test_buckets_cover_every_size():
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets(1) == [1]
    for limit in (1, 5, 48, 64):
        sizes = buckets(limit)
        assert all(n <= bucket_for(n, sizes) <= limit for n in range(1, limit + 1))


def test_padded_decode_matches_unpadded_and_only_touches_scratch(tiny_llama):
    check_same_decode(run(tiny_llama, "unpadded"), run(tiny_llama, "padded"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager(tiny_llama):
    ref = run(tiny_llama, "unpadded", "cuda")
    got = run(tiny_llama, "graph", "cuda")
    assert got[0].decode_graphs.graphs  # graphs were captured and replayed
    check_same_decode(ref, got)


def test_prefill_steps_and_oversized_batches_stay_eager(tiny_llama):
    """Steps with a prefill and batches beyond the largest bucket take the existing path."""
    cfg = EngineConfig(model=tiny_llama, device="cpu", dtype="float32", block_size=BLOCK,
                       kv_cache_memory=1 << 20, max_num_seqs=MAX_SEQS)
    runner = ModelRunner(cfg, tiny_llama, read_hf_config(tiny_llama), MAX_LEN)
    graphs = DecodeGraphRunner(runner.model, runner.kv_cache, BLOCK, 2, MAX_LEN, runner.scratch_block,
                               capture=False)
    assert graphs.fits([[0]] * 2, [1, 5]) and not graphs.fits([[0]] * 3, [1, 1, 1])
    assert not graphs.fits([[0]], [MAX_LEN + 1])
    calls = []
    real_forward = graphs.forward
    graphs.forward = lambda *a: calls.append(1) or real_forward(*a)
    runner.decode_graphs = graphs
    sched = Scheduler(SchedulerConfig(max_num_seqs=MAX_SEQS, max_model_len=MAX_LEN),
                      BlockManager(runner.num_blocks, BLOCK))
    for i in range(3):
        sched.add(Sequence(str(i), [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=3)))
    out = sched.schedule()  # three prefills
    sched.update(out, runner.execute(out, lambda s: ())[0])
    out = sched.schedule()  # three decodes: more than the largest bucket (2)
    assert all(n == 1 for n in out.num_new_tokens) and len(out.seqs) == 3
    sched.update(out, runner.execute(out, lambda s: ())[0])
    assert calls == []
