"""KVConnector in one process: a prefill engine and a decode engine, each with its step loop
and connector, talking over the real KV server on loopback, and again over a fake transport
(tests/kv_fakes.LocalTransport: no sockets, the same calls on the producer): every test holds,
pulls, aborts and expires alike on both. Covers what is awkward to provoke across processes:
a decode request aborted while its pull is still writing."""
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
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from kv_fakes import LocalTransport

pytestmark = pytest.mark.slow
PROMPT = "Blocks being written by a pull must not be handed to anyone else. " * 3


@pytest.fixture(scope="module", params=["tcp", "fake"])
def pair(default_model_dir, request):
    made, hub = [], {}

    def make(role):
        eng = LLMEngine(model=default_model_dir, kv_cache_memory="24MiB", max_model_len=256, role=role)
        ae = AsyncEngine(eng).start()
        fake = LocalTransport(hub, BlockPool(eng.runner.kv_cache)) if request.param == "fake" else None
        conn = KVConnector(eng, KVTransferConfig(kv_transport="tcp"), wake=ae.wake, transport=fake)
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
    kvp = outs[-1].kv_transfer_params
    rp = RemotePrefill.from_params(kvp)

    gate = threading.Event()
    real_authorize = p_conn.authorize
    p_conn.authorize = lambda *a: (gate.wait(20), real_authorize(*a))[1]   # hold the pull at the producer

    async def decode_then_abort():
        task = asyncio.create_task(_run(d_ae, {"prompt_token_ids": rp.prompt_token_ids},
                                        SamplingParams(max_tokens=5, temperature=0), "d1",
                                        remote_prefill=rp))
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
    kvp = outs[-1].kv_transfer_params
    ids = kvp["remote_block_ids"]
    assert "under this token" in p_conn.authorize("p2", "wrong-token", ids)
    assert "not the ones held" in p_conn.authorize("p2", kvp["kv_token"], ids + [max(ids) + 1])
    assert p_conn.authorize("p2", kvp["kv_token"], ids) is None
    assert "already being pulled" in p_conn.authorize("p2", kvp["kv_token"], ids)
    assert not p_conn.done("p2", "wrong-token")
    assert p_conn.done("p2", kvp["kv_token"])
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)
    assert not p_conn.done("p2", kvp["kv_token"])   # spent


def test_a_pull_in_parallel_parts_claims_each_part_once_and_frees_after_the_last_read(pair):
    """A decode worker at TP=d pulls over d connections at once (part i of d of one grant)."""
    (p_eng, p_ae, p_conn), _ = pair
    outs = asyncio.run(_run(p_ae, "Two decode ranks read these blocks at once, each its own heads.",
                            SamplingParams(max_tokens=1, temperature=0), "pp", remote_decode=True))
    kvp = outs[-1].kv_transfer_params
    ids, tok = kvp["remote_block_ids"], kvp["kv_token"]
    r0, r1 = object(), object()
    assert p_conn.authorize("pp", tok, ids, r0, (0, 2)) is None
    assert "already being pulled" in p_conn.authorize("pp", tok, ids, object(), (0, 2))   # part 0 again
    assert "already being pulled" in p_conn.authorize("pp", tok, ids, object(), (0, 1))   # another split
    assert p_conn.authorize("pp", tok, ids, r1, (1, 2)) is None
    p_conn.unclaim(r0, "pp")
    assert p_conn.done("pp", tok, r0)          # part 1 still reads: the blocks stay
    assert p_conn.keep_held("pp")
    assert p_eng.block_manager.num_used_blocks > 0
    p_conn.unclaim(r1, "pp")                   # the last read ended: now they go
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)


def test_export_and_authorize_do_not_wait_for_the_step_in_flight(pair):
    """A prefill worker busy with a long step still hands out the first token's KV params and
    lets the decode worker start pulling at once (no wait for the step boundary)."""
    (p_eng, p_ae, p_conn), _ = pair
    outs = asyncio.run(_run(p_ae, "Hand me the blocks while you compute something else.",
                            SamplingParams(max_tokens=1, temperature=0), "p3", remote_decode=True))
    in_step, release, step_over = threading.Event(), threading.Event(), threading.Event()
    # the next step lasts until released (or 120 s): returning while it lasts proves no wait for it
    p_ae.step_hooks.append(lambda: (in_step.set(), release.wait(120), step_over.set()))
    try:
        async def busy():   # another prompt keeps the loop stepping
            return await _run(p_ae, "another prompt", SamplingParams(max_tokens=1, temperature=0), "busy",
                              remote_decode=True)
        t = threading.Thread(target=lambda: asyncio.run(busy()))
        t.start()
        assert in_step.wait(20)
        kvp = outs[-1].kv_transfer_params
        assert p_conn.authorize("p3", kvp["kv_token"], kvp["remote_block_ids"]) is None
        assert not step_over.is_set(), "export/authorize waited for the step in flight"
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
        kvps[rid] = outs[-1].kv_transfer_params
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
    kvp = outs[-1].kv_transfer_params
    p_ae.abort("p6")
    _wait(lambda: p_eng.block_manager.num_used_blocks == 0)
    assert "under this token" in p_conn.authorize("p6", kvp["kv_token"], kvp["remote_block_ids"])


