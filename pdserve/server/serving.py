"""/v1/completions and /v1/chat/completions: requests in, engine streams out, OpenAI JSON or
SSE back. One HTTP request may fan out to several engine requests (n > 1, several prompts)."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.engine.engine import RequestError
from pdserve.kv.params import PARAM, RemotePrefill, wants_remote_decode, wants_remote_prefill
from pdserve.llm import child_params
from pdserve.server.errors import APIError, error_body
from pdserve.server.outputs import chat_logprobs, completion_logprobs, finish_reason, usage
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest

CHAT, COMPLETION = "chat", "completion"
MAX_CHOICES = 256   # engine requests one HTTP request may make (prompts x n)


@dataclass
class Child:
    """One engine request of an HTTP request: its choice index and what it produced so far."""
    index: int
    prompt_index: int
    seq: object
    text: str | None
    arrival: float
    token_times: list[float] = field(default_factory=list)
    last: object = None     # the latest RequestOutput


def _check_model(worker, name: str | None) -> None:
    if name and name != worker.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", "model")


def _build(worker, req, kind: str, rid: str) -> tuple[list[Child], RemotePrefill | None, bool]:
    """Validate everything and make the engine sequences, before any of them starts."""
    engine, kvp = worker.engine, req.kv_transfer_params
    try:
        params = req.sampling_params()
    except ValueError as e:
        raise RequestError(str(e), getattr(e, "param", None)) from e
    if kind == CHAT:
        if req.chat_template is not None and not worker.server_config.trust_request_chat_template:
            raise RequestError("chat_template in a request is not accepted by this server (start it with "
                               "--trust-request-chat-template to allow it)", "chat_template")
        prompts = [{"prompt_token_ids": engine.chat_prompt_ids(req.messages, req.chat_template)}]
    else:
        prompts = req.prompts()
        if not prompts:
            raise RequestError("prompt must not be empty", "prompt")
        if len(prompts) > MAX_CHOICES:
            raise RequestError(f"at most {MAX_CHOICES} prompts per request", "prompt")
        for p in prompts:   # every prompt's size before any of them is tokenized
            if isinstance(p, str):
                engine.check_prompt_chars(len(p))
    if len(prompts) * params.n > MAX_CHOICES:
        raise RequestError(f"prompts x n must be at most {MAX_CHOICES}", "n")
    remote_decode = wants_remote_decode(kvp) or worker.role == "prefill"
    rp, extra = None, {}
    if wants_remote_prefill(kvp):
        rp = RemotePrefill.from_params(kvp)
        prompts = [{"prompt_token_ids": rp.prompt_token_ids}]   # the tokens the KV belongs to
        extra["remote_first_token"] = rp.first_token_id
    elif remote_decode:
        extra["remote_decode"] = True
    if (rp or remote_decode) and (params.n != 1 or len(prompts) != 1):
        raise RequestError("a KV hand-off (kv_transfer_params, or any request to a prefill worker) "
                           "needs a single prompt and n=1", PARAM)
    if remote_decode and req.stream:
        raise RequestError("a prefill for remote decode (do_remote_decode) cannot be streamed", "stream")
    now, children = time.monotonic(), []
    for pi, prompt in enumerate(prompts):
        for j in range(params.n):
            child_rid = rid if len(prompts) * params.n == 1 else f"{rid}-{pi}-{j}"
            seq, text = engine.make_sequence(prompt, child_params(params, j), child_rid, **extra)
            children.append(Child(len(children), pi, seq, text, now))
    return children, rp, remote_decode


async def create(worker, request: Request, req: CompletionRequest | ChatCompletionRequest, kind: str):
    _check_model(worker, req.model)
    if worker.async_engine.dead is not None:
        raise APIError(503, f"the engine has stopped: {worker.async_engine.dead!r}")
    base = request.state.request_id
    rid = f"{base}-{secrets.token_hex(4)}"   # engine ids stay unique whatever the client sends
    # tokenizing and chat templates run in a thread: a big or hostile prompt never holds up the
    # event loop (health checks, other streams)
    children, rp, remote_decode = await worker.off_loop(_build, worker, req, kind, rid)
    if rp is not None:
        worker.connector.expect(children[0].seq.request_id, rp)
    run = _Run(worker, request, req, kind, base, children, rp, remote_decode)
    if req.stream:
        return await run.stream()
    return await run.complete()


class _Run:
    def __init__(self, worker, request, req, kind, base_id, children, rp, remote_decode):
        self.w, self.request, self.req, self.kind = worker, request, req, kind
        self.children, self.rp, self.remote_decode = children, rp, remote_decode
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + base_id
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    # ---- engine side ------------------------------------------------------------------
    def start(self) -> None:
        for c in self.children:
            self.tasks.append(asyncio.create_task(self._pump(c)))

    async def _pump(self, c: Child) -> None:
        try:
            async for out in self.w.async_engine.submit(c.seq, c.text):
                now = time.monotonic()
                if out.outputs[0].new_token_ids:
                    c.token_times.append(now)
                c.last = out
                await self.queue.put((c, out))
            o = c.last.outputs[0]
            self.w.metrics.request_done(c.last, None if c.last.error else finish_reason(o.finish_reason),
                                        c.arrival, time.monotonic(), c.token_times)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the reader, which raises it (e.g. RequestError -> 400)
            await self.queue.put((c, e))

    def stop(self) -> None:
        """Cancel what still runs: leaving a submit() stream early aborts its engine request."""
        for t in self.tasks:
            t.cancel()
        if self.rp is not None:
            self.w.connector.forget(self.children[0].seq.request_id)

    async def _next(self):
        c, out = await self.queue.get()
        if isinstance(out, BaseException):
            raise out
        if out.error:
            raise APIError(503, out.error, PARAM if self.rp else None)
        return c, out

    async def _disconnected(self) -> None:
        while not await self.request.is_disconnected():
            await asyncio.sleep(0.25)

    # ---- not streamed -----------------------------------------------------------------
    async def complete(self) -> Response:
        self.start()
        watch = asyncio.create_task(self._disconnected())
        try:
            pending = len(self.children)
            while pending:
                get = asyncio.create_task(self._next())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:  # the client left: abort everything (`finally`)
                    get.cancel()
                    return Response(status_code=499)   # nginx's "client closed request"; nobody reads it
                _, out = get.result()
                pending -= out.finished
            kvp = None
            if self.remote_decode:
                c = self.children[0]
                # no wait for the engine: the connector learnt the held blocks when the step ended
                kvp = self.w.connector.export(c.seq.request_id, c.last.outputs[0].token_ids[0],
                                              c.last.prompt_token_ids)
            return JSONResponse(self._body(kvp))
        finally:
            watch.cancel()
            self.stop()

    def _body(self, kvp: dict | None) -> dict:
        tok = self.w.engine.tokenizer
        choices = []
        ids = self.req.return_token_ids
        for c in self.children:
            o = c.last.outputs[0]
            fr = finish_reason(o.finish_reason)
            extra = {"token_ids": list(o.token_ids), "prompt_token_ids": list(c.seq.prompt_token_ids)} if ids else {}
            if self.kind == CHAT:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": o.text},
                                "logprobs": chat_logprobs(tok, o.logprobs) if o.logprobs is not None else None,
                                "finish_reason": fr, "stop_reason": o.stop_reason, **extra})
            else:
                text = o.text
                if self.req.echo:
                    text = self._prompt_text(c) + text
                choices.append({"index": c.index, "text": text, "finish_reason": fr, "stop_reason": o.stop_reason,
                                "logprobs": completion_logprobs(tok, o.logprobs) if o.logprobs is not None else None,
                                "prompt_logprobs": None, **extra})
        return {"id": self.id, "object": "chat.completion" if self.kind == CHAT else "text_completion",
                "created": self.created, "model": self.w.model_name, "choices": choices,
                "usage": usage(self.children), "kv_transfer_params": kvp}

    def _prompt_text(self, c: Child) -> str:
        return c.text if c.text is not None else self.w.engine.tokenizer.decode(c.seq.prompt_token_ids)

    # ---- streamed ---------------------------------------------------------------------
    async def stream(self):
        self.start()
        try:
            first = await self._next()   # errors before the first token get a proper status
        except BaseException:
            self.stop()
            raise
        return StreamingResponse(self._sse(first), media_type="text/event-stream")

    async def _sse(self, first):
        opts = self.req.stream_options
        try:
            for c in self.children:
                if self.kind == CHAT:
                    yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
                elif self.req.echo:
                    yield self._chunk([{"index": c.index, "text": self._prompt_text(c), "logprobs": None,
                                        "finish_reason": None}])
            pending, item = len(self.children), first
            while True:
                c, out = item
                o = out.outputs[0]
                if o.new_text or out.finished:
                    yield self._chunk([self._delta(c, o, out.finished)])
                pending -= out.finished
                if not pending:
                    break
                try:
                    item = await self._next()
                except Exception as e:   # after the 200 an error is an event, then [DONE]
                    yield _sse(_stream_error(e))
                    break
            if opts is not None and opts.include_usage:
                yield self._chunk([], usage=usage(self.children))
            yield b"data: [DONE]\n\n"
        finally:
            self.stop()

    def _delta(self, c: Child, o, finished: bool) -> dict:
        tok, fr = self.w.engine.tokenizer, finish_reason(o.finish_reason) if finished else None
        if self.kind == CHAT:
            lp = chat_logprobs(tok, o.new_logprobs) if o.logprobs is not None else None
            return {"index": c.index, "delta": {"content": o.new_text}, "logprobs": lp, "finish_reason": fr,
                    "stop_reason": o.stop_reason if finished else None}
        lp = completion_logprobs(tok, o.new_logprobs) if o.logprobs is not None else None
        return {"index": c.index, "text": o.new_text, "logprobs": lp, "finish_reason": fr,
                "stop_reason": o.stop_reason if finished else None}

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.kind == CHAT else "text_completion",
               "created": self.created, "model": self.w.model_name, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return _sse(obj)


def _stream_error(e: Exception) -> dict:
    from pdserve.engine.async_engine import EngineDeadError
    if isinstance(e, APIError):
        return error_body(e.status, e.message, e.param)
    if isinstance(e, RequestError):
        return error_body(400, str(e), e.param)
    return error_body(503 if isinstance(e, EngineDeadError) else 500, f"{type(e).__name__}: {e}"[:500])


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
