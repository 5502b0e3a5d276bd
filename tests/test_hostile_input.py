"""Hostile requests against one engine (issue 11, findings 1 and 8): every parameter is
validated against the model before it reaches the engine, a step that fails anyway fails only
its own requests, and a loop that dies says so to whoever supervises it. A tiny random model
(tests/tiny_model.py) with the default model's tokenizer: behaviour, not text, is checked."""
from __future__ import annotations

import asyncio
import math

import pytest

from pdserve.engine.async_engine import AsyncEngine, EngineDeadError
from pdserve.engine.engine import LLMEngine
from pdserve.errors import RequestError
from pdserve.engine.request import SamplingParams, Sequence
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow  # the default model's tokenizer

MAX_LEN = 256


@pytest.fixture(scope="module")
def engine(default_model_dir, tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("tiny"), default_model_dir)
    return LLMEngine(model=d, device="cpu", dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=8 << 20,
                     block_size=16)


def refused(engine, prompt="hi", param=None, **kw) -> RequestError:
    with pytest.raises(ValueError) as e:
        engine.make_sequence(prompt, SamplingParams(**kw))
    assert getattr(e.value, "param", None) == param, e.value
    return e.value


def test_token_ids_out_of_range_are_refused(engine):
    vocab = engine.runner.model_config.vocab_size
    refused(engine, param="stop_token_ids", max_tokens=4, min_tokens=1, stop_token_ids=[1_000_000_000])
    refused(engine, param="stop_token_ids", max_tokens=4, min_tokens=1, stop_token_ids=[vocab])
    refused(engine, param="stop_token_ids", max_tokens=4, stop_token_ids=[-1])
    refused(engine, [5, vocab], param="prompt")
    refused(engine, {"prompt_token_ids": [5, "x"]}, param="prompt")
    seq, _ = engine.make_sequence("hi", SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[vocab - 1]))
    assert seq.params.stop_token_ids == [vocab - 1]


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(engine, name, value):
    refused(engine, param=name, **{name: value})


def test_lengths_are_checked_against_the_model(engine):
    refused(engine, param="min_tokens", max_tokens=None, min_tokens=10 ** 9)   # chat: no max_tokens
    refused(engine, param="max_tokens", max_tokens=MAX_LEN)
    refused(engine, "x" * (engine.max_prompt_chars + 1), param="prompt")
    refused(engine, param="stop", stop=["s"] * 1000)
    refused(engine, param="stop", stop=["s" * 100_000])
    refused(engine, "bad \ud800 text", param="prompt")
    refused(engine, param="stop", stop=["\udfff"])


def test_prompt_too_long_is_refused_before_tokenizing(engine, monkeypatch):
    calls = []
    real = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    refused(engine, "word " * engine.max_prompt_chars, param="prompt")
    assert not calls


def test_chat_messages_and_templates(engine):
    ok = engine.chat_prompt_ids([{"role": "user", "content": "hello"}])
    ref = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                               tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ok == list(ref)                      # same tokens as transformers renders them
    for msgs in ([{"role": 5, "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                 [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": 7}]):
        with pytest.raises(RequestError) as e:
            engine.chat_prompt_ids(msgs)
        assert e.value.param == "messages"
    for template in ("{{ 'ab ' * 3000000 }}", "{% for x in %}", "{{ raise_exception('no') }}",
                     "{{ (messages|first).nope.deeper }}", "{{ ''.__class__.__mro__ }}x{{ 1/0 }}"):
        with pytest.raises(RequestError) as e:
            engine.chat_prompt_ids([{"role": "user", "content": "hi"}], template)
        assert e.value.param == "chat_template", (template, e.value)


def run_async(engine, coro_fn):
    ae = AsyncEngine(engine).start()
    try:
        return asyncio.run(coro_fn(ae))
    finally:
        ae.shutdown()


async def collect(ae, seq):
    outs = []
    async for out in ae.submit(seq):
        outs.append(out)
    return outs


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine):
    """A sequence built past validation (as the finding's request was) makes the sampler index
    out of range: its step fails, its requests get an error, and the next request is served."""
    vocab = engine.runner.model_config.vocab_size

    async def go(ae):
        bad = Sequence("bad", [1, 2, 3], SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[10 ** 9]),
                       eos_token_ids=engine.eos_token_ids)
        outs = await asyncio.wait_for(collect(ae, bad), 60)
        assert outs[-1].finished and outs[-1].error and "IndexError" in outs[-1].error
        good, _ = engine.make_sequence([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        outs = await asyncio.wait_for(collect(ae, good), 60)
        assert outs[-1].finished and outs[-1].error is None and len(outs[-1].outputs[0].token_ids) == 3
        assert all(0 <= t < vocab for t in outs[-1].outputs[0].token_ids)
        assert ae.dead is None
    run_async(engine, go)
    assert engine.block_manager.num_used_blocks == 0 and not engine.states


def test_a_dead_loop_reports_to_its_supervisor(engine):
    died = []

    class Fatal(BaseException):   # not an Exception: nothing inside the loop may swallow it
        pass

    async def go(ae):
        ae.on_dead = died.append

        def hook():
            raise Fatal("boom")
        seq, _ = engine.make_sequence([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
        ae.step_hooks.append(hook)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(collect(ae, seq), 60)
    run_async(engine, go)
    assert len(died) == 1 and isinstance(died[0], Fatal)
    for rid in list(engine.states):   # the loop is gone: clean up after it by hand
        engine.abort(rid)
