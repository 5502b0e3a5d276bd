"""The P->D orchestration: pick a decode worker, decide where prefill runs, call the prefill
worker, hand its kv_transfer_params to the decode worker, and give the client one completion.

Retries: a failed prefill call goes to another prefill worker, then to local prefill on the
decode worker; a decode call that fails before it produced anything goes to another decode
worker. Nothing waits forever: every upstream call has a timeout and every failure becomes
an answer or an SSE error event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from pdserve.config import RouterConfig
from pdserve.router.instances import Instance, Pools, health_loop
from pdserve.router.metrics import RouterMetrics
from pdserve.errors import error_body
from pdserve.router.openai_io import (CHAT, SSE_DONE, early_first_token, first_chunk, first_text,
                                      max_tokens, prefill_body, prompt_key, sse)
from pdserve.router.placement import cached_tokens, local_prefill_reason
from pdserve.router.policies import make_policy
from pdserve.router.upstream import ClientError, UpstreamError, post_json, stream_sse

log = logging.getLogger("pdserve.router")

PATHS = {"completions": "/v1/completions", CHAT: "/v1/chat/completions"}


@dataclass
class Job:
    kind: str
    body: dict
    rid: str
    key: list | str | None
    est_tokens: int
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.monotonic)
    tried_decode: set = field(default_factory=set)
    decode_answered: bool = False   # a decode worker answered: it has the KV, P need not be told


@dataclass
class Prefilled:
    inst: Instance
    params: dict     # kv_transfer_params for the decode worker
    text: str        # the first token's text, already computed
    model: str       # the served model's name, for the chunk the router writes itself


class Router:
    def __init__(self, cfg: RouterConfig, health_interval: float = 2.0, request_timeout: float = 600.0,
                 connect_timeout: float = 5.0):
        self.cfg = cfg
        self.health_interval = health_interval
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=request_timeout)
        self.pools = Pools()
        self.policies = {"prefill": make_policy(cfg.policy), "decode": make_policy(cfg.policy)}
        self.metrics = RouterMetrics()
        self.counts = {"remote": 0, "local": 0}
        self.local_reasons: dict[str, int] = {}
        self.token_offset = {"completions": 0.0, CHAT: 0.0}   # learned: real prompt tokens - estimate
        self.pools.on_change.append(self._on_change)
        for url in cfg.prefill:
            self.pools.add(url, "prefill")
        for url in cfg.decode:
            self.pools.add(url, "decode")
        self.session: aiohttp.ClientSession | None = None
        self._health: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        # no per-host connection cap: many concurrent streams to one worker are the normal case
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        self._health = asyncio.create_task(health_loop(self.session, self.pools, self.health_interval,
                                                       timeout=min(5.0, max(1.0, self.health_interval))))

    async def close(self) -> None:
        if self._health:
            self._health.cancel()
        if self.session:
            await self.session.close()

    def _on_change(self, inst: Instance, event: str) -> None:
        if event in ("removed", "up"):  # gone, or back with a cache we know nothing about
            self.policies[inst.role].remove(inst.url)
        if event == "removed":
            self.metrics.forget(inst)

    def headers(self, rid: str) -> dict:
        h = {"X-Request-Id": rid}
        if self.cfg.api_key:
            h["Authorization"] = f"Bearer {self.cfg.api_key}"
        return h

    # ---- choices -----------------------------------------------------------------------
    def _pick(self, role: str, key, exclude: set[str] = frozenset()) -> tuple[Instance, int] | None:
        cands = self.pools.healthy(role, exclude)
        if not cands:
            return None
        loads = {i.url: i.in_flight for i in cands}
        choice = self.policies[role].select([i.url for i in cands], key, loads)
        self.policies[role].record(choice.instance, key)
        return self.pools.instances[choice.instance], choice.matched

    def _local_reason(self, job: Job, matched: int) -> str | None:
        """Why this request should prefill on its decode worker (None: remotely)."""
        return local_prefill_reason(max_tokens(job.kind, job.body), bool(self.pools.healthy("prefill")),
                                    self._prompt_tokens(job), cached_tokens(job.key, matched),
                                    self.cfg.local_prefill_max_tokens)

    def _prompt_tokens(self, job: Job) -> float:
        """The prompt's size in tokens: exact for token ids, else the character estimate plus
        what the workers' answers taught us the estimate misses (a chat template, a system
        prompt: a fixed cost per request that no characters-per-token ratio captures)."""
        if isinstance(job.key, list):
            return job.est_tokens
        return job.est_tokens + self.token_offset[job.kind]

    def _learn(self, job: Job, prompt_tokens) -> None:
        if isinstance(job.key, str) and isinstance(prompt_tokens, int) and prompt_tokens > 0:
            self.token_offset[job.kind] += 0.2 * (prompt_tokens - job.est_tokens - self.token_offset[job.kind])

    def _count(self, where: str, reason: str | None = None) -> None:
        self.counts[where] += 1
        self.metrics.requests.labels(where).inc()
        if reason:
            self.local_reasons[reason] = self.local_reasons.get(reason, 0) + 1
            self.metrics.local_reasons.labels(reason).inc()

    # ---- prefill -----------------------------------------------------------------------
    async def _prefill(self, job: Job) -> Prefilled | None:
        """Run the prefill remotely, on another prefill worker if one fails. None: none could."""
        tried: set[str] = set()
        body = prefill_body(job.kind, job.body)
        while (pick := self._pick("prefill", job.key, tried)) is not None:
            inst = pick[0]
            tried.add(inst.url)
            t = time.monotonic()
            call = asyncio.ensure_future(post_json(self.session, inst, PATHS[job.kind], body,
                                                   self.headers(job.rid), self.timeout))
            try:
                resp = await self._unless_down(inst, asyncio.shield(call), fallback=True)
            except asyncio.CancelledError:
                # the client left mid-prefill, but the prefill worker may finish anyway and hold
                # the KV for a decode worker that never comes: take its answer, release the KV
                self._background(self._release_answer(inst, call, job.rid))
                raise
            except UpstreamError as e:
                call.cancel()
                self._failed(inst, e, "prefill")
                continue
            self.metrics.prefill_time.observe(time.monotonic() - t)
            params = resp.get("kv_transfer_params")
            if not isinstance(params, dict) or not params.get("do_remote_prefill"):
                self._failed(inst, UpstreamError(f"{inst.url} returned no kv_transfer_params", False), "prefill")
                continue
            ids = params.get("prompt_token_ids")
            self._learn(job, len(ids) if isinstance(ids, list) else (resp.get("usage") or {}).get("prompt_tokens"))
            model = resp.get("model") or job.body.get("model") or ""
            return Prefilled(inst, params, first_text(job.kind, resp), model)
        return None

    async def _unless_down(self, inst: Instance, coro, fallback: bool = False):
        """Await coro, but give up when the instance is marked down meanwhile. Only for calls
        whose answer nobody has seen any of (a prefill, a decode not streamed): another
        instance can take them over. One that went down only for answering health checks late
        keeps its calls when no other instance of its role is healthy and the caller has no
        fallback (a prefill has one: the decode worker prefills itself): giving up would turn a
        slow answer on a busy machine into a 503 (seen on 2 cores beside CPU hogs)."""
        call = asyncio.ensure_future(coro)
        down = inst.went_down()
        try:
            await asyncio.wait({call, down}, return_when=asyncio.FIRST_COMPLETED)
            if (not call.done() and inst.late and not fallback
                    and not self.pools.healthy(inst.role, exclude={inst.url})):
                log.info("%s call to %s, which answers health checks late, goes on: no other %s instance "
                         "is healthy", inst.role, inst.url, inst.role)
                await asyncio.wait({call})
        except asyncio.CancelledError:
            call.cancel()   # we are cancelled (client gone): so is the call, which the worker sees
            await asyncio.wait({call})   # finished before anyone closes what it was reading
            raise
        finally:
            inst.forget_waiter(down)
        if not call.done():
            call.cancel()
            await asyncio.wait({call})   # let it close its connection and its in-flight count
            raise UpstreamError(f"{inst.url} went down during the call: {inst.last_error}", down=True)
        return call.result()

    def _failed(self, inst: Instance, e: UpstreamError, stage: str) -> None:
        log.warning("%s call to %s failed: %s", stage, inst.url, e)
        if e.down and inst.healthy:   # already down: its own last_error says why, not ours about it
            inst.mark_down(str(e))
        elif e.down:
            inst.failures += 1
        else:
            inst.last_error, inst.last_error_time = str(e), time.time()
            inst.failures += 1
        self.metrics.retries.labels(stage).inc()

    def _background(self, coro) -> None:
        """Run coro in a task of its own: the handler itself may be what is being cancelled."""
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _release_answer(self, inst: Instance, call: asyncio.Future, rid: str) -> None:
        try:
            resp = await call
        except Exception:
            return   # no answer, no KV held
        params = resp.get("kv_transfer_params") if isinstance(resp, dict) else None
        if isinstance(params, dict) and params.get("do_remote_prefill"):
            await self.release(Prefilled(inst, params, "", ""), rid)

    async def release(self, pre: Prefilled, rid: str) -> None:
        """Tell a prefill worker nobody will pull its held blocks (client gone, no decoder)."""
        body = {"request_id": pre.params.get("remote_request_id", rid), "kv_token": pre.params.get("kv_token")}
        try:
            async with self.session.post(pre.inst.url + "/v1/kv/release", json=body, headers=self.headers(rid),
                                         timeout=aiohttp.ClientTimeout(total=5)) as r:
                await r.read()
        except Exception as e:  # best effort: the worker's abort timeout frees them anyway
            log.info("release on %s failed: %r", pre.inst.url, e)

    # ---- one request -------------------------------------------------------------------
    async def handle(self, request: web.Request, kind: str, body: dict) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        if body.get("kv_transfer_params") is not None:
            # a contract between pdserve's processes: a client's own would have a decode worker
            # pull whatever KV a host it names sends, into its prefix cache
            return web.json_response(error_body(400, "kv_transfer_params are set by the router, not by clients",
                                                param="kv_transfer_params"),
                                     status=400, headers={"X-Request-Id": rid})
        key, est = prompt_key(kind, body)
        job = Job(kind, body, rid, key, est, ("chatcmpl-" if kind == CHAT else "cmpl-") + rid)
        self.metrics.running.inc()
        pre: Prefilled | None = None
        assigned: Instance | None = None
        try:
            pick = self._pick("decode", key)
            if pick is None:
                n = len(self.pools.of_role("decode"))
                raise ClientError.of(503, f"no healthy decode instance ({n} known, all down; see /status)"
                                     if n else "no decode instance: add one with POST /instances")
            dec, matched = pick
            dec.assigned += 1   # from now on: a drain of `dec` waits for this request (prefill included)
            assigned = dec
            reason = self._local_reason(job, matched)
            if reason is None:
                pre = await self._prefill(job)
                if pre is None:
                    reason = "prefill_failed"
            self._count("local" if reason else "remote", reason)
            job.tried_decode.add(dec.url)
            if body.get("stream"):
                resp = await self._stream(request, job, dec, pre)
            else:
                resp = await self._json(job, dec, pre)
            return resp
        except ClientError as e:
            self.metrics.errors.labels(str(e.status)).inc()
            return web.json_response(e.body, status=e.status, headers={"X-Request-Id": rid})
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.aborts.inc()
            raise
        finally:
            if assigned is not None:
                assigned.assigned -= 1
            self.metrics.running.dec()
            self.metrics.e2e.observe(time.monotonic() - job.t0)
            if pre is not None and not job.decode_answered:
                self._background(self.release(pre, rid))

    def _decode_body(self, job: Job, pre: Prefilled | None, first_token_sent: bool = False) -> dict:
        """The client's body plus the prefill's params; with first_token_sent (the client has
        the first token from us) the decode worker's answer starts after it."""
        if pre is None:
            return job.body
        return {**job.body, "kv_transfer_params": {**pre.params, "first_token_sent": True} if first_token_sent
                else pre.params}

    def _next_decode(self, job: Job, inst: Instance, e: UpstreamError) -> Instance:
        self._failed(inst, e, "decode")
        pick = self._pick("decode", job.key, job.tried_decode)
        if pick is None:
            raise ClientError.of(503, f"decode failed and no other decode instance is healthy: {e}")
        job.tried_decode.add(pick[0].url)
        return pick[0]

    async def _json(self, job: Job, dec: Instance, pre: Prefilled | None) -> web.Response:
        body = self._decode_body(job, pre)
        while True:
            try:
                # nothing reached the client yet: if this worker is marked down, another takes over
                out = await self._unless_down(dec, post_json(self.session, dec, PATHS[job.kind], body,
                                                             self.headers(job.rid), self.timeout))
                job.decode_answered = True
                break
            except UpstreamError as e:
                dec = self._next_decode(job, dec, e)
        out["id"] = job.id
        out.pop("kv_transfer_params", None)
        self._learn(job, (out.get("usage") or {}).get("prompt_tokens"))
        return web.json_response(out, headers={"X-Request-Id": job.rid})

    async def _stream(self, request: web.Request, job: Job, dec: Instance, pre: Prefilled | None):
        out = SSEOut(request, job.rid)
        sent = False
        # pre.text is empty when the first token is half a character: the decode worker's text has it whole
        if pre is not None and pre.text and early_first_token(job.kind, job.body):
            await out.send(sse(first_chunk(job.kind, job.id, job.created, pre.model, pre.text)))
            self.metrics.ttft.observe(time.monotonic() - job.t0)
            sent = True
        body = self._decode_body(job, pre, sent)
        produced = False
        while True:
            relay = Relay(job.id)
            try:
                async with aclosing(stream_sse(self.session, dec, PATHS[job.kind], body, self.headers(job.rid),
                                               self.timeout)) as batches:
                    while True:
                        nxt = batches.__anext__()
                        try:   # until it produced something, a hung worker is as good as a failed one
                            batch = await (nxt if produced else self._unless_down(dec, nxt))
                        except StopAsyncIteration:
                            break
                        job.decode_answered = True
                        data, finished = relay.convert(batch)
                        if data:
                            if not out.started:
                                self.metrics.ttft.observe(time.monotonic() - job.t0)
                            produced = True
                            await out.send(data)
                        if finished:
                            return await out.finish()
                return await out.finish()
            except ClientError as e:   # the decode worker refused the request
                if not out.started:
                    raise
                # the client has the prefill's first token and a 200: an HTTP status cannot follow
                await out.send(sse(e.body) + SSE_DONE)
                return await out.finish()
            except UpstreamError as e:
                if produced:  # the client already has part of this worker's answer
                    self._failed(dec, e, "decode")
                    await out.send(sse(error_body(503, f"decode worker failed mid-stream: {e}")) + SSE_DONE)
                    return await out.finish()
                try:
                    dec = self._next_decode(job, dec, e)
                except ClientError as ce:
                    if not out.started:
                        raise
                    await out.send(sse(ce.body) + SSE_DONE)
                    return await out.finish()
            except Exception as e:   # a bug of ours: still an answer the client can read
                if not out.started:
                    raise
                log.exception("stream %s failed", job.rid)
                await out.send(sse(error_body(500, f"router error: {type(e).__name__}: {e}"[:500])) + SSE_DONE)
                return await out.finish()


