"""The FastAPI app of one worker: routes only; the work is in serving.py and the Worker."""
from __future__ import annotations

import hmac
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.engine.engine import check_text
from pdserve.server import errors, serving
from pdserve.server.errors import APIError, error_response
from pdserve.server.tokenizer_info import tokenizer_info
from pdserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     KVReleaseRequest, TokenizeRequest)


class RequestIdAndAuth:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide client disconnects from the
    endpoints): X-Request-Id in and out, the API key on every path but the open ones, and the
    request body held to max_body bytes (413), from Content-Length and while it is read."""

    def __init__(self, app, api_key: str | None, max_body: int | None = None, open_paths=("/health",)):
        self.app, self.key, self.max_body, self.open_paths = app, api_key, max_body, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        if self.key and scope["path"] not in self.open_paths:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                resp = error_response(401, "Unauthorized: a valid API key is needed (Authorization: Bearer ...)",
                                      headers={"X-Request-Id": rid})
                return await resp(scope, receive, send)
        if self.max_body is not None:
            receive = await self._limited_body(scope, receive, send, headers, rid)
            if receive is None:
                return

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)
        await self.app(scope, receive, send_with_id)

    async def _limited_body(self, scope, receive, send, headers, rid):
        """Read the whole body (the endpoints would anyway) within the limit; hand the app a
        receive that replays it, then passes through (disconnects). None: answered already."""
        async def too_large():
            resp = error_response(413, f"the request body is larger than this server's limit of {self.max_body} "
                                  "bytes (--max-request-bytes)", headers={"X-Request-Id": rid})
            await resp(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await too_large()
            return None
        chunks, n, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":   # the client left
                return None
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > self.max_body:
                await too_large()
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()
        return replayed


def build_app(worker) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        worker.ready()
        yield
        # here as well as after uvicorn.run(): whoever embeds the app gets a clean stop too
        worker.stop()

    app = FastAPI(title="pdserve worker", lifespan=lifespan)
    errors.install(app)

    sc = worker.server_config
    app.add_middleware(RequestIdAndAuth, api_key=sc.api_key, max_body=sc.max_request_bytes,
                       open_paths=("/health", "/metrics") if sc.metrics_no_auth else ("/health",))

    @app.get("/health")
    async def health():
        if worker.async_engine.dead is not None:
            return error_response(503, f"engine loop died: {worker.async_engine.dead!r}")
        return Response(status_code=200)

    @app.get("/info")
    async def info():
        return worker.info()

    @app.get("/metrics")
    async def metrics():
        return Response(worker.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": worker.model_name, "object": "model", "created": worker.created, "owned_by": "pdserve",
            "root": worker.engine.model_dir, "parent": None, "max_model_len": worker.engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await serving.create(worker, request, req, serving.COMPLETION)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return await serving.create(worker, request, req, serving.CHAT)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        serving._check_model(worker, req.model)
        eng = worker.engine
        if req.messages is not None:
            work = lambda: eng.chat_prompt_ids(req.messages, add_generation_prompt=req.add_generation_prompt)
        elif req.prompt is not None:
            eng.check_prompt_chars(len(req.prompt))   # before any tokenizing
            check_text(req.prompt, "prompt")
            work = lambda: eng.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "send a prompt or messages", "prompt")
        ids = await worker.off_loop(work)
        return {"count": len(ids), "max_model_len": eng.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        serving._check_model(worker, req.model)
        vocab = worker.engine.runner.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await worker.off_loop(lambda: worker.engine.tokenizer.decode(req.tokens))}

    @app.get("/tokenizer_info")
    async def get_tokenizer_info():
        return tokenizer_info(worker.engine.tokenizer)

    @app.post("/v1/kv/release")
    async def kv_release(req: KVReleaseRequest):
        """A router or decode worker gives up on a prefill's held blocks: free them now."""
        if not worker.connector.produces:
            raise APIError(400, f"this worker has role {worker.role} and holds no KV for others")
        return JSONResponse({"released": worker.connector.done(req.request_id, req.kv_token)})

    return app
