"""The default model (9 heads, 3 KV heads) split over 3 ranks: greedy and seeded tokens equal
one rank's. Sums split across ranks round differently, so a token may only differ where the
reference's top two logprobs are a near-tie (within 1e-4); the test says where, never accepts
a difference silently."""
import pytest

from pdserve.engine.request import SamplingParams
from pdserve.llm import LLM

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "List three prime numbers:"]
PARAMS = {"greedy": SamplingParams(temperature=0, max_tokens=12, logprobs=2),
          "seeded": SamplingParams(temperature=0.8, seed=7, max_tokens=12, logprobs=2)}


def generate(tp: int) -> dict:
    llm = LLM(tensor_parallel_size=tp, kv_cache_memory="64MiB")
    try:
        return {k: [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)] for k, sp in PARAMS.items()}
    finally:
        if llm.engine.ranks is not None:
            llm.engine.ranks.stop()


def same_or_near_tie(ref, got) -> str | None:
    """None when got's tokens are ref's, or differ first where ref's top two were a near-tie."""
    for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
        if a != b:
            top = ref.logprobs[i].top
            gap = abs(top[0][1] - top[1][1]) if len(top) > 1 else float("inf")
            return None if gap <= 1e-4 else f"token {i}: {a} vs {b}, top-two gap {gap:.2e}"
    return None if len(ref.token_ids) == len(got.token_ids) else "lengths differ"


def test_tp3_tokens_equal_tp1_on_the_default_model():
    ref, got = generate(1), generate(3)
    for kind in PARAMS:
        for prompt, r, g in zip(PROMPTS, ref[kind], got[kind]):
            assert r.token_ids, prompt
            why = same_or_near_tie(r, g)
            assert why is None, f"{kind} {prompt!r}: {why}"
