"""Prefill and decode roles in one process: P computes the KV, its blocks are copied into the
blocks D allocated, D continues. The tokens must equal a colocated run's; nothing may leak."""
import asyncio

import pytest
import torch

from pdserve import SamplingParams
from pdserve.config import EngineConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.errors import RequestError

pytestmark = pytest.mark.slow  # loads the default model


def engine(model_dir, role, **kw):
    return LLMEngine(EngineConfig(model=model_dir, role=role, kv_cache_memory="192MiB", **kw))


@pytest.fixture(scope="module")
def engines(default_model_dir):
    return engine(default_model_dir, "prefill"), engine(default_model_dir, "decode"), engine(default_model_dir, "both")


def run_to_end(eng, rid):
    final = None
    for _ in range(1000):
        for o in eng.step():
            if o.request_id == rid and o.finished:
                final = o
        if final:
            return final
    raise AssertionError("request did not finish")


def disaggregated(p, d, prompt, params, rid="r", copy=True):
    p.add_request(prompt, SamplingParams(**{**params.__dict__, "max_tokens": 1}), rid, remote_decode=True)
    first = run_to_end(p, rid)
    assert first.outputs[0].finish_reason == "length" and rid in p.scheduler.held
    tok = first.outputs[0].token_ids[0]
    held = p.scheduler.held[rid][0]
    d.add_request(prompt, params, rid, remote_first_token=tok)
    d.step()
    (seq,) = d.pending_kv_loads
    d.pending_kv_loads.clear()
    skip = seq.num_cached_tokens // d.config.block_size
    if copy:
        src = torch.tensor(held.block_table[skip:])
        dst = torch.tensor(seq.block_table[skip:])
        d.runner.kv_cache[:, :, dst] = p.runner.kv_cache[:, :, src]
    d.finish_kv_load(rid, ok=copy)
    p.release(rid)
    out = run_to_end(d, rid)
    return out, skip


PROMPT = "Explain in detail why the sky is blue, and what Rayleigh scattering means for sunsets."


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=42, max_tokens=20, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_handoff_equals_colocated(engines, params):
    p, d, both = engines
    both.add_request(PROMPT, params, "ref")
    ref = run_to_end(both, "ref").outputs[0]
    out, _ = disaggregated(p, d, PROMPT, params, rid=f"x-{params.seed}")
    assert out.outputs[0].token_ids == ref.token_ids
    assert out.outputs[0].text == ref.text
    for e in engines:
        assert e.block_manager.num_used_blocks == 0, e.config.role


def test_failed_load_recomputes_same_tokens(engines):
    p, d, both = engines
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    both.add_request(PROMPT + " Twice.", params, "ref2")
    ref = run_to_end(both, "ref2").outputs[0].token_ids
    out, _ = disaggregated(p, d, PROMPT + " Twice.", params, rid="fail", copy=False)
    assert out.outputs[0].token_ids == ref
    assert d.block_manager.num_used_blocks == 0


def test_warm_decode_prefix_cache_skips_blocks(engines):
    p, d, _ = engines
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    long = "You are a careful assistant. " * 12
    _, skip_cold = disaggregated(p, d, long + "First question?", params, rid="cold")
    _, skip_warm = disaggregated(p, d, long + "Second question?", params, rid="warm")
    assert skip_cold == 0 and skip_warm >= 3


def test_role_mismatch_is_refused(engines):
    p, d, _ = engines
    with pytest.raises(RequestError, match="role decode"):
        d.add_request("hi", SamplingParams(), "m1", remote_decode=True)
    with pytest.raises(RequestError, match="role prefill"):
        p.add_request("hi", SamplingParams(), "m2", remote_first_token=5)


def test_held_blocks_expire(default_model_dir):
    p = engine(default_model_dir, "prefill", kv_lease_duration=0.2)
    now = [1000.0]
    p.clock = lambda: now[0]   # an injected clock: the lease runs out exactly when the test says
    p.add_request(PROMPT, SamplingParams(max_tokens=1), "h")
    run_to_end(p, "h")
    assert p.block_manager.num_used_blocks > 0
    now[0] += 0.19
    p.step()
    assert p.block_manager.num_used_blocks > 0 and "h" in p.scheduler.held   # still inside its lease
    now[0] += 0.02
    p.step()
    assert p.block_manager.num_used_blocks == 0 and not p.scheduler.held


def test_async_engine_streams_and_abort_frees(engines):
    both = engines[2]
    ae = AsyncEngine(both).start()

    async def main():
        deltas = []
        async for o in ae.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), "s1"):
            deltas.append(o.outputs[0].new_text)
        stream = ae.generate(PROMPT, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), "s2")
        async for o in stream:
            if len(o.outputs[0].token_ids) >= 3:
                break  # a client that goes away
        await stream.aclose()
        with pytest.raises(RequestError):
            async for _ in ae.generate("", SamplingParams(), "bad"):
                pass
        for _ in range(100):
            await asyncio.sleep(0.02)
            if both.block_manager.num_used_blocks == 0 and not both.has_unfinished():
                break
        return deltas

    try:
        deltas = asyncio.run(main())
    finally:
        ae.shutdown()
    assert len(deltas) == 16 and "".join(deltas).strip()
    assert both.block_manager.num_used_blocks == 0 and not both.has_unfinished()


def test_forks_of_a_parent_that_computes_its_prompt_here_do_not_wait_for_a_load(engines):
    """Forks (n > 1) of a remote prefill wait for the parent's KV; when the scheduler's KV source
    says the parent computes its prompt here instead (None), no load ever ends: they go at once."""
    _, d, _ = engines
    rule = d.scheduler.get_num_new_matched_tokens
    d.scheduler.get_num_new_matched_tokens = lambda seq, n: None
    try:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        parent, _ = d.make_sequence(PROMPT, params, "fp", remote_first_token=7)
        fork, _ = d.make_sequence(PROMPT, params, "fp-1")
        fork.wait_for = "fp"
        d.add_sequence(parent)
        d.add_sequence(fork)
        assert run_to_end(d, "fp-1").outputs[0].token_ids and not d.pending_kv_loads
    finally:
        d.scheduler.get_num_new_matched_tokens = rule
        d.pending_kv_loads.clear()
    run_to_end_all(d)


def run_to_end_all(eng):
    for _ in range(1000):
        if not eng.has_unfinished():
            return
        eng.step()
    raise AssertionError("requests did not finish")
