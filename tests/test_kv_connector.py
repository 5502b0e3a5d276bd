"""KVConnector in one process: a prefill engine and a decode engine, each with its step loop
and connector, talking over the real KV server on loopback. Covers what is awkward to
provoke across processes: a decode request aborted while its pull is still writing."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pdserve.config import KVTransferConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import SamplingParams
from pdserve.kv.connector import KVConnector
from pdserve.kv.params import RemotePrefill

pytestmark = pytest.mark.slow
PROMPT = "Blocks being written by a pull must not be handed to anyone else. " * 3


@pytest.fixture(scope="module")
def pair(default_model_dir):
    made = []

    def make(role):
        eng = LLMEngine(model=default_model_dir, kv_cache_memory="24MiB", max_model_len=256, role=role)
        ae = AsyncEngine(eng).start()
        conn = KVConnector(ae, KVTransferConfig(kv_transport="tcp"))
        made.append((ae, conn))
        return eng, ae, conn
    try:
        yield make("prefill"), make("decode")
    finally:
        for ae, conn in made:
            conn.close()
            ae.shutdown()


async def _run(ae, prompt, params, rid, **kw):
    outs = []
    async for out in ae.generate(prompt, params, rid, **kw):
        outs.append(out)
    return outs


def _wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_abort_during_pull_keeps_blocks_pinned_until_the_pull_ends(pair):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn) = pair
    outs = asyncio.run(_run(p_ae, PROMPT, SamplingParams(max_tokens=1, temperature=0), "p1", remote_decode=True))
    kvp = p_conn.export("p1", outs[-1].outputs[0].token_ids[0], outs[-1].prompt_token_ids)
    rp = RemotePrefill.from_params(kvp)

    gate = threading.Event()
    real_authorize = p_conn.authorize
    p_conn.authorize = lambda *a: (gate.wait(20), real_authorize(*a))[1]   # hold the pull at the producer

    async def decode_then_abort():
        d_conn.expect("d1", rp)
        task = asyncio.create_task(_run(d_ae, {"prompt_token_ids": rp.prompt_token_ids},
                                        SamplingParams(max_tokens=5, temperature=0), "d1",
                                        remote_first_token=rp.first_token_id))
        await asyncio.to_thread(_wait, lambda: d_eng.block_manager.num_used_blocks > 0)
        task.cancel()   # the client leaves while the pull is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(decode_then_abort())
    _wait(lambda: "d1" not in d_eng.states and not d_eng.scheduler.loading)   # the abort went through
    pinned = d_eng.block_manager.num_used_blocks
    assert pinned == len(rp.block_ids)          # ... but the pull's destination blocks stay taken
    gate.set()                                  # let the pull finish
    _wait(lambda: d_eng.block_manager.num_used_blocks == 0)
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)   # and the producer released its hold
    p_conn.authorize = real_authorize


def test_one_pull_per_grant_and_tokens_checked(pair):
    (p_eng, p_ae, p_conn), _ = pair
    outs = asyncio.run(_run(p_ae, "Only one decode worker may read these blocks.",
                            SamplingParams(max_tokens=1, temperature=0), "p2", remote_decode=True))
    kvp = p_conn.export("p2", outs[-1].outputs[0].token_ids[0], outs[-1].prompt_token_ids)
    ids = kvp["remote_block_ids"]
    assert "under this token" in p_conn.authorize("p2", "wrong-token", ids)
    assert "not the ones held" in p_conn.authorize("p2", kvp["kv_token"], ids + [max(ids) + 1])
    assert p_conn.authorize("p2", kvp["kv_token"], ids) is None
    assert "already being pulled" in p_conn.authorize("p2", kvp["kv_token"], ids)
    assert not p_conn.done("p2", "wrong-token")
    assert p_conn.done("p2", kvp["kv_token"])
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)
    assert not p_conn.done("p2", kvp["kv_token"])   # spent


def test_export_and_authorize_do_not_wait_for_the_step_in_flight(pair):
    """A prefill worker busy with a long step still hands out the first token's KV params and
    lets the decode worker start pulling at once (no wait for the step boundary)."""
    (p_eng, p_ae, p_conn), _ = pair
    outs = asyncio.run(_run(p_ae, "Hand me the blocks while you compute something else.",
                            SamplingParams(max_tokens=1, temperature=0), "p3", remote_decode=True))
    in_step, release = threading.Event(), threading.Event()
    p_ae.step_hooks.append(lambda: (in_step.set(), release.wait(20)))   # the next step lasts until released
    try:
        async def busy():   # another prompt keeps the loop stepping
            return await _run(p_ae, "another prompt", SamplingParams(max_tokens=1, temperature=0), "busy",
                              remote_decode=True)
        t = threading.Thread(target=lambda: asyncio.run(busy()))
        t.start()
        assert in_step.wait(20)
        t0 = time.monotonic()
        kvp = p_conn.export("p3", outs[-1].outputs[0].token_ids[0], outs[-1].prompt_token_ids)
        assert p_conn.authorize("p3", kvp["kv_token"], kvp["remote_block_ids"]) is None
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        p_ae.step_hooks.clear()
        t.join(20)
    assert p_conn.done("p3", kvp["kv_token"])
    p_ae.abort("busy")
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)


def test_abort_clock_spares_blocks_being_pulled_and_frees_the_rest(pair):
    (p_eng, p_ae, p_conn), _ = pair
    params = SamplingParams(max_tokens=1, temperature=0)
    kvps = {}
    for rid in ("p4", "p5"):
        outs = asyncio.run(_run(p_ae, f"Request {rid} waits for a decode worker.", params, rid, remote_decode=True))
        kvps[rid] = p_conn.export(rid, outs[-1].outputs[0].token_ids[0], outs[-1].prompt_token_ids)
    assert p_conn.authorize("p4", kvps["p4"]["kv_token"], kvps["p4"]["remote_block_ids"]) is None   # p4 is being read
    held4 = len(kvps["p4"]["remote_block_ids"])
    p_eng.config.kv_lease_duration = 0.0        # both leases run out at the next step
    try:
        asyncio.run(_run(p_ae, "tick", params, "tick", remote_decode=True))
    finally:
        p_eng.config.kv_lease_duration = 30.0
    p_ae.abort("tick")
    _wait(lambda: list(p_eng.scheduler.held) == ["p4"])
    assert p_eng.block_manager.num_used_blocks == held4
    # p5's grant went with its blocks: no pull can start on freed memory
    assert "under this token" in p_conn.authorize("p5", kvps["p5"]["kv_token"], kvps["p5"]["remote_block_ids"])
    assert p_conn.done("p4", kvps["p4"]["kv_token"])
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)


def test_aborting_a_held_request_spends_its_grant(pair):
    (p_eng, p_ae, p_conn), _ = pair
    outs = asyncio.run(_run(p_ae, "Nobody will pull this one.", SamplingParams(max_tokens=1, temperature=0), "p6",
                            remote_decode=True))
    kvp = p_conn.export("p6", outs[-1].outputs[0].token_ids[0], outs[-1].prompt_token_ids)
    p_ae.abort("p6")
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)
    assert "under this token" in p_conn.authorize("p6", kvp["kv_token"], kvp["remote_block_ids"])
