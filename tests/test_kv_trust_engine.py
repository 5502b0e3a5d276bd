"""Trust on the KV path with real engines (issue 11, findings 2, 3, 6): a prefill and a decode
engine in one process, each with its step loop and connector, sharing a KV secret, talking
over the real KV server on loopback; beside them fake KV servers (tests/kv_fakes.py) as an
attacker and a slow peer would run them. References are the decode engine's own plain runs
(it computes the prompt itself) and outcomes, never durations."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch

from pdserve.config import KVTransferConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import SamplingParams
from pdserve.kv.connector import KVConnector
from pdserve.kv.params import RemotePrefill
from kv_fakes import FakeKVPeer, wait_for

pytestmark = pytest.mark.slow
SECRET = "one deployment's KV secret"
PULL_DEADLINE = 20.0   # per pull, all of it; a dripping peer never makes it
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def pair(default_model_dir):
    made, events = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDSERVE_KV_SECRET", SECRET)   # both workers have it, as `pdserve up` gives it

        def make(role):
            eng = LLMEngine(model=default_model_dir, kv_cache_memory="24MiB", max_model_len=256, role=role)
            ae = AsyncEngine(eng).start()
            conn = KVConnector(eng, KVTransferConfig(kv_transport="tcp", kv_pull_timeout=PULL_DEADLINE), wake=ae.wake)
            made.append((ae, conn))
            return eng, ae, conn
        try:
            p, d = make("prefill"), make("decode")
            d[2].on_event = lambda kind, **kw: events.append((kind, kw))
            yield p, d, events
        finally:
            for ae, conn in made:
                conn.close()
                ae.shutdown()


async def _run(ae, prompt, params, rid, **kw):
    outs = []
    async for out in ae.generate(prompt, params, rid, **kw):
        outs.append(out)
    return outs


def run(ae, prompt, params, rid, **kw):
    return asyncio.run(_run(ae, prompt, params, rid, **kw))


def reset_cache(ae, eng):
    done = threading.Event()
    ae.call(lambda e: (_forget_prefixes(e.block_manager), done.set()))
    assert done.wait(20)


def _forget_prefixes(bm):
    """Empty the prefix cache (a fresh reference run computes every block itself)."""
    for b in list(bm.hash_to_block.values()):
        bm.block_hash[b] = bm.block_tokens[b] = None
    bm.hash_to_block.clear()


def test_a_fake_kv_server_cannot_poison_the_prefix_cache(pair):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn), events = pair
    prompt = "The answer to a prompt must not depend on who claims to hold its KV cache. " * 2
    ids = d_eng.tokenizer.encode(prompt)
    clean = run(d_ae, {"prompt_token_ids": ids}, GREEDY, "clean")[-1].outputs[0].token_ids
    reset_cache(d_ae, d_eng)

    # an attacker's KV server, named in kv_transfer_params it wrote itself; its "KV" is noise
    bs = d_conn.spec.block_size
    noise = lambda n: (torch.randn(n // 4) * 50).numpy().tobytes()  # noqa: E731
    fake = FakeKVPeer(d_conn.spec.to_dict(), "evil", d_conn.pool.stream_bytes, payload=noise)
    try:
        rp = RemotePrefill("evil", "127.0.0.1", fake.port, list(range(-(-len(ids) // bs))), "evil-1", "t",
                           clean[0], ids, ["tcp"])
        failed = sum(k == "failed" for k, _ in events)
        got = run(d_ae, {"prompt_token_ids": ids}, GREEDY, "victim", remote_prefill=rp)
        assert got[-1].error is None
        assert got[-1].outputs[0].token_ids == clean   # refused, recomputed (kv_load_failure_policy=recompute)
        assert sum(k == "failed" for k, _ in events) == failed + 1
        assert fake.pulls == 0                          # it was never asked for a block
    finally:
        fake.close()
    # whatever happened, the prompt's cached blocks are the true ones
    later = run(d_ae, {"prompt_token_ids": ids}, GREEDY, "later")
    assert later[-1].outputs[0].token_ids == clean
    wait_for(lambda: d_eng.block_manager.num_used_blocks == 0, what="the decode engine to free its blocks")


def test_a_dripping_peer_costs_only_its_own_requests(pair, caplog):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn), events = pair
    bs = d_conn.spec.block_size
    # a genuine (it has the secret) but wedged prefill worker: one byte every half second
    slow = FakeKVPeer(d_conn.spec.to_dict(), "slowP", d_conn.pool.stream_bytes, drip=0.5, secret=SECRET)
    n_slow = 6   # more than the pull threads a decode worker had (4)
    results: dict[str, list] = {}

    def slow_request(i):
        ids = d_eng.tokenizer.encode(f"Request {i} waits on a peer that trickles its KV. " * 2)
        rp = RemotePrefill("slowP", "127.0.0.1", slow.port, list(range(-(-len(ids) // bs))), f"s{i}", "t",
                           ids[0], ids, ["tcp"])
        results[f"slow{i}"] = run(d_ae, {"prompt_token_ids": ids}, SamplingParams(max_tokens=2, temperature=0),
                                  f"slow{i}", remote_prefill=rp)
    try:
        with caplog.at_level(logging.WARNING, logger="pdserve.kv"):
            threads = [threading.Thread(target=slow_request, args=(i,), daemon=True) for i in range(n_slow)]
            for t in threads:
                t.start()
            # at least as many slow pulls in flight as a decode worker used to have pull threads
            wait_for(lambda: slow.pulls >= 4, what="the slow pulls to be in flight")
            # meanwhile ordinary hand-offs from the real prefill engine
            pulled_before = sum(k == "pulled" for k, _ in events)
            normal = {}
            for i in range(3):
                prompt = f"Normal hand-off number {i} goes through while a peer is slow. " * 2
                ids = d_eng.tokenizer.encode(prompt)
                outs = run(p_ae, prompt, SamplingParams(max_tokens=1, temperature=0), f"np{i}", remote_decode=True)
                kvp = outs[-1].kv_transfer_params
                box = []
                t = threading.Thread(target=lambda: box.append(run(
                    d_ae, {"prompt_token_ids": ids}, GREEDY, f"nd{i}", remote_prefill=RemotePrefill.from_params(kvp))),
                    daemon=True)
                t.start()
                t.join(90)   # today: never (every pull thread is stuck on the dripping peer)
                assert box, f"normal hand-off {i} did not complete while the slow peer dripped"
                normal[i] = box[0]
            assert sum(k == "pulled" for k, _ in events) == pulled_before + 3   # pulled, not recomputed
            assert slow.bytes_sent < d_conn.pool.stream_bytes(1)                # the slow ones still were slow
            for t in threads:
                t.join(PULL_DEADLINE * 4)
        # the slow requests: each failed its own pull at the deadline, then was recomputed
        for i in range(n_slow):
            assert results[f"slow{i}"][-1].error is None
        timeouts = [r for r in caplog.records if "did not finish within" in r.getMessage()]
        assert len(timeouts) == n_slow
        for i in range(3):   # and the normal ones decoded what the decode engine computes itself
            ids = d_eng.tokenizer.encode(f"Normal hand-off number {i} goes through while a peer is slow. " * 2)
            reset_cache(d_ae, d_eng)
            ref = run(d_ae, {"prompt_token_ids": ids}, GREEDY, f"ref{i}")
            assert normal[i][-1].outputs[0].token_ids == ref[-1].outputs[0].token_ids
    finally:
        slow.close()
    wait_for(lambda: p_eng.block_manager.num_used_blocks == 0, what="the prefill engine to free its blocks")


def _steps(ae, n=2):
    """Wait until the engine loop has begun n more steps (so n - 1 have run to the end); a
    no-op command wakes an idle loop each time."""
    seen = threading.Semaphore(0)
    hook = seen.release
    ae.step_hooks.append(hook)
    try:
        for _ in range(n):
            ae.call(lambda e: None)
            assert seen.acquire(timeout=20)
    finally:
        ae.step_hooks.remove(hook)


def test_the_lease_is_renewed_while_the_decode_side_waits_and_runs_out_when_it_stops(pair):
    (p_eng, p_ae, p_conn), (d_eng, d_ae, d_conn), _ = pair
    base = time.monotonic()
    now = [base]
    p_eng.clock = d_conn.clock = lambda: now[0]   # both sides on one injected clock
    try:
        outs = run(p_ae, "Held for a decode worker whose queue is long.", SamplingParams(max_tokens=1, temperature=0),
                   "L1", remote_decode=True)
        kvp = outs[-1].kv_transfer_params
        rp = RemotePrefill.from_params(kvp)
        assert rp.lease == p_eng.config.kv_lease_duration == 30.0
        assert p_eng.scheduler.held["L1"][1] == base
        # queued on the decode side: no blocks to pull into yet (the engine thread would add it)
        d_conn.add_request(d_eng.make_sequence({"prompt_token_ids": rp.prompt_token_ids}, GREEDY, "dL1",
                                               remote_prefill=rp)[0])

        now[0] = base + 25.0
        assert d_conn.renew_leases() == 1
        wait_for(lambda: p_eng.scheduler.held["L1"][1] == base + 25.0, what="the renewal to reach the scheduler")
        now[0] = base + 50.0        # past the first lease, inside the renewed one
        _steps(p_ae)
        assert "L1" in p_eng.scheduler.held

        with d_conn._lock:          # the decode worker dies: nobody renews any more
            d_conn.leases.pop("dL1")
        now[0] = base + 90.0
        _steps(p_ae)
        assert "L1" not in p_eng.scheduler.held and p_eng.block_manager.num_used_blocks == 0
        assert "under this token" in p_conn.authorize("L1", rp.token, rp.block_ids)
    finally:
        p_eng.clock = d_conn.clock = time.monotonic
