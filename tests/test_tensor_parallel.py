"""Tensor parallelism: the sharding rules, and TP=2 / TP=4 logits equal TP=1's for tiny random
Llama, Qwen2 and Qwen3 models through prefill, chunked prefill and decode across block
boundaries. The test process is rank 0 (as a worker's engine process is); ranks 1..N-1 are
real child processes in one gloo group."""
import os

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.tp_ranks import Ranks, split_cores
from pdserve.models.loader import read_hf_config
from pdserve.models.shape import ModelShape
from pdserve.models.tensor_parallel import TPLayout, check_divisible
from engine_drive import drive_with_logits
from tiny_model import save_random_family

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=128)
FAMILIES = {   # kv heads 4: split over 2 and 4 ranks; 2: replicated on 4 ranks
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)),
}
PROMPTS_LEN = (9, 3, 14)
DECODE_STEPS = 6


def shape(heads=9, kv=3, inter=1536, hd=64):
    return ModelShape(name="m", num_layers=2, hidden_size=heads * hd, intermediate_size=inter, num_heads=heads,
                      num_kv_heads=kv, head_dim=hd, vocab_size=100)


def test_layout_splits_heads_and_replicates_kv_heads_past_their_count():
    cfg = shape(heads=8, kv=2, inter=64, hd=4)
    assert [TPLayout.of(cfg, 2, r).kv_heads for r in range(2)] == [range(0, 1), range(1, 2)]
    assert [TPLayout.of(cfg, 4, r).kv_heads for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    lay = TPLayout.of(cfg, 4, 3)
    w = torch.arange(32 * 8).view(32, 8)   # q_proj: 8 heads x 4 rows
    assert torch.equal(lay.shard("model.layers.0.self_attn.q_proj.weight", w), w[24:32])
    kv = torch.arange(8 * 8).view(8, 8)    # k_proj: 2 heads x 4 rows; rank 3 holds head 1
    assert torch.equal(lay.shard("model.layers.0.self_attn.k_proj.weight", kv), kv[4:8])
    o = torch.arange(8 * 32).view(8, 32)
    assert torch.equal(lay.shard("model.layers.0.self_attn.o_proj.weight", o), o[:, 24:32])
    down = torch.arange(8 * 64).view(8, 64)
    assert torch.equal(lay.shard("model.layers.0.mlp.down_proj.weight", down), down[:, 48:64])
    bias = torch.ones(8)
    assert torch.equal(lay.shard("model.layers.0.mlp.down_proj.bias", bias), torch.zeros(8))   # rank 0 adds it
    norm = torch.ones(32)
    assert lay.shard("model.norm.weight", norm) is norm


def test_heads_that_do_not_divide_are_refused_by_name():
    check_divisible(shape(), 3)   # the default model: 9 heads, 3 KV heads, 1536
    with pytest.raises(ValueError, match="9 attention heads"):
        check_divisible(shape(), 2)
    with pytest.raises(ValueError, match="3 KV heads"):
        check_divisible(shape(heads=12, kv=3, inter=1536), 4)
    with pytest.raises(ValueError, match="at least 1|>= 1"):
        check_divisible(shape(), 0)


def test_split_cores_gives_each_rank_its_own_share():
    assert split_cores([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores([0, 1], 4) == [None] * 4   # fewer cores than ranks: shared


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    cfg_cls, model_cls, extra = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    save_random_family(cfg_cls, model_cls, {**COMMON, **extra}, d)
    return str(d)


def drive(runner, budget: int) -> dict:
    """Logits of every sampled token, driving the real scheduler (this process is rank 0)."""
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=budget),
                      BlockManager(runner.num_blocks, 4))
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(str(i), torch.randint(0, 256, (n,), generator=g).tolist(),
                     SamplingParams(temperature=0, max_tokens=DECODE_STEPS, ignore_eos=True))
            for i, n in enumerate(PROMPTS_LEN)]
    logits = drive_with_logits(runner, sched, seqs)
    return {s.request_id: (s.output_token_ids, torch.stack(logits[s.request_id])) for s in seqs}


BUDGETS = (256, 8)   # the whole prompt in one step; chunked prefill beside decodes


def run(model_dir, tp: int) -> dict:
    """budget -> drive()'s result, with tp ranks (child processes for ranks 1..tp-1)."""
    cfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", block_size=4, kv_cache_memory=1 << 22,
                       tensor_parallel_size=tp)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    ranks = Ranks(cfg, model_dir, 128) if tp > 1 else None
    try:
        runner = ModelRunner(cfg, model_dir, read_hf_config(model_dir), 128, tp=ranks.group if ranks else None)
        assert runner.kv_shape[4] == max(1, runner.model_config.num_kv_heads // tp)   # its own heads only
        return {b: drive(runner, b) for b in BUDGETS}
    finally:
        if ranks:
            procs = list(ranks.procs)
            ranks.stop()
            assert procs and all(p.poll() is not None for p in procs)   # no rank left behind
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny):
    return run(tiny, 1)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_logits_equal_tp1(tiny, reference, tp):
    got = run(tiny, tp)
    for budget in BUDGETS:
        for rid, (tokens, logits) in reference[budget].items():
            g_tokens, g_logits = got[budget][rid]
            assert g_tokens == tokens, f"budget {budget}, request {rid}"   # greedy: the same tokens
            assert torch.allclose(g_logits, logits, atol=1e-4, rtol=1e-4), \
                f"budget {budget}, request {rid}: worst {float((g_logits - logits).abs().max()):.2e}"