class Relay:
    """A decode worker's events, made part of the client's one completion: our id. (A decode
    worker told first_token_sent starts after the token the client has.)"""

    def __init__(self, id_: str):
        self.id = id_
        self.swap: tuple[bytes, bytes] | None = None   # (worker's id, ours) as JSON, once that is all to edit

    def convert(self, batch: list[bytes | None]) -> tuple[bytes, bool]:
        """(bytes for the client, whether the stream is over) for one batch of payloads."""
        parts = []
        for data in batch:
            if data is None:
                parts.append(SSE_DONE)
                return b"".join(parts), True
            if data.startswith(b'{"error"'):   # the worker's own in-stream error: the client's answer
                parts.append(b"data: " + data + b"\n\n" + SSE_DONE)
                return b"".join(parts), True
            if self.swap is not None and self.swap[0] in data:   # hot path: no JSON round trip
                parts.append(b"data: " + data.replace(self.swap[0], self.swap[1], 1) + b"\n\n")
                continue
            ev = json.loads(data)
            worker_id, ev["id"] = ev.get("id"), self.id
            parts.append(sse(ev))
            if isinstance(worker_id, str):
                self.swap = (json.dumps(worker_id).encode(), json.dumps(self.id).encode())
        return b"".join(parts), False


class SSEOut:
    """The client's event stream, opened on the first write so that a request that fails before
    anything was sent still gets a plain HTTP error status."""

    def __init__(self, request: web.Request, rid: str):
        self.request, self.rid = request, rid
        self.resp: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.resp is not None

    async def send(self, data: bytes) -> None:
        if self.resp is None:
            self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                    "X-Request-Id": self.rid})
            await self.resp.prepare(self.request)
        await self.resp.write(data)

    async def finish(self) -> web.StreamResponse:
        if self.resp is None:
            await self.send(SSE_DONE)
        await self.resp.write_eof()
        return self.resp
