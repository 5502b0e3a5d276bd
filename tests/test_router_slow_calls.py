"""A call that outlives the router's --request-timeout is that request's failure, not its
worker's (found by tests/test_faults_under_load.py: on a busy 2-core machine one long
unstreamed answer timed out, the decode worker was marked down, and every call waiting on it
was given up with it). Fake workers (tests/router_fakes.py), the router's own app."""
from __future__ import annotations

import asyncio

import pytest

from test_router_unit import COMP_BODY, cluster, run, until


def test_a_call_past_the_request_timeout_fails_alone_and_the_worker_stays_up():
    async def go():
        # health checks far apart: whatever marks the worker down here is the timed-out call
        async with cluster(health_interval=30, request_timeout=0.5) as (s, url, _, (d,)):
            d.first_delay = 2.0
            r = await s.post(url + "/v1/completions", json=COMP_BODY)
            assert r.status == 503
            msg = (await r.json())["error"]["message"]
            assert "--request-timeout" in msg
            st = await (await s.get(url + "/status")).json()
            assert st["decode_instances"][0]["healthy"] is True   # not taken out of the pool
            d.first_delay = 0.0
            r = await s.post(url + "/v1/completions", json=COMP_BODY)   # served at once, no health check needed
            assert r.status == 200
    run(go())


def test_calls_given_up_on_a_wedged_worker_keep_its_own_error():
    """Several calls waiting on a worker whose health check fails: each gives up, and the
    worker's last_error stays what the health check said (not the calls' words about it, nested)."""
    async def go():
        async with cluster(health_interval=0.2, request_timeout=600) as (s, url, _, (d,)):
            d.first_delay = 1e6
            tasks = [asyncio.create_task(s.post(url + "/v1/completions", json=COMP_BODY)) for _ in range(4)]
            await until(lambda: len(d.calls) == 4)
            d.unhealthy = True
            for r in await asyncio.wait_for(asyncio.gather(*tasks), 30):
                assert r.status == 503
            st = await (await s.get(url + "/status")).json()
            err = st["decode_instances"][0]["last_error"]
            assert err.startswith("health check failed") and "went down during the call" not in err, err
    run(go())


async def _down_late(s, url, inst_url: str) -> None:
    async def late():
        st = await (await s.get(url + "/status")).json()
        d = next(i for i in st["decode_instances"] if i["url"] == inst_url)
        return not d["healthy"] and d["last_error"].startswith("health check failed: no answer")
    await until(late)


@pytest.mark.parametrize("stream", [False, True])
def test_a_late_decode_worker_with_no_other_keeps_its_calls(stream):
    """Its /health answers late (a busy machine), so it is marked down; with no other decode
    worker to take the call over, the call goes on and is answered instead of a 503."""
    async def go():
        async with cluster(health_interval=0.2, request_timeout=600) as (s, url, _, (d,)):
            await until(lambda: d.health_checks > 1)   # a check answered (the next began): reachable, then late
            d.gate, d.health_delay = asyncio.Event(), 30.0
            task = asyncio.create_task(s.post(url + "/v1/completions", json={**COMP_BODY, "stream": stream}))
            await until(lambda: len(d.calls) == 1)
            await _down_late(s, url, d.url)
            d.health_delay = 0.0
            d.gate.set()
            r = await asyncio.wait_for(task, 30)
            assert r.status == 200
            text = await r.text()
            if stream:   # a 200 whatever happens after the first token: the events tell
                assert "[DONE]" in text and '"error"' not in text, text
            else:
                assert (await r.json())["choices"][0]["text"]
    run(go())


def test_a_late_decode_worker_hands_its_calls_to_a_healthy_one():
    async def go():
        async with cluster(n_decode=2, health_interval=0.2, request_timeout=600) as (s, url, _, ds):
            await until(lambda: all(d.health_checks > 1 for d in ds))
            for d in ds:
                d.gate, d.health_delay = asyncio.Event(), 30.0
            task = asyncio.create_task(s.post(url + "/v1/completions", json=COMP_BODY))
            await until(lambda: sum(len(d.calls) for d in ds) == 1)
            slow, other = ds if ds[0].calls else ds[::-1]
            other.health_delay = 0.0
            other.gate.set()
            await _down_late(s, url, slow.url)
            r = await asyncio.wait_for(task, 30)
            assert r.status == 200 and len(other.calls) == 1
    run(go())
