"""The router's health checks against a real HTTP server that is missing, up, failing and back:
the log says it in words ("not reachable yet", "is reachable", "is down: <reason>"), with no
exception reprs and no "again" for an instance that was never reachable."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from pdserve.procs import free_port
from pdserve.router.instances import Pools, check_one


async def serve_health(port: int, handler) -> web.AppRunner:
    """A real HTTP server on 127.0.0.1:port whose /health is handler; cleanup() stops it."""
    app = web.Application()
    app.router.add_get("/health", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_health_check_messages(caplog):
    caplog.set_level(logging.INFO, logger="pdserve.router")
    port = free_port()
    state = {"status": 200}

    async def health(request):
        if state["status"] == 200:
            return web.Response(text="ok")
        return web.json_response({"error": {"message": "engine loop died: IndexError"}}, status=state["status"])

    async def scenario():
        pools = Pools()
        inst = pools.add(f"127.0.0.1:{port}", "decode")
        url = inst.url
        msgs = []

        def new_messages():
            got = [r.getMessage() for r in caplog.records if r.name == "pdserve.router"][len(msgs):]
            msgs.extend(got)
            return got

        async with aiohttp.ClientSession() as s:
            new_messages()
            await check_one(s, pools, inst, 2.0)                 # nobody listens yet
            assert new_messages() == [f"decode instance {url} not reachable yet "
                                      f"(health check failed: connection refused)"]
            assert inst.healthy is False and inst.last_error == "health check failed: connection refused"
            await check_one(s, pools, inst, 2.0)                 # still nothing: said once, not every check
            assert new_messages() == []

            runner = await serve_health(port, health)
            try:
                await check_one(s, pools, inst, 2.0)
                assert new_messages() == [f"decode instance {url} is reachable"]   # not "up again"
                assert inst.healthy is True
                await check_one(s, pools, inst, 2.0)
                assert new_messages() == []
                state["status"] = 503
                await check_one(s, pools, inst, 2.0)
                (down,) = new_messages()
                assert down.startswith(f"decode instance {url} is down: health check failed: /health answered 503: ")
                assert "engine loop died: IndexError" in down
                state["status"] = 200
                await check_one(s, pools, inst, 2.0)
                assert new_messages() == [f"decode instance {url} is reachable again"]
            finally:
                await runner.cleanup()
            await check_one(s, pools, inst, 2.0)                 # the server went away
            assert new_messages() == [f"decode instance {url} is down: health check failed: connection refused"]
        for m in msgs:   # words, not reprs
            assert "ConnectionKey" not in m and "Error(" not in m and "up again" not in m, m

    asyncio.run(scenario())


def test_a_timeout_in_words(caplog):
    caplog.set_level(logging.INFO, logger="pdserve.router")
    port = free_port()

    async def scenario():
        release = asyncio.Event()

        async def slow(request):
            await release.wait()     # answers only after the check gave up
            return web.Response(text="late")
        runner = await serve_health(port, slow)
        pools = Pools()
        inst = pools.add(f"127.0.0.1:{port}", "prefill")
        try:
            async with aiohttp.ClientSession() as s:
                await check_one(s, pools, inst, 0.2)
        finally:
            release.set()
            await runner.cleanup()
        return inst

    inst = asyncio.run(scenario())
    assert inst.last_error == "health check failed: no answer to /health within 0.2 s"
    assert any(r.getMessage() == f"prefill instance {inst.url} not reachable yet "
                                 f"(health check failed: no answer to /health within 0.2 s)" for r in caplog.records)


def test_one_late_answer_from_a_busy_worker_does_not_take_it_down(caplog):
    """A worker that has answered before and misses one check (a busy machine) stays up; the
    MISSED_CHECKS-th miss in a row takes it down; an answer in between resets the count."""
    from pdserve.router.instances import MISSED_CHECKS
    caplog.set_level(logging.INFO, logger="pdserve.router")
    port = free_port()

    async def scenario():
        late = {"on": False}
        release = asyncio.Event()

        async def health(request):
            if late["on"]:
                await release.wait()
            return web.Response(text="ok")
        runner = await serve_health(port, health)
        pools = Pools()
        inst = pools.add(f"127.0.0.1:{port}", "decode")
        seen = []
        try:
            async with aiohttp.ClientSession() as s:
                # a check that is answered gets all the time it needs (a busy machine), one that is
                # not waits 0.2 s
                await check_one(s, pools, inst, 30)        # answers: reachable
                for rnd in range(2):
                    late["on"] = True
                    for _ in range(MISSED_CHECKS - 1):
                        await check_one(s, pools, inst, 0.2)
                        seen.append(inst.healthy)
                    if rnd == 0:                            # then it answers again: the count restarts
                        late["on"] = False
                        await check_one(s, pools, inst, 30)
                        seen.append(inst.healthy)
                await check_one(s, pools, inst, 0.2)       # the MISSED_CHECKS-th miss in a row
                seen.append(inst.healthy)
        finally:
            release.set()
            await runner.cleanup()
        return inst, seen

    inst, seen = asyncio.run(scenario())
    assert seen == [True] * (2 * MISSED_CHECKS - 1) + [False], seen
    assert inst.last_error == "health check failed: no answer to /health within 0.2 s"
