"""AsyncEngine outputs must not change after delivery: a slow stream consumer (an SSE client
on a busy event loop) reads them after the engine has run further steps."""
from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import SamplingParams

pytestmark = pytest.mark.slow


def test_slow_consumer_sees_each_step_as_it_was(default_model_dir):
    engine = LLMEngine(model=default_model_dir, kv_cache_memory="32MiB", max_model_len=256)
    ae = AsyncEngine(engine).start()

    async def consume():
        outs = []
        async for out in ae.generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0,
                                                                        ignore_eos=True)):
            outs.append(out)
            await asyncio.sleep(0.05)   # let the engine run ahead of us
        return outs
    try:
        outs = asyncio.run(consume())
    finally:
        ae.shutdown()
    final = outs[-1].outputs[0]
    assert len(final.token_ids) == 12
    assert "".join(o.outputs[0].new_text for o in outs) == final.text
    assert sum((o.outputs[0].new_token_ids for o in outs), []) == final.token_ids
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 13))
