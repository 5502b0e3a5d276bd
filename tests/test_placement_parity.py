"""The simulator and the router place prefill (local on the decode worker, or remote) with the
same function and measure the cached prefix alike: on the same trace they decide the same,
request by request, and route to the same decode instance (issue 13)."""
from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from pdserve.config import EngineConfig, RouterConfig
from pdserve.router.app import make_app
from pdserve.router.placement import local_prefill_reason
from pdserve.sim.cluster_config import parse_cluster_config
from pdserve.sim.simulator import ClusterSim, SimOptions
from pdserve.sim.trace import Session, TraceRequest
from router_fakes import FakeWorker, serve

pytestmark = pytest.mark.timeout(120)

LIMIT = 16   # --local-prefill-max-tokens


def trace() -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens): repeated prefixes, short prompts, one-token requests."""
    a, c, d = list(range(1000, 1064)), list(range(2000, 2100)), list(range(3000, 3200))
    fixed = [(a, 4), (a, 4), (a + [7] * 8, 4), (a + list(range(5000, 5040)), 4), (list(range(4000, 4010)), 4),
             (c, 1), (c, 5), (d, 3)]
    rng = random.Random(0)
    bases = [a, c, d, list(range(6000, 6000 + 300))]
    mixed = []
    for i in range(30):
        base = rng.choice(bases)[:rng.choice([5, 20, 48, 64, 100])]
        mixed.append((base + list(range(10_000 + 100 * i, 10_000 + 100 * i + rng.choice([0, 3, 12, 30]))),
                      rng.choice([1, 2, 8])))
    return fixed + mixed


def sim_decisions(reqs) -> list[tuple[bool, int]]:
    inst = {"model_name": "meta-llama/Llama-3.1-8B", "hardware": "H100", "tp_size": 1}
    cluster = parse_cluster_config({"num_nodes": 1, "link_bw": 16, "link_latency": 20000, "nodes": [{
        "num_instances": 3, "instances": [dict(inst, pd_type="prefill"), dict(inst, pd_type="decode"),
                                          dict(inst, pd_type="decode")]}]})
    sim = ClusterSim(cluster, EngineConfig(), SimOptions(routing="prefix_aware", local_prefill_max_tokens=LIMIT),
                     on_log=lambda line: None)
    # one at a time, as the router's client below sends them: no load differs between the two
    sessions = [Session(100.0 * i, [TraceRequest(len(ids), out, ids)]) for i, (ids, out) in enumerate(reqs)]
    recs = []
    sim.run(sessions, recs.append)
    recs.sort(key=lambda r: r.arrival)
    assert not any(r.error for r in recs)
    return [(r.prefill_instance != r.decode_instance, sim.decode_pool.index(r.decode_instance)) for r in recs]


async def router_decisions(reqs) -> list[tuple[bool, int]]:
    p = await FakeWorker("prefill").start()
    ds = [await FakeWorker("decode").start() for _ in range(2)]
    app = make_app(RouterConfig(prefill=[p.url], decode=[d.url for d in ds], policy="prefix_aware",
                                local_prefill_max_tokens=LIMIT), health_interval=60)
    runner, url = await serve(app)
    out = []
    try:
        async with aiohttp.ClientSession() as s:
            for ids, n in reqs:
                before = (len(p.calls), [len(d.calls) for d in ds])
                r = await s.post(url + "/v1/completions", json={"model": "m", "prompt": ids, "max_tokens": n})
                assert r.status == 200, await r.text()
                got = [len(d.calls) - b for d, b in zip(ds, before[1])]
                assert sorted(got) == [0, 1]
                out.append((len(p.calls) > before[0], got.index(1)))
    finally:
        await runner.cleanup()
        for w in [p, *ds]:
            await w.stop()
    return out


def test_simulator_and_router_place_prefill_alike():
    reqs = trace()
    sim = sim_decisions(reqs)
    router = asyncio.run(router_decisions(reqs))
    assert router == sim
    # the trace exercises every branch: remote, short uncached part, one-token requests, both decoders
    remote = [r for r, _ in sim]
    assert 0 < sum(remote) < len(remote) and {d for _, d in sim} == {0, 1}
    assert sim[:8] == [(True, sim[0][1]), (False, sim[0][1]), (False, sim[0][1]), (True, sim[0][1]),
                       (False, sim[4][1]), (False, sim[5][1]), (False, sim[5][1]), (True, sim[7][1])]


def test_placement_reasons():
    assert local_prefill_reason(1, True, 500, 0, 0) == "max_tokens=1"
    assert local_prefill_reason(0, True, 500, 0, 0) == "max_tokens=1"
    assert local_prefill_reason(8, False, 500, 0, 0) == "no_prefill_worker"
    assert local_prefill_reason(8, True, 500, 0, 0) is None            # no threshold: always remote
    assert local_prefill_reason(8, True, 500, 490, 16) == "short_prompt"  # uncached 10 <= 16
    assert local_prefill_reason(8, True, 500, 480, 16) is None          # uncached 20 > 16
    assert local_prefill_reason(None, True, 10, 0, 16) == "short_prompt"
