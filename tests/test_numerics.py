"""Logits of pdserve's decoder against transformers' for tiny random Llama, Qwen2 and Qwen3 models,
for a batched prefill and for decode steps that cross block boundaries."""
import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.models.loader import read_hf_config
from engine_drive import drive_with_logits
from tiny_model import save_random_family

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama31": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    cfg_cls, model_cls, extra = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = save_random_family(cfg_cls, model_cls, {**COMMON, **extra}, d)
    return request.param, hf, str(d)


def run_pdserve(model_dir, prompts, decode_steps, block_size=4, budget=256):
    """Drive the real scheduler + model runner; return per-sequence logits of every sampled token."""
    cfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", block_size=block_size,
                       kv_cache_memory=1 << 22, max_num_batched_tokens=budget)
    runner = ModelRunner(cfg, model_dir, read_hf_config(model_dir), 128)
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=budget),
                      BlockManager(runner.num_blocks, block_size))
    seqs = [Sequence(str(i), p, SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True))
            for i, p in enumerate(prompts)]
    logits = drive_with_logits(runner, sched, seqs)
    return seqs, logits


@torch.inference_mode()
def hf_logits(hf, tokens):
    return hf(torch.tensor([tokens])).logits[0].float()


def test_prefill_and_decode_logits_match_transformers(tiny):
    name, hf, d = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 13, 2)]
    seqs, logits = run_pdserve(d, prompts, decode_steps=6)  # 13 + 6 tokens crosses 4 block boundaries
    for s in seqs:
        ref = hf_logits(hf, s.token_ids[:-1])
        n_prompt = s.num_prompt_tokens
        assert len(logits[s.request_id]) == 7
        for step, got in enumerate(logits[s.request_id]):
            want = ref[n_prompt - 1 + step]
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3,
                                       msg=lambda m: f"{name} seq {s.request_id} step {step}: {m}")
        # greedy choices follow from the same logits
        assert s.output_token_ids == [int(ref[n_prompt - 1 + k].argmax()) for k in range(7)]


def test_decode_groups_of_mixed_lengths_match(tiny, monkeypatch):
    """Rows of very different contexts decode in several padded groups, reordered by length;
    every row's logits must still be its own. (The torch backend's groups: the CPU kernel, which
    pads nothing, attends all rows in one call, so it is kept out here.)"""
    import pdserve.engine.model_runner as mr
    monkeypatch.setattr(mr, "paged_decode_op", lambda: None)
    planned, real = [], mr.plan_decode_groups
    monkeypatch.setattr(mr, "plan_decode_groups", lambda w, c: planned.append(real(w, c)) or planned[-1])
    name, hf, d = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (90, 3, 60, 5, 4)]
    seqs, logits = run_pdserve(d, prompts, decode_steps=4)
    assert any(len(p) > 1 for p in planned), planned
    for s in seqs:
        ref = hf_logits(hf, s.token_ids[:-1])
        for step, got in enumerate(logits[s.request_id]):
            torch.testing.assert_close(got, ref[s.num_prompt_tokens - 1 + step], atol=2e-4, rtol=1e-3,
                                       msg=lambda m: f"{name} seq {s.request_id} step {step}: {m}")


def test_chunked_prefill_logits_match(tiny):
    name, hf, d = tiny
    prompt = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    seqs, logits = run_pdserve(d, [prompt], decode_steps=2, budget=8)  # 4 prefill chunks
    ref = hf_logits(hf, seqs[0].token_ids[:-1])
    for step, got in enumerate(logits["0"]):
        torch.testing.assert_close(got, ref[29 + step], atol=2e-4, rtol=1e-3)


def test_rope_scaling_is_applied(tiny):
    name, hf, d = tiny
    if name != "llama31":
        pytest.skip("only the llama3 config has rope scaling")
    from pdserve.models.decoder import ModelConfig
    mc = ModelConfig.from_hf(read_hf_config(d))
    assert mc.rope_scaling and mc.rope_scaling.get("rope_type") == "llama3"
