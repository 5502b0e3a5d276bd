"""What `pdserve up --ray` needs from the router: instances registered with metadata (shown
in /status), and draining (no new requests; the ones routed there, prefill phase included,
finish there and are counted in `assigned` until they do)."""
from __future__ import annotations

import asyncio

from router_fakes import FakeWorker
from test_router_unit import COMP_BODY, cluster, run


def test_meta_shown_in_status_and_checked():
    async def go():
        async with cluster(n_prefill=0, n_decode=1) as (s, url, _, (d,)):
            meta = {"ray_actor": "pdserve-decode-0", "ray_node_id": "abc123", "restarted": False}
            r = await s.post(url + "/instances", json={"role": "decode", "url": d.url, "meta": meta})
            assert r.status == 200
            (inst,) = (await (await s.get(url + "/status")).json())["decode_instances"]
            assert {k: inst[k] for k in meta} == meta and inst["url"] == d.url
            r = await s.post(url + "/instances", json={"role": "decode", "url": d.url, "meta": ["x"]})
            assert r.status == 400 and (await r.json())["error"]["param"] == "meta"
    run(go())


def test_drained_instance_gets_no_new_requests_but_finishes_its_own():
    async def go():
        async with cluster(n_prefill=0, n_decode=2, policy="round_robin") as (s, url, _, (d1, d2)):
            p = await FakeWorker("prefill").start()
            p.prefill_gate = asyncio.Event()   # the prefill phase lasts until the drain is done
            await s.post(url + "/instances", json={"role": "prefill", "url": p.url})
            first = asyncio.ensure_future(s.post(url + "/v1/completions", json=COMP_BODY))
            while not p.calls:
                await asyncio.sleep(0.01)
            insts = {i["url"]: i for i in await (await s.get(url + "/instances")).json()}
            chosen = next(u for u in (d1.url, d2.url) if insts[u]["assigned"] == 1)
            other = d2 if chosen == d1.url else d1
            r = await s.post(url + "/instances/drain", json={"url": chosen})
            assert r.status == 200 and (await r.json())["draining"] is True
            p.prefill_gate.set()
            resp = await first   # the request picked before the drain ends on the drained worker
            assert resp.status == 200
            worker = d1 if chosen == d1.url else d2
            assert len(worker.calls) == 1
            n = len(other.calls)
            for _ in range(3):   # new ones go elsewhere
                assert (await s.post(url + "/v1/completions", json=COMP_BODY)).status == 200
            assert len(worker.calls) == 1 and len(other.calls) == n + 3
            insts = {i["url"]: i for i in await (await s.get(url + "/instances")).json()}
            assert insts[chosen]["assigned"] == 0 and insts[chosen]["in_flight"] == 0
            assert (await s.post(url + "/instances/drain", json={"url": "http://nowhere:1"})).status == 404
            await p.stop()
    run(go())