def test_a_hand_off_decodes_what_the_decode_engine_computes_and_frees_both_sides(pair):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn) = pair
    prompt = "The decode worker continues from blocks it did not compute. " * 2
    greedy = SamplingParams(max_tokens=8, temperature=0)
    outs = asyncio.run(_run(p_ae, prompt, SamplingParams(max_tokens=1, temperature=0), "p7", remote_decode=True))
    kvp = outs[-1].kv_transfer_params
    assert kvp["do_remote_prefill"] and kvp["first_token_id"] == outs[-1].outputs[0].token_ids[0]
    assert "p7" in p_eng.scheduler.held
    rp = RemotePrefill.from_params(kvp)
    events = []
    d_conn.on_event = lambda kind, **kw: events.append((kind, kw.get("blocks")))
    try:
        got = asyncio.run(_run(d_ae, {"prompt_token_ids": rp.prompt_token_ids}, greedy, "d7", remote_prefill=rp))
    finally:
        d_conn.on_event = lambda kind, **kw: None
    assert got[-1].error is None and events == [("pulled", len(rp.block_ids))]   # pulled, not recomputed
    _wait(lambda: "p7" not in p_eng.scheduler.held and p_eng.block_manager.num_used_blocks == 0)
    assert "under this token" in p_conn.authorize("p7", rp.token, rp.block_ids)   # spent
    assert d_eng.block_manager.num_used_blocks == 0
    # reference: the decode engine computes the prompt itself, its prefix cache emptied first
    done = threading.Event()

    def forget(e):
        bm = e.block_manager
        for b in list(bm.hash_to_block.values()):
            bm.block_hash[b] = bm.block_tokens[b] = None
        bm.hash_to_block.clear()
        done.set()
    d_ae.call(forget)
    assert done.wait(20)
    ref = asyncio.run(_run(d_ae, {"prompt_token_ids": rp.prompt_token_ids}, greedy, "ref7"))
    assert got[-1].outputs[0].token_ids == ref[-1].outputs[0].token_ids


def test_a_decode_request_aborted_before_its_pull_lets_the_remote_kv_go(pair):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn) = pair
    outs = asyncio.run(_run(p_ae, "Nobody on the decode side will wait for this one.",
                            SamplingParams(max_tokens=1, temperature=0), "p8", remote_decode=True))
    rp = RemotePrefill.from_params(outs[-1].kv_transfer_params)
    seq, _ = d_eng.make_sequence({"prompt_token_ids": rp.prompt_token_ids}, SamplingParams(max_tokens=4), "d8",
                                 remote_prefill=rp)
    d_conn.add_request(seq)               # as the engine core does when the request arrives
    assert "d8" in d_conn.leases
    d_conn.request_aborted(seq)           # it ends before its blocks were allocated
    assert "d8" not in d_conn.leases
    _wait(lambda: "p8" not in p_eng.scheduler.held and p_eng.block_manager.num_used_blocks == 0)


def test_a_prompt_the_decode_cache_holds_whole_pulls_no_block_and_ends_the_hold(pair):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn) = pair
    ids = list(range(1000, 1000 + 2 * p_eng.config.block_size))   # exactly two blocks
    greedy = SamplingParams(max_tokens=4, temperature=0)
    events = []
    d_conn.on_event = lambda kind, **kw: events.append((kind, kw.get("blocks")))
    try:
        got = []
        for i in range(2):
            outs = asyncio.run(_run(p_ae, {"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0),
                                    f"p9-{i}", remote_decode=True))
            rp = RemotePrefill.from_params(outs[-1].kv_transfer_params)
            got.append(asyncio.run(_run(d_ae, {"prompt_token_ids": ids}, greedy, f"d9-{i}", remote_prefill=rp)))
            _wait(lambda: f"p9-{i}" not in p_eng.scheduler.held and p_eng.block_manager.num_used_blocks == 0)
    finally:
        d_conn.on_event = lambda kind, **kw: None
    assert events[0] == ("pulled", 2) and events[1][1] == 0   # the second time D's prefix cache had it all
    assert got[1][-1].error is None and got[1][-1].num_cached_tokens == len(ids)
    assert got[1][-1].outputs[0].token_ids == got[0][-1].outputs[0].token_ids
    assert not d_conn.leases and d_eng.block_manager.num_used_blocks == 0
