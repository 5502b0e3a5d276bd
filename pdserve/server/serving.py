"""/v1/completions and /v1/chat/completions: requests in, engine streams out, OpenAI JSON or
SSE back. One HTTP request may fan out to several engine requests (n > 1, several prompts)."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.errors import RequestError
from pdserve.kv.params import PARAM, RemotePrefill, wants_remote_decode, wants_remote_prefill
from pdserve.kv.params import pack_params
from pdserve.llm import child_params
from pdserve.server import fields, tools
from pdserve.errors import error_body
from pdserve.server.errors import APIError
from pdserve.server.openai_outputs import (chat_logprobs, completion_logprobs, echo_logprobs, finish_reason, text_end,
                                    usage, usage as _usage, vllm_prompt_logprobs)
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
    offset: int = 0         # streamed completions: text_offset of the next token's logprobs
    started: bool = False   # streamed: its echo / prompt logprobs have been sent
    tools: object = None    # a tools.ToolStream, when the output may hold tool calls


def _check_model(worker, name: str | None) -> None:
    if name and name != worker.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", "model")


def _chat_prompt(worker, req, params):
    """The chat prompt's token ids, with the request's tools in it, and the tool plan, which may
    constrain the output (tool_choice required or named)."""
    engine, sc = worker.engine, worker.server_config
    plan = tools.plan(req, params.structured_outputs, sc.enable_auto_tool_choice, sc.tool_call_parser)
    if plan.structured is not None:
        params = replace(params, structured_outputs=plan.structured)
    if plan.mode == "auto" and isinstance(plan.parser, tools.HermesParser):
        params = replace(params, skip_special_tokens=False)   # <tool_call> may be a special token
    native = tools.template_knows_tools(req.chat_template or engine.tokenizer.chat_template)
    messages, tool_defs = tools.prompt_messages(req.messages, plan.tools, native, sc.tool_call_parser)
    ids = engine.chat_prompt_ids(messages, req.chat_template, tool_defs)
    return [{"prompt_token_ids": ids}], params, (plan if plan.mode != "none" else None)


def _build(worker, req, kind: str, rid: str) -> tuple[list[Child], list, bool, object]:
    """Validate everything and make the engine sequences, before any of them starts.
    Returns (children, the RemotePrefill of each prompt (decode side), remote_decode, tool plan)."""
    engine, kvp = worker.engine, req.kv_transfer_params
    try:
        params = req.sampling_params()
    except ValueError as e:
        raise RequestError(str(e), getattr(e, "param", None)) from e
    plan = None
    if kind == CHAT:
        if req.chat_template is not None and not worker.server_config.trust_request_chat_template:
            raise RequestError("chat_template in a request is not accepted by this server (start it with "
                               "--trust-request-chat-template to allow it)", "chat_template")
        prompts, params, plan = _chat_prompt(worker, req, params)
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
    rps = RemotePrefill.all_from_params(kvp) if wants_remote_prefill(kvp) else []
    if rps:
        if len(rps) != len(prompts):
            raise RequestError(f"{PARAM} carries {len(rps)} prompts' KV, the request has {len(prompts)} prompts", PARAM)
        # the tokens the KV belongs to; a prompt sent as text keeps its text (echo)
        prompts = [{"prompt_token_ids": rp.prompt_token_ids, "prompt": p if isinstance(p, str) else None}
                   for rp, p in zip(rps, prompts)]
        if params.prompt_logprobs is not None and any(rp.prompt_logprobs is None for rp in rps):
            # this worker never computes the prompt: its logprobs must come from the prefill worker
            raise RequestError(f"{PARAM} lacks the prompt_logprobs this request asks for", PARAM)
    width = _width(req, params)
    if remote_decode:
        if req.stream:
            raise RequestError("a prefill for remote decode (do_remote_decode) cannot be streamed", "stream")
        if params.max_tokens == 0:
            raise RequestError("max_tokens 0 generates nothing to decode remotely", "max_tokens")
        # prefill each prompt once; the decode worker forks the other choices from its KV
        width = 1
    if width > params.n and params.logprobs is None:
        params = replace(params, logprobs=0)   # best_of ranks by cumulative logprob
    now, children = time.monotonic(), []
    for pi, prompt in enumerate(prompts):
        first = None
        for j in range(width):
            child_rid = rid if len(prompts) * width == 1 else f"{rid}-{pi}-{j}"
            extra = {"remote_decode": True} if remote_decode else {}
            if rps and j == 0:
                extra["remote_prefill"] = rps[pi]
            seq, text = engine.make_sequence(prompt, child_params(params, j), child_rid, **extra)
            if rps and j > 0:   # a fork: its own first token, from the pulled KV (prefix cache) + the tail
                seq.remote_prompt_logprobs = rps[pi].prompt_logprobs
                seq.wait_for = first
            first = first or seq.request_id
            children.append(Child(len(children), pi, seq, text, now, tools=plan and tools.ToolStream(plan)))
    return children, rps, remote_decode, plan


def _width(req, params) -> int:
    """Engine requests per prompt: n, or best_of to choose the n best from (as vLLM: by
    cumulative logprob)."""
    best = req.best_of
    if best is None or best == params.n:
        return params.n
    if best < params.n:
        raise RequestError(f"best_of must be at least n={params.n}, got {best}.", "best_of")
    if req.stream:
        raise RequestError("best_of > n cannot be streamed (the best are known only at the end)", "best_of")
    return best


async def create(worker, request: Request, req: CompletionRequest | ChatCompletionRequest, kind: str):
    _check_model(worker, req.model)
    if worker.async_engine.dead is not None:
        raise APIError(503, f"the engine has stopped: {worker.async_engine.dead!r}")
    base = req.request_id or request.state.request_id   # vLLM's request_id field names the answer
    rid = f"{base}-{secrets.token_hex(4)}"   # engine ids stay unique whatever the client sends
    fields.check(req, kind)
    # tokenizing and chat templates run in a thread: a big or hostile prompt never holds up the
    # event loop (health checks, other streams)
    children, rps, remote_decode, plan = await worker.off_loop(_build, worker, req, kind, rid)
    run = _Run(worker, request, req, kind, base, children, rps, remote_decode, plan)
    if req.stream:
        return await run.stream()
    return await run.complete()


class _Run:
    def __init__(self, worker, request, req, kind, base_id, children, rps, remote_decode, plan=None):
        self.w, self.request, self.req, self.kind, self.plan = worker, request, req, kind, plan
        self.children, self.remote_decode = children, remote_decode
        self.rp = rps[0] if rps else None
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + base_id
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    # ---- engine side ------------------------------------------------------------------
    def start(self, every: bool = True) -> None:
        """every: hand the reader each output (a stream); else only a choice's last (or an error):
        an answer sent whole has no use for the ones between (64 requests served whole: the event
        loop's CPU 1.8 -> 0.3 s, time it held the GIL from the engine's stepping thread)."""
        for c in self.children:
            self.tasks.append(asyncio.create_task(self._pump(c, every)))

    async def _pump(self, c: Child, every: bool) -> None:
        try:
            async for out in self.w.async_engine.submit(c.seq, c.text):
                now = time.monotonic()
                if out.outputs[0].new_token_ids:
                    c.token_times.append(now)
                c.last = out
                if every or out.finished or out.error:
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
        self.start(every=False)
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
            if self.remote_decode:   # one child per prompt, its params made in the step that held it
                per = [c.last.kv_transfer_params for c in self.children]
                if None in per:
                    raise RuntimeError("a remote-decode request ended without KV to hand off")
                if await self.request.is_disconnected():   # nobody will read these params: free the KV now
                    for c, kv in zip(self.children, per):
                        self.w.connector.done(c.seq.request_id, kv["kv_token"])
                    return Response(status_code=499)
                kvp = pack_params(per)
            return JSONResponse(self._body(kvp))
        finally:
            watch.cancel()
            self.stop()

    def _body(self, kvp: dict | None) -> dict:
        tok = self.w.engine.tokenizer
        choices = []
        ids = self.req.return_token_ids
        want_lp = self.kind == CHAT and self.req.logprobs or self.kind != CHAT and self.req.logprobs is not None
        for c in chosen(self.children, self.req.n):
            o = c.last.outputs[0]
            fr = finish_reason(o.finish_reason)
            extra = {"token_ids": list(o.token_ids), "prompt_token_ids": list(c.seq.prompt_token_ids)} if ids else {}
            lps = o.logprobs if want_lp else None
            if self.kind == CHAT:
                message = {"role": "assistant", "content": o.text}
                if self.plan is not None:
                    content, calls = self.plan.parse(o.text)
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    fr = "tool_calls" if calls and fr == "stop" and self.plan.mode != "named" else fr
                choices.append({"index": c.index, "message": message,
                                "logprobs": chat_logprobs(tok, lps) if lps is not None else None,
                                "finish_reason": fr, "stop_reason": o.stop_reason, **extra})
            else:
                text, lp = o.text, completion_logprobs(tok, lps) if lps is not None else None
                if self.req.echo:
                    ptext = self._prompt_text(c)
                    text = ptext + text
                    if lps is not None:
                        lp = echo_logprobs(tok, c.seq.prompt_token_ids, c.last.prompt_logprobs, lps)
                choices.append({"index": c.index, "text": text, "finish_reason": fr, "stop_reason": o.stop_reason,
                                "logprobs": lp, "prompt_logprobs": self._prompt_lps(c), **extra})
        body = {"id": self.id, "object": "chat.completion" if self.kind == CHAT else "text_completion",
                "created": self.created, "model": self.w.model_name, "choices": choices,
                "usage": usage(self.children), "kv_transfer_params": kvp}
        if self.kind == CHAT and self.req.prompt_logprobs is not None:   # vLLM: per request in chat
            body["prompt_logprobs"] = self._prompt_lps(self.children[0])
        return body

    def _prompt_lps(self, c: Child):
        if self.req.prompt_logprobs is None or c.last is None:
            return None
        return vllm_prompt_logprobs(self.w.engine.tokenizer, c.last.prompt_logprobs)

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
        # vLLM: usage in every chunk with include_usage and continuous_usage_stats both set
        self.every_usage = opts is not None and opts.include_usage and opts.continuous_usage_stats
        try:
            # the router streamed the first token, with the role, itself: this answer goes on from there
            sent = self.rp is not None and self.rp.first_token_sent
            for c in self.children:
                if self.kind == CHAT and not sent:
                    yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
            pending, item = len(self.children), first
            while True:
                c, out = item
                o = out.outputs[0]
                if not c.started:   # the prompt's part: its echo and logprobs came with this output
                    c.started = True
                    head = self._stream_head(c)
                    if head is not None:
                        yield head
                if o.new_text or out.finished or (o.new_logprobs and self._wants_lp()):
                    delta = self._delta(c, o, out.finished)
                    if delta is not None:
                        yield self._chunk([delta])
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

    def _wants_lp(self) -> bool:
        return bool(self.req.logprobs) if self.kind == CHAT else self.req.logprobs is not None

    def _stream_head(self, c: Child) -> bytes | None:
        """A choice's first chunk of a streamed completion: the echoed prompt (with its
        logprobs when asked) and vLLM's prompt_logprobs, once the prefill has made them."""
        plp = self._prompt_lps(c)
        if self.kind == CHAT:
            if plp is None:
                return None
            return self._chunk([{"index": c.index, "delta": {"content": ""}, "logprobs": None,
                                 "finish_reason": None}], extra={"prompt_logprobs": plp})
        if not self.req.echo and plp is None:
            return None
        text, lp = "", None
        if self.req.echo:
            text = self._prompt_text(c)
            if self._wants_lp():
                lp = echo_logprobs(self.w.engine.tokenizer, c.seq.prompt_token_ids, c.last.prompt_logprobs, [])
                c.offset = text_end(lp)
        return self._chunk([{"index": c.index, "text": text, "logprobs": lp, "finish_reason": None,
                             "prompt_logprobs": plp}])

    def _delta(self, c: Child, o, finished: bool) -> dict | None:
        tok, fr = self.w.engine.tokenizer, finish_reason(o.finish_reason) if finished else None
        if self.kind == CHAT:
            lp = chat_logprobs(tok, o.new_logprobs) if self._wants_lp() else None
            delta = {"content": o.new_text}
            if c.tools is not None:   # content while it is content, tool_calls once they are
                delta = c.tools.feed(o.new_text, finished)
                fr = c.tools.finish_reason(fr)
                if not delta and not finished and lp is None:
                    return None
            return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": fr,
                    "stop_reason": o.stop_reason if finished else None}
        lp = None
        if self._wants_lp():
            lp = completion_logprobs(tok, o.new_logprobs, c.offset)
            c.offset = text_end(lp, c.offset)
        return {"index": c.index, "text": o.new_text, "logprobs": lp, "finish_reason": fr,
                "stop_reason": o.stop_reason if finished else None}

    def _chunk(self, choices: list, usage: dict | None = None, extra: dict | None = None) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.kind == CHAT else "text_completion",
               "created": self.created, "model": self.w.model_name, "choices": choices, **(extra or {})}
        if usage is None and getattr(self, "every_usage", False) and choices:
            usage = _usage(self.children)
        if usage is not None:
            obj["usage"] = usage
        return _sse(obj)


def chosen(children: list[Child], n: int) -> list[Child]:
    """best_of: of each prompt's children keep the n of highest cumulative logprob (vLLM's
    rule), renumbered; with as many children as n, all of them as they are."""
    by_prompt: dict[int, list[Child]] = {}
    for c in children:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    if all(len(g) <= n for g in by_prompt.values()):
        return children
    out = []
    for pi in sorted(by_prompt):
        best = sorted(by_prompt[pi], key=lambda c: -sum(lp.logprob for lp in c.last.outputs[0].logprobs or ()))[:n]
        for c in sorted(best, key=lambda c: c.index):
            out.append(c)
    for i, c in enumerate(out):
        c.index = i
    return out


def _stream_error(e: Exception) -> dict:
    from pdserve.engine.async_engine import EngineDeadError
    if isinstance(e, APIError):
        return error_body(e.status, e.message, e.param)
    if isinstance(e, RequestError):
        return error_body(400, str(e), e.param)
    return error_body(503 if isinstance(e, EngineDeadError) else 500, f"{type(e).__name__}: {e}"[:500])


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
