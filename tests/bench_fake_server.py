"""A scripted OpenAI-style SSE server for the bench tests: known delays, known failures.

The prompt (or last user message) names a script in SCRIPTS: the delay before each streamed
token, whether `usage` is sent and what it says, or a failure to produce. Run as a script
(`python tests/bench_fake_server.py --port P [--spawn-child]`) it stands in for a deployment.

The delays are real sleeps, unless the server is given a LockstepClock: then they are virtual
time, which the bench client reads exactly (see LockstepClock), so no measurement depends on
how busy the machine is.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading

from aiohttp import web

# name -> delays (s) before each token, usage completion_tokens (None: no usage chunk)
SCRIPTS = {
    "fast": ([0.10, 0.03, 0.03, 0.03], 4),
    "slow_first": ([0.30, 0.02, 0.02], 3),
    "stall": ([0.05, 0.25, 0.02, 0.02], 4),
    "no_usage": ([0.05, 0.02, 0.02], None),
    "multi_token_chunks": ([0.05, 0.04, 0.04], 5),  # 3 chunks carrying 5 tokens
}


class LockstepClock:
    """Virtual time shared by the fake server (in its thread) and the bench client under test.

    Only the server moves it: before each scripted token it adds the token's delay, writes the
    line, then waits until the client has read the clock again. The client reads the clock once
    before each request and once per `data:` line on arrival (pdserve.bench.client), so each of its
    readings is exactly the script's time, however late the line is really read. One request
    may be in flight at a time (the server refuses a second)."""

    def __init__(self, start: float = 1000.0):
        self.t = start
        self.reads = 0
        self.cond = threading.Condition()

    def __call__(self) -> float:   # the client's clock
        with self.cond:
            self.reads += 1
            self.cond.notify_all()
            return self.t

    def advance(self, delay: float) -> int:
        with self.cond:
            self.t += delay
            return self.reads

    def wait_read_after(self, mark: int, timeout: float = 120.0) -> None:
        """A hang guard only: a client that stops reading the clock per line fails, not hangs."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.reads > mark, timeout):
                raise TimeoutError("the client did not read the clock after a data line")


class SteppedClock:
    """A client-side virtual clock whose sleep returns at once, having moved time on by the amount
    asked: the bench runner's send times are then exactly what its pacing decided."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:   # never suspends: the send follows at that time
        self.t += delay


class FakeServer:
    def __init__(self):
        self.received: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.clock: LockstepClock | None = None
        self.hold_until_in_flight = 0  # hold the streams until this many were in flight at once

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def complete(self, request):
        body = await request.json()
        self.received.append(body)
        key = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        key = key.split()[0] if key.split() else key
        if key == "http500":
            return web.json_response({"error": {"message": "engine exploded", "type": "InternalError",
                                                "param": None, "code": 500}}, status=500)
        if key == "http400":
            return web.json_response({"error": {"message": "max_tokens too large", "type": "BadRequestError",
                                                "param": "max_tokens", "code": 400}}, status=400)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.clock is not None and self.in_flight > 1:
                return web.json_response({"error": {"message": "lockstep clock: one request at a time"}}, status=500)
            await self._hold()
            return await self._stream(request, body, key)
        finally:
            self.in_flight -= 1

    async def _hold(self):
        """Wait (polling, up to a hang guard) until hold_until_in_flight requests were in flight together."""
        for _ in range(3000):
            if self.max_in_flight >= self.hold_until_in_flight:
                return
            await asyncio.sleep(0.01)
        self.hold_until_in_flight = 0  # never reached: release everyone; the test's count will tell

    async def _stream(self, request, body, key):
        chat = "messages" in body
        if key == "drop":
            delays, usage = [0.02, 0.02, 0.02, 0.02], 4
        elif key == "echo":  # as many tokens as asked, quickly: for arrival and multi-turn tests
            delays, usage = [0.01] * body["max_tokens"], body["max_tokens"]
        else:
            delays, usage = SCRIPTS.get(key, SCRIPTS["fast"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:  # a role-only first chunk, as vLLM sends: it carries no token
            await self._line(resp, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, d in enumerate(delays):
            if key == "drop" and i == 2:
                await self._wait(d)
                request.transport.close()  # the server goes away mid-stream
                return resp
            piece = f" t{i}"
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            await self._line(resp, {"id": "x", "choices": [choice]}, d)
        if usage is not None and (body.get("stream_options") or {}).get("include_usage"):
            await self._line(resp, {"id": "x", "choices": [], "usage": {
                "prompt_tokens": 7, "completion_tokens": usage, "total_tokens": 7 + usage}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _wait(self, delay: float) -> int | None:
        if self.clock is None:
            await asyncio.sleep(delay)
            return None
        return self.clock.advance(delay)

    async def _line(self, resp, data, delay: float = 0.0):
        """One `data:` line, `delay` after the previous one (real or virtual time)."""
        mark = await self._wait(delay)
        await self._send(resp, data)
        if mark is not None:
            await asyncio.to_thread(self.clock.wait_read_after, mark)

    @staticmethod
    async def _send(resp, data):
        await resp.write(f"data: {json.dumps(data)}\n\n".encode())


def start_in_thread(port: int) -> tuple[FakeServer, callable]:
    """Serve on 127.0.0.1:port from a background thread; returns (server, stop)."""
    server, ready = FakeServer(), threading.Event()
    loop = asyncio.new_event_loop()

    async def main():
        runner = web.AppRunner(server.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        server._runner = runner
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(main()), loop.run_forever()), daemon=True)
    t.start()
    ready.wait(10)

    def stop():
        asyncio.run_coroutine_threadsafe(server._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
    return server, stop


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spawn-child", action="store_true", help="start a sleeping child, as `up` starts workers")
    ap.add_argument("--pid-file", default=None)
    a = ap.parse_args()
    if a.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        if a.pid_file:
            with open(a.pid_file, "w") as f:
                f.write(f"{os.getpid()} {child.pid}\n")
    web.run_app(FakeServer().app(), host="127.0.0.1", port=a.port, print=None)
