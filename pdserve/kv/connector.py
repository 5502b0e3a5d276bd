"""KVConnector: ties one engine to the KV hand-off, as producer, consumer or both.

Producer (role prefill/both): the engine tells the connector, on its own thread as it happens,
which blocks a remote-decode request holds after its first token (`on_held`) and when they
are freed (`on_held_freed`). `export()` turns them into kv_transfer_params with a one-time
token and `authorize()` lets one puller read them, both without waiting for the engine's step
in flight; the KV server serves the blocks to whoever presents the token, and frees them on
`done` (or the engine does after its abort timeout, unless a pull is reading them).
Consumer (role decode/both): `expect()` registers a request's params; when the engine has
allocated its blocks it calls `_on_kv_load`, and a pull thread fetches only the blocks beyond
the local prefix-cache hit.
"""
from __future__ import annotations

import concurrent.futures
import hmac
import logging
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from pdserve.config import KVTransferConfig
from pdserve.engine.engine import RequestError
from pdserve.kv.client import KVClient
from pdserve.kv.cuda_ipc import export_pool
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import PARAM, RemotePrefill
from pdserve.kv.select import check_consumer, producer_offers
from pdserve.kv.server import KVServer
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id

log = logging.getLogger("pdserve.kv")


@dataclass
class _Grant:
    token: str
    block_ids: frozenset
    expires: float
    claimed: bool = False   # a pull has started: a second one (a retried request) is refused


