"""KVConnector: ties one engine to the KV hand-off, as producer, consumer or both.

Producer (role prefill/both): the engine tells the connector, on its own thread as it happens,
which blocks a remote-decode request holds after its first token (`on_held`) and when they
are freed (`on_held_freed`). `export()` turns them into kv_transfer_params with a one-time
token and `authorize()` lets one puller read them, both without waiting for the engine's step
in flight; the KV server serves the blocks to an authenticated peer presenting the token, and
frees them on `done`. The scheduler owns the hold and its lease (`kv_lease_duration`): it
frees the blocks when the lease runs out, unless a pull is reading them right now; `renew`
(sent by the decode side while the request waits for or runs its pull) extends the lease.
Consumer (role decode/both): `expect()` registers a request's params; when the engine has
allocated its blocks it calls `_on_kv_load`, and a pull thread (one per loading request, so
a slow peer holds up only its own) fetches only the blocks beyond the local prefix-cache hit.
Nothing the pull wrote is registered in the prefix cache unless the pull succeeded.
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
from pdserve.errors import RequestError
from pdserve.kv import auth, tls as kv_tls
from pdserve.kv.client import KVClient
from pdserve.kv.cuda_ipc import export_pool
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import PARAM, RemotePrefill
from pdserve.kv.select import check_consumer, producer_offers
from pdserve.kv.server import KVServer
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id

log = logging.getLogger("pdserve.kv")


UNTRACKED = object()   # a reader that is no KV connection (a direct call): its own `done` ends it


@dataclass
class _Grant:
    token: str
    block_ids: frozenset
    pulled: bool = False           # a pull has started: a second one (a retried request) is refused
    reader: object = None          # the KV connection reading the blocks right now
    release_pending: bool = False  # `done` came from elsewhere mid-read: free when the read ends


class KVConnector:
    def __init__(self, async_engine, config: KVTransferConfig, host: str = "127.0.0.1",
                 shm_allocator=None, advertise_host: str | None = None, api_key: str | None = None):
        self.async_engine = engine_ = async_engine
        engine = engine_.engine
        self.config = config
        self.role = engine.config.role
        self.spec = KVSpec.from_engine(engine)
        self.pool = BlockPool(engine.runner.kv_cache)
        self.engine_id = uuid.uuid4().hex
        self.lease = engine.config.kv_lease_duration
        self.secret = auth.resolve_secret(config.kv_secret, api_key)
        self.clock = time.monotonic   # consumer: when leases were last renewed (tests inject one)
        self.shm_allocator = shm_allocator
        # on_event(kind, **fields): the server's metrics listen here (kv knows no Prometheus)
        self.on_event: Callable[..., None] = lambda kind, **kw: None
        self._lock = threading.Lock()
        self.grants: dict[str, _Grant] = {}
        self.held_blocks: dict[str, list[int]] = {}   # request id -> blocks the engine holds for it
        self.expected: dict[str, RemotePrefill] = {}   # waiting for blocks to pull into
        self.pulling: dict[str, RemotePrefill] = {}    # pull in flight
        self._renewed: dict[str, float] = {}           # request id -> last lease renewal (self.clock)
        self._closed = threading.Event()
        self.server = self.client = None
        if self.role in ("prefill", "both"):
            dev = self.pool.kv.device.type
            shm_desc = shm_allocator.describe() if shm_allocator is not None else None
            self.offers = producer_offers(config.kv_transport, dev, shm_desc is not None, dev == "cuda")
            self.hello = {"ok": True, "spec": self.spec.to_dict(), "engine_id": self.engine_id,
                          "host_id": host_id(), "transports": self.offers, "shm": shm_desc,
                          "cuda_ipc": export_pool(self.pool.kv) if "cuda_ipc" in self.offers else None}
            engine.held_observer = self
            self.server = KVServer(self, config.kv_host or host, config.kv_port, self.secret,
                                   config.kv_max_connections, tls=kv_tls.server_context(config)).start()
            # a wildcard bind is not an address a decode worker can dial: name this host instead
            bound = self.server.host
            self.advertise_host = advertise_host or (socket.getfqdn() if bound in ("0.0.0.0", "::", "") else bound)
        if self.role in ("decode", "both"):
            check_consumer(config.kv_transport, self.pool.kv.device.type)
            self.client = KVClient(self.spec, self.pool, config.kv_transport, config.kv_pull_timeout,
                                   self.secret, auth.parse_peers(config.kv_allowed_peers),
                                   tls=kv_tls.client_context(config))
            # a thread per loading request (at most max_num_seqs load at once): a slow peer
            # holds its own pull until the deadline, never another request's
            self._pulls = concurrent.futures.ThreadPoolExecutor(engine.config.max_num_seqs + 1,
                                                                thread_name_prefix="pdserve-kv-pull")
            engine.on_kv_load = self._on_kv_load
            if self.secret is None and config.kv_allowed_peers is None:
                log.warning("no KV secret (--kv-secret, $PDSERVE_KV_SECRET or --api-key): this worker pulls KV "
                            "only from loopback peers (or --kv-allowed-peers)")
            threading.Thread(target=self._renew_loop, name="pdserve-kv-lease", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
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
        """Engine thread, the lease ran out: keep the blocks only while a pull reads them.
        Otherwise the grant goes in the same locked step, so no pull can start on freed blocks."""
        with self._lock:
            g = self.grants.get(request_id)
            if g is not None and g.reader is not None:
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
                self.grants[request_id] = _Grant(token, frozenset(blocks))
        if not blocks:
            raise RuntimeError(f"request {request_id} holds no KV blocks to hand off")
        return RemotePrefill(self.engine_id, self.advertise_host, self.server.port, blocks, request_id,
                             token, first_token_id, list(prompt_token_ids), list(self.offers),
                             self.lease, first_logprob, prompt_logprobs).to_params()

    def hello_reply(self, remote_spec: dict) -> dict:
        """The offer for one authenticated peer (its shm ticket is its own)."""
        self.spec.check(remote_spec, ("prefill worker", "decode worker"))
        if self.hello.get("shm") and self.shm_allocator is not None:
            return {**self.hello, "shm": self.shm_allocator.describe_for_peer()}
        return self.hello

    def _grant(self, request_id: str, token: str) -> _Grant | None:
        """The grant, if the token is its own. Grants live exactly as long as the scheduler
        holds the blocks (on_held_freed, keep_held): no clock of their own."""
        with self._lock:
            g = self.grants.get(request_id)
        if g is None or not hmac.compare_digest(g.token, token):
            return None
        return g

    def authorize(self, request_id: str, token: str, block_ids, reader: object = None) -> str | None:
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
            # happen while a second one still reads them; a grant being read also keeps the
            # lease from freeing them mid-read (keep_held)
            if g.pulled:
                return f"the KV of request {request_id!r} is already being pulled"
            g.pulled, g.reader = True, reader if reader is not None else UNTRACKED
        return None

    def unclaim(self, reader: object, request_id: str | None = None) -> None:
        """KV server: `reader` no longer reads (its send ended, or its connection closed). A
        `done` that came meanwhile from elsewhere takes effect now."""
        release = []
        with self._lock:
            for rid, g in self.grants.items():
                if g.reader is reader and (request_id is None or rid == request_id):
                    g.reader = None
                    if g.release_pending:
                        release.append(rid)
            for rid in release:
                del self.grants[rid]
        for rid in release:
            self.async_engine.release(rid)

    def done(self, request_id: str, token: str, reader: object = None) -> bool:
        """The consumer has the blocks (or gave up on them): free them. One-time: the token
        is spent. Never under a pull still reading them (a release from the router, say):
        then they go when that read ends."""
        g = self._grant(request_id, token)
        if g is None:
            return False
        with self._lock:
            if g.reader not in (None, reader, UNTRACKED):
                g.release_pending = True
                return True
            self.grants.pop(request_id, None)
        self.async_engine.release(request_id)
        return True

    def renew(self, request_id: str, token: str) -> bool:
        """A decode worker still wants these blocks: the scheduler restarts their lease."""
        if self._grant(request_id, token) is None:
            return False
        self.async_engine.call(lambda e: e.renew_held(request_id))
        return True

    def served(self, nbytes: int, seconds: float, transport: str) -> None:
        self.on_event("served", nbytes=nbytes, seconds=seconds, transport=transport)

    # ---- consumer ---------------------------------------------------------------------
    def expect(self, request_id: str, rp: RemotePrefill) -> None:
        if self.client is None:
            raise RequestError(f"this worker has role {self.role} and cannot continue a remote prefill", PARAM)
        with self._lock:
            self.expected[request_id] = rp
            self._renewed[request_id] = self.clock()   # the producer's lease has just begun

    def forget(self, request_id: str) -> None:
        """The request ended before its pull started (e.g. client gone): release the remote KV."""
        with self._lock:
            rp = self.expected.pop(request_id, None)
            if rp is not None:
                self._renewed.pop(request_id, None)
        if rp is not None:
            self._pulls.submit(self.client.release, rp)

    def renew_leases(self) -> int:
        """Extend the producers' leases on every request that waits for its pull or runs it,
        once a third of its lease has passed since the last renewal (as vLLM's heartbeat).
        Returns how many were renewed. The lease thread calls this every second."""
        now, due = self.clock(), {}
        with self._lock:
            for rid, rp in (*self.expected.items(), *self.pulling.items()):
                if now - self._renewed.get(rid, now) >= rp.lease / 3:
                    self._renewed[rid] = now
                    due.setdefault((rp.host, rp.port), []).append(rp)
        for rps in due.values():
            self.client.renew(rps)
        return sum(len(v) for v in due.values())

    def _renew_loop(self) -> None:
        while not self._closed.wait(1.0):
            try:
                self.renew_leases()
            except Exception:
                log.exception("renewing KV leases failed")

    def _on_kv_load(self, seq) -> None:
        """Engine thread: seq's blocks are allocated; fetch the ones the prefix cache lacks."""
        rid = seq.request_id
        with self._lock:
            rp = self.expected.pop(rid, None)
            if rp is not None:
                self.pulling[rid] = rp
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
        finally:
            with self._lock:
                self.pulling.pop(rid, None)
                self._renewed.pop(rid, None)

        def finish(engine):
            engine.finish_kv_load(rid, ok, error)
            engine.block_manager.unpin(dst)
        self.async_engine.call(finish)
