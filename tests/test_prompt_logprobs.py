"""Prompt logprobs of the default model against transformers' log-softmax, through chunked
prefill and a warm prefix cache; and greedy decoding with penalties and logit_bias against a
reference loop: transformers' logits, vLLM's formulas (test_logits_controls.reference), argmax."""
import pytest
import torch

from pdserve import SamplingParams
from pdserve.llm import LLM
from test_logits_controls import reference

pytestmark = pytest.mark.slow

PROMPT = ("Paged attention keeps the KV cache in fixed-size blocks, so a serving engine can pack many "
          "requests into one batch. The quick brown fox jumps over the lazy dog, twice.")


@pytest.fixture(scope="module")
def hf(default_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_logits(hf, ids):
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def llm(default_model_dir):
    # 16-token chunks: the prompt's logprobs come from several prefill steps
    return LLM(default_model_dir, kv_cache_memory="128MiB", dtype="float32", device="cpu",
               max_num_batched_tokens=16, enable_prefix_caching=True)


def test_prompt_logprobs_equal_transformers(llm, hf):
    ids = llm.tokenizer.encode(PROMPT)
    assert len(ids) > 32
    ref = torch.log_softmax(hf_logits(hf, ids), -1)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for attempt in range(2):   # the second time the prompt is in the prefix cache
        out = llm.generate(PROMPT, params, use_tqdm=False)[0]
        plp = out.prompt_logprobs
        assert len(plp) == len(ids) and plp[0] is None
        for i in range(1, len(ids)):
            want = ref[i - 1]
            assert plp[i].token_id == ids[i]
            assert abs(plp[i].logprob - want[ids[i]].item()) < 1e-3, (attempt, i)
            assert plp[i].rank == int((want > want[ids[i]]).sum()) + 1
            top_ids = want.topk(3).indices.tolist()
            assert [t for t, _ in plp[i].top] == top_ids
            assert all(abs(v - want[t].item()) < 1e-3 for t, v in plp[i].top)
        assert len(out.outputs[0].token_ids) == 2


def test_max_tokens_zero_scores_only(llm, hf):
    ids = llm.tokenizer.encode("The capital of France is Paris.")
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    ref = torch.log_softmax(hf_logits(hf, ids), -1)
    total = sum(out.prompt_logprobs[i].logprob for i in range(1, len(ids)))
    assert abs(total - sum(ref[i - 1, ids[i]].item() for i in range(1, len(ids)))) < 1e-3
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.4),
    dict(frequency_penalty=1.5, presence_penalty=1.0),
    dict(logit_bias={29: 4.0, 28: -5.0}, repetition_penalty=1.2),
])
def test_penalised_greedy_equals_reference_loop(llm, hf, kw):
    prompt = "Say ha ten times: ha ha ha"   # a prompt that invites repeats: the penalties must act
    ids = llm.tokenizer.encode(prompt)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw)
    got = llm.generate({"prompt_token_ids": ids}, p, use_tqdm=False)[0].outputs[0].token_ids
    out = []
    for _ in range(16):
        logits = hf_logits(hf, ids + out)[-1].tolist()
        x = reference(logits, p, ids, out)
        out.append(max(range(len(x)), key=x.__getitem__))
    plain = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert got == out
    assert got != plain, "the controls changed nothing: the test cannot tell"
