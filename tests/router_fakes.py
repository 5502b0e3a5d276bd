"""Small aiohttp stand-ins for pdserve workers, speaking the P/D protocol of DESIGN.md, so the
router's logic can be tested in milliseconds without a model. Their 'model' is a fixed
function of the prompt: token i of a prompt of L characters is " L.i"."""
from __future__ import annotations

import asyncio
import json

from aiohttp import web


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def prompt_text(kind: str, body: dict) -> str:
    if kind == "chat":
        return "".join(m["content"] for m in body["messages"])
    return body["prompt"]


def prompt_tokens(kind: str, body: dict) -> int:
    """What a real worker would count: a chat template adds a fixed 30 tokens."""
    return len(prompt_text(kind, body)) // 4 + (30 if kind == "chat" else 1)


def tokens(kind: str, body: dict, n: int) -> list[str]:
    L = len(prompt_text(kind, body))
    return [f" {L}.{i}" for i in range(n)]


class FakeWorker:
    def __init__(self, role: str, token_delay: float = 0.0, first_delay: float = 0.0):
        self.role = role
        self.token_delay, self.first_delay = token_delay, first_delay
        self.calls: list[dict] = []        # {"path", "body", "headers"}
        self.released: list[dict] = []
        self.issued: list[str] = []          # kv tokens of prefills that ran to the end
        self.finish_abandoned = False        # a prefill runs to the end (KV held) even if the caller left
        self.aborted = 0
        self.fail_status: int | None = None  # answer every generation call with this status
        self.unhealthy = False
        self.health_delay = 0.0              # seconds /health takes to answer (a busy machine)
        self.health_checks = 0
        self.gate: asyncio.Event | None = None  # a decode answers only once the test sets it
        self.prefill_gate: asyncio.Event | None = None  # a remote prefill answers only once the test sets it
        self.die_after: int | None = None    # drop the connection after this many token chunks
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "FakeWorker":
        app = web.Application()
        app.router.add_post("/v1/completions", self._gen("completions"))
        app.router.add_post("/v1/chat/completions", self._gen("chat"))
        app.router.add_post("/v1/kv/release", self._release)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self.runner, self.url = await serve(app)
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _health(self, request):
        self.health_checks += 1
        await asyncio.sleep(self.health_delay)
        return web.json_response({}, status=503 if self.unhealthy else 200)

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _release(self, request):
        self.released.append(await request.json())
        return web.json_response({"released": True})

    def _gen(self, kind):
        async def handler(request: web.Request):
            body = await request.json()
            self.calls.append({"path": request.path, "body": body, "headers": request.headers.copy()})
            if self.fail_status:
                return web.json_response({"error": {"message": "boom", "type": "x", "param": None,
                                                    "code": self.fail_status}}, status=self.fail_status)
            ktp = body.get("kv_transfer_params") or {}
            rid = request.headers.get("X-Request-Id", "none")
            if ktp.get("do_remote_decode"):
                assert self.role == "prefill", "decode worker asked to prefill for remote decode"

                async def prefill():
                    await asyncio.sleep(self.first_delay)
                    if self.prefill_gate is not None:
                        await self.prefill_gate.wait()
                    self.issued.append(f"t{len(self.issued)}" if self.finish_abandoned else "t")
                    return self.issued[-1]
                job = asyncio.ensure_future(prefill())
                token = await (asyncio.shield(job) if self.finish_abandoned else job)
                out = {"do_remote_prefill": True, "remote_engine_id": "fake", "remote_host": "127.0.0.1",
                       "remote_port": 1, "remote_block_ids": [0], "remote_request_id": rid, "kv_token": token,
                       "first_token_id": 0, "prompt_token_ids": [1] * prompt_tokens(kind, body),
                       "prefilled_by": self.url}
                return web.json_response(self._full(kind, body, rid, tokens(kind, body, 1), out))
            if ktp:
                assert self.role == "decode" and ktp.get("do_remote_prefill"), ktp
            n = body.get("max_tokens") or 16
            toks = tokens(kind, body, n)
            if not body.get("stream"):
                await asyncio.sleep(self.first_delay + self.token_delay * n)
                if self.gate is not None:
                    await self.gate.wait()
                return web.json_response(self._full(kind, body, rid, toks, None))
            # as a pdserve decode worker: the first token the router streamed itself is not sent again
            return await self._stream(request, kind, body, rid, toks, skip=ktp.get("first_token_sent") is True)
        return handler

    def _full(self, kind, body, rid, toks, ktp):
        text = "".join(toks)
        pt = prompt_tokens(kind, body)
        usage = {"prompt_tokens": pt, "completion_tokens": len(toks), "total_tokens": pt + len(toks)}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            return {"id": f"chatcmpl-{rid}-{self.role}", "object": "chat.completion", "created": 1, "model": "fake",
                    "choices": [choice], "usage": usage, "kv_transfer_params": ktp}
        return {"id": f"cmpl-{rid}-{self.role}", "object": "text_completion", "created": 1, "model": "fake",
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage,
                "kv_transfer_params": ktp}

    async def _stream(self, request, kind, body, rid, toks, skip=False):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(piece, finish=None, role=False):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else {"content": piece}
                ch = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                ch = {"index": 0, "text": piece, "finish_reason": finish}
            return {"id": f"x-{rid}-{self.role}", "object": "chunk", "created": 1, "model": "fake", "choices": [ch]}
        try:
            await asyncio.sleep(self.first_delay)
            if self.gate is not None:
                await self.gate.wait()
            if kind == "chat" and not skip:
                await resp.write(b"data: " + json.dumps(chunk("", role=True)).encode() + b"\n\n")
            for i, t in enumerate(toks):
                if skip and i == 0:
                    continue
                await asyncio.sleep(self.token_delay)
                if self.die_after is not None and i >= self.die_after:
                    request.transport.close()   # as a crash would: no [DONE]
                    return resp
                fin = "length" if i == len(toks) - 1 else None
                await resp.write(b"data: " + json.dumps(chunk(t, fin)).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                u = {"id": "u", "object": "chunk", "created": 1, "model": "fake", "choices": [],
                     "usage": {"prompt_tokens": 3, "completion_tokens": len(toks), "total_tokens": 3 + len(toks)}}
                await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1
            raise
        return resp