class KVConnector:
    def __init__(self, async_engine, config: KVTransferConfig, host: str = "127.0.0.1",
                 shm_allocator=None, advertise_host: str | None = None):
        self.async_engine = engine_ = async_engine
        engine = engine_.engine
        self.config = config
        self.role = engine.config.role
        self.spec = KVSpec.from_engine(engine)
        self.pool = BlockPool(engine.runner.kv_cache)
        self.engine_id = uuid.uuid4().hex
        self.abort_timeout = engine.config.kv_abort_timeout
        # on_event(kind, **fields): the server's metrics listen here (kv knows no Prometheus)
        self.on_event: Callable[..., None] = lambda kind, **kw: None
        self._lock = threading.Lock()
        self.grants: dict[str, _Grant] = {}
        self.held_blocks: dict[str, list[int]] = {}   # request id -> blocks the engine holds for it
        self.expected: dict[str, RemotePrefill] = {}
        self.server = self.client = None
        if self.role in ("prefill", "both"):
            dev = self.pool.kv.device.type
            shm_desc = shm_allocator.describe() if shm_allocator is not None else None
            self.offers = producer_offers(config.kv_transport, dev, shm_desc is not None, dev == "cuda")
            self.hello = {"ok": True, "spec": self.spec.to_dict(), "engine_id": self.engine_id,
                          "host_id": host_id(), "transports": self.offers, "shm": shm_desc,
                          "cuda_ipc": export_pool(self.pool.kv) if "cuda_ipc" in self.offers else None}
            engine.held_observer = self
            self.server = KVServer(self, config.kv_host or host, config.kv_port).start()
            # a wildcard bind is not an address a decode worker can dial: name this host instead
            bound = self.server.host
            self.advertise_host = advertise_host or (socket.getfqdn() if bound in ("0.0.0.0", "::", "") else bound)
        if self.role in ("decode", "both"):
            check_consumer(config.kv_transport, self.pool.kv.device.type)
            self.client = KVClient(self.spec, self.pool, config.kv_transport, config.kv_pull_timeout)
            self._pulls = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pdserve-kv-pull")
            engine.on_kv_load = self._on_kv_load

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self._pulls.shutdown(wait=False, cancel_futures=True)
            self.client.close()

    # ---- producer ---------------------------------------------------------------------
    def on_held(self, seq) -> None:
        """Engine thread: seq's first token exists and its blocks are held for a decode worker."""
        with self._lock:
            self.held_blocks[seq.request_id] = list(seq.block_table)

    def on_held_freed(self, request_id: str) -> None:
        """Engine thread: the held blocks are gone (released, aborted, expired): no grant outlives them."""
        with self._lock:
            self.held_blocks.pop(request_id, None)
            self.grants.pop(request_id, None)

    def keep_held(self, request_id: str) -> bool:
        """Engine thread, the abort clock ran out: keep the blocks only while a pull reads them.
        Otherwise the grant goes in the same locked step, so no pull can start on freed blocks."""
        with self._lock:
            g = self.grants.get(request_id)
            if g is not None and g.claimed:
                return True
            self.grants.pop(request_id, None)
            self.held_blocks.pop(request_id, None)
            return False

    def export(self, request_id: str, first_token_id: int, prompt_token_ids: list[int],
               first_logprob=None, prompt_logprobs=None) -> dict:
        """kv_transfer_params for a finished remote-decode request whose blocks are held."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            blocks = self.held_blocks.get(request_id)
            if blocks:
                self.grants[request_id] = _Grant(token, frozenset(blocks), time.monotonic() + self.abort_timeout)
        if not blocks:
            raise RuntimeError(f"request {request_id} holds no KV blocks to hand off")
        return RemotePrefill(self.engine_id, self.advertise_host, self.server.port, blocks, request_id,
                             token, first_token_id, list(prompt_token_ids), list(self.offers),
                             first_logprob, prompt_logprobs).to_params()

    def hello_reply(self, remote_spec: dict) -> dict:
        self.spec.check(remote_spec, ("prefill worker", "decode worker"))
        return self.hello

    def _grant(self, request_id: str, token: str) -> _Grant | None:
        with self._lock:
            now = time.monotonic()
            for rid in [r for r, g in self.grants.items() if g.expires < now and not g.claimed]:
                del self.grants[rid]   # the engine has freed (or will free) these blocks
            g = self.grants.get(request_id)
        if g is None or not hmac.compare_digest(g.token, token):
            return None
        return g

    def authorize(self, request_id: str, token: str, block_ids) -> str | None:
        """None if the caller may read these blocks now, else why not."""
        g = self._grant(request_id, token)
        if g is None:
            return f"no KV is held for request {request_id!r} under this token (expired, released or wrong token)"
        if not isinstance(block_ids, list) or not set(block_ids) <= g.block_ids:
            return "the requested blocks are not the ones held for this request"
        with self._lock:
            if self.grants.get(request_id) is not g or request_id not in self.held_blocks:
                return f"the KV of request {request_id!r} was already freed"
            # one pull per grant: the first puller's `done` frees the blocks, which must not
            # happen while a second one still reads them; a claimed grant also keeps the
            # engine's abort clock from freeing them mid-read (keep_held)
            if g.claimed:
                return f"the KV of request {request_id!r} is already being pulled"
            g.claimed = True
        return None

    def done(self, request_id: str, token: str) -> bool:
        """The consumer has the blocks (or gave up on them): free them. One-time: the token
        is spent."""
        if self._grant(request_id, token) is None:
            return False
        with self._lock:
            self.grants.pop(request_id, None)
        self.async_engine.release(request_id)
        return True

    def served(self, nbytes: int, seconds: float, transport: str) -> None:
        self.on_event("served", nbytes=nbytes, seconds=seconds, transport=transport)

    # ---- consumer ---------------------------------------------------------------------
    def expect(self, request_id: str, rp: RemotePrefill) -> None:
        if self.client is None:
            raise RequestError(f"this worker has role {self.role} and cannot continue a remote prefill", PARAM)
        with self._lock:
            self.expected[request_id] = rp

    def forget(self, request_id: str) -> None:
        """The request ended before its pull started (e.g. client gone): release the remote KV."""
        with self._lock:
            rp = self.expected.pop(request_id, None)
        if rp is not None:
            self._pulls.submit(self.client.release, rp)

    def _on_kv_load(self, seq) -> None:
        """Engine thread: seq's blocks are allocated; fetch the ones the prefix cache lacks."""
        rid = seq.request_id
        with self._lock:
            rp = self.expected.pop(rid, None)
        if rp is None:  # not ours (should not happen): let the engine prefill it
            self.async_engine.call(lambda e: e.finish_kv_load(rid, False))
            return
        start = seq.num_cached_tokens // self.spec.block_size
        dst = seq.block_table[start:len(rp.block_ids)]
        src = rp.block_ids[start:]
        # pin the destination blocks: if the request is aborted mid-pull they must not be
        # handed to another request while the pull still writes into them
        self.async_engine.engine.block_manager.pin(dst)
        self._pulls.submit(self._pull, rid, rp, src, dst)

    def _pull(self, rid: str, rp: RemotePrefill, src: list[int], dst: list[int]) -> None:
        ok, error, t0 = True, None, time.perf_counter()
        try:
            nbytes, transport = self.client.pull(rp, src, dst)
            self.on_event("pulled", nbytes=nbytes, seconds=time.perf_counter() - t0, blocks=len(src),
                          transport=transport)
        except Exception as e:
            ok = False
            where = f"{rp.host}:{rp.port}"
            self.on_event("failed", reason=type(e).__name__)
            if isinstance(e, KVHandshakeError):  # a misconfiguration, not a transient fault
                error = str(e)
            elif self.config.kv_load_failure_policy == "fail":
                error = f"KV transfer from the prefill worker at {where} failed: {e} (kv_load_failure_policy=fail)"
            log.warning("KV pull for %s from %s failed (%s): %s", rid, where,
                        "failing the request" if error else "recomputing locally", e)
            self.client.release(rp)

        def finish(engine):
            engine.finish_kv_load(rid, ok, error)
            engine.block_manager.unpin(dst)
        self.async_engine.call(finish)
