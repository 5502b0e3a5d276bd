"""KVConnector: ties one engine to the KV hand-off, as producer, consumer or both; the two
sides of kv/base.py's interface over a Transport (kv/sockets.py unless one is given).

Producer (role prefill/both): when the scheduler holds a remote-decode request's blocks after
its first token, `request_finished` (engine thread, in the step) makes a grant (a one-time
token for exactly those blocks) and the kv_transfer_params that name it; the transport serves
the blocks to an authenticated peer presenting the token (`authorize`), without waiting for the
engine's step in flight, and its `done` asks the scheduler to free them. The scheduler owns the
hold and its lease (`kv_lease_duration`): it frees the blocks when the lease runs out, unless a
pull is reading them right now (`keep_held`); `renew` (sent by the decode side while the
request waits for or runs its pull) restarts the lease. A grant lives exactly as long as its hold.
Consumer (role decode/both): a request that arrives with remote-prefill params is leased from
its producer (`add_request`; renewed every third of the lease); once its blocks are allocated
(`update_state_after_alloc`) a pull thread (one per loading request, so a slow peer holds up
only its own) fetches only the blocks beyond the local prefix-cache hit. Nothing the pull wrote
is registered in the prefix cache unless the pull succeeded.
What finished (holds done with, leases renewed, loads ended) is queued for the engine core's
next step (`get_finished`), and `wake` makes an idle engine take that step.
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
from dataclasses import dataclass, field
from typing import Callable

from pdserve.config import KVTransferConfig
from pdserve.cpu_threads import one_openmp_thread
from pdserve.kv import auth, heads
from pdserve.kv.base import KVEvents, Transport
from pdserve.kv.cuda_ipc import export_pool
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.select import check_consumer, producer_offers
from pdserve.kv.sockets import SocketTransport
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id

log = logging.getLogger("pdserve.kv")


UNTRACKED = object()   # a reader that is no KV connection (a direct call): its own `done` ends it


@dataclass
class _Grant:
    token: str
    block_ids: frozenset
    # a pull has started in `parts` parallel parts (one per decode rank's connection); each part
    # index is claimed once, a retried request's pull is refused
    parts: int | None = None
    claimed: set = field(default_factory=set)
    readers: set = field(default_factory=set)   # the KV connections reading the blocks right now
    release_pending: bool = False  # `done` came from elsewhere mid-read: free when the reads end


@dataclass
class _Lease:
    rp: RemotePrefill
    renewed: float                 # when it was last renewed (connector.clock)
    pulling: bool = False


class KVConnector:
    def __init__(self, engine, config: KVTransferConfig, host: str = "127.0.0.1",
                 shm_allocator=None, advertise_host: str | None = None, api_key: str | None = None,
                 wake: Callable[[], None] | None = None, transport: Transport | None = None):
        self.config = config
        self.role = engine.config.role
        self.spec = KVSpec.from_engine(engine)
        self.pool = BlockPool(engine.runner.kv_cache, engine.runner.rank_pools,
                              heads.layout_of(engine.config.tensor_parallel_size, self.spec.num_kv_heads))
        self.engine_id = uuid.uuid4().hex
        self.lease = engine.config.kv_lease_duration
        self.secret = auth.resolve_secret(config.kv_secret, api_key)
        self.clock = time.monotonic   # consumer: when leases were last renewed (tests inject one)
        self.shm_allocator = shm_allocator
        self.wake = wake or (lambda: None)   # an idle engine loop steps, and takes get_finished()
        # on_event(kind, **fields): the server's metrics listen here (kv knows no Prometheus)
        self.on_event: Callable[..., None] = lambda kind, **kw: None
        self.produces = self.role in ("prefill", "both")
        self.consumes = consumes = self.role in ("decode", "both")
        self._lock = threading.Lock()
        self.grants: dict[str, _Grant] = {}      # producer: request id -> what its hold lets a puller read
        self.leases: dict[str, _Lease] = {}      # consumer: request id -> the remote KV it waits for or pulls
        self._events = KVEvents()
        self._closed = threading.Event()
        if consumes:
            check_consumer(config.kv_transport, self.pool.kv.device.type)
        self.transport = transport or SocketTransport(config, self.spec, self.pool, self.secret, host, consumes)
        self.host = self.port = None
        if self.produces:
            dev = self.pool.kv.device.type
            shm_desc = shm_allocator.describe() if shm_allocator is not None else None
            self.offers = producer_offers(config.kv_transport, dev, shm_desc is not None, dev == "cuda")
            self.hello = {"ok": True, "spec": self.spec.to_dict(), "engine_id": self.engine_id,
                          "host_id": host_id(), "transports": self.offers, "shm": shm_desc,
                          "tp": heads.to_wire(self.pool.heads),
                          "cuda_ipc": [export_pool(self.pool.kv), *engine.runner.rank_ipc] if "cuda_ipc" in self.offers else None}
            self.host, self.port = self.transport.serve(self)
            # a wildcard bind is not an address a decode worker can dial: name this host instead
            self.advertise_host = advertise_host or (socket.getfqdn() if self.host in ("0.0.0.0", "::", "") else self.host)
        if consumes:
            # a thread per loading request (at most max_num_seqs load at once): a slow peer
            # holds its own pull until the deadline, never another request's
            self._pulls = concurrent.futures.ThreadPoolExecutor(engine.config.max_num_seqs + 1,
                                                                thread_name_prefix="pdserve-kv-pull",
                                                                initializer=one_openmp_thread)
            if self.secret is None and config.kv_allowed_peers is None:
                log.warning("no KV secret (--kv-secret, $PDSERVE_KV_SECRET or --api-key): this worker pulls KV "
                            "only from loopback peers (or --kv-allowed-peers)")
            threading.Thread(target=self._renew_loop, name="pdserve-kv-lease", daemon=True).start()
        engine.core.connector = self

    def close(self) -> None:
        self._closed.set()
        if self.consumes:
            self._pulls.shutdown(wait=False, cancel_futures=True)
        self.transport.close()

    def get_finished(self) -> KVEvents:
        """Engine thread, each step: what the transport finished since the last call."""
        with self._lock:
            ev, self._events = self._events, KVEvents()
        return ev

    def _report(self, kind: str, item) -> None:
        with self._lock:
            getattr(self._events, kind).append(item)
        self.wake()

    # ---- producer: scheduler side -------------------------------------------------------
    def request_finished(self, seq, first_logprob=None, prompt_logprobs=None) -> dict:
        """Engine thread: seq's first token exists and the scheduler holds its blocks for a
        decode worker. The grant exists before the outputs leave: a pull needs no step boundary."""
        rid, blocks = seq.request_id, list(seq.block_table)
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.grants[rid] = _Grant(token, frozenset(blocks))
        return RemotePrefill(self.engine_id, self.advertise_host, self.port, blocks, rid, token,
                             seq.token_ids[seq.num_prompt_tokens], list(seq.prompt_token_ids), list(self.offers),
                             self.lease, first_logprob, prompt_logprobs, tp_size=len(self.pool.heads)).to_params()

    def request_freed(self, request_id: str) -> None:
        """Engine thread: the held blocks are gone (released, aborted): no grant outlives them."""
        with self._lock:
            self.grants.pop(request_id, None)

    def keep_held(self, request_id: str) -> bool:
        """Engine thread, the lease ran out: keep the blocks only while a pull reads them.
        Otherwise the grant goes in the same locked step, so no pull can start on freed blocks."""
        with self._lock:
            g = self.grants.get(request_id)
            if g is not None and g.readers:
                return True
            self.grants.pop(request_id, None)
            return False

    # ---- producer: worker side (KV server threads) --------------------------------------
    def hello_reply(self, remote_spec: dict, remote_tp=None) -> dict:
        """The offer for one authenticated peer (its shm ticket is its own), if its KV spec is
        ours and its tensor-parallel layout can be filled from ours (kv/heads.py)."""
        self.spec.check(remote_spec, ("prefill worker", "decode worker"))
        heads.plan(self.pool.heads, heads.from_wire(remote_tp, self.spec.num_kv_heads, "decode worker"))
        if self.hello.get("shm") and self.shm_allocator is not None:
            return {**self.hello, "shm": self.shm_allocator.describe_for_peer()}
        return self.hello

    def _grant(self, request_id: str, token: str) -> _Grant | None:
        """The grant, if the token is its own."""
        with self._lock:
            g = self.grants.get(request_id)
        if g is None or not hmac.compare_digest(g.token, token):
            return None
        return g

    def authorize(self, request_id: str, token: str, block_ids, reader: object = None,
                  part: tuple[int, int] = (0, 1)) -> str | None:
        """None if the caller may read these blocks now, else why not. A pull may come in
        `part[1]` parallel parts (one connection per decode rank); each part is allowed once."""
        g = self._grant(request_id, token)
        if g is None:
            return f"no KV is held for request {request_id!r} under this token (expired, released or wrong token)"
        if not isinstance(block_ids, list) or not set(block_ids) <= g.block_ids:
            return "the requested blocks are not the ones held for this request"
        i, n = part
        with self._lock:
            if self.grants.get(request_id) is not g:
                return f"the KV of request {request_id!r} was already freed"
            # one pull per grant: the puller's `done` frees the blocks, which must not happen while
            # another (a retried request) still reads them; a grant being read also keeps the lease
            # from freeing them mid-read (keep_held)
            if (g.parts is not None and g.parts != n) or i in g.claimed or not 0 <= i < n:
                return f"the KV of request {request_id!r} is already being pulled"
            g.parts = n
            g.claimed.add(i)
            g.readers.add(reader if reader is not None else UNTRACKED)
        return None

    def unclaim(self, reader: object, request_id: str | None = None) -> None:
        """KV server: `reader` no longer reads (its send ended, or its connection closed). A
        `done` that came meanwhile from elsewhere takes effect when the last reader is gone."""
        release = []
        with self._lock:
            for rid, g in self.grants.items():
                if reader in g.readers and (request_id is None or rid == request_id):
                    g.readers.discard(reader)
                    if g.release_pending and not g.readers:
                        release.append(rid)
            for rid in release:
                del self.grants[rid]
        for rid in release:
            self._report("sent", rid)

    def done(self, request_id: str, token: str, reader: object = None) -> bool:
        """The consumer has the blocks (or gave up on them): free them. One-time: the token
        is spent. Never under a pull still reading them (a release from the router, say):
        then they go when that read ends."""
        g = self._grant(request_id, token)
        if g is None:
            return False
        with self._lock:
            if g.readers - {reader, UNTRACKED}:
                g.release_pending = True
                return True
            self.grants.pop(request_id, None)
        self._report("sent", request_id)
        return True

    def renew(self, request_id: str, token: str) -> bool:
        """A decode worker still wants these blocks: the scheduler restarts their lease."""
        if self._grant(request_id, token) is None:
            return False
        self._report("renewed", request_id)
        return True

    def served(self, nbytes: int, seconds: float, transport: str) -> None:
        self.on_event("served", nbytes=nbytes, seconds=seconds, transport=transport)

    # ---- consumer: scheduler side -------------------------------------------------------
    def get_num_new_matched_tokens(self, seq, num_computed_tokens: int) -> int | None:
        """Engine thread: how many prompt tokens a waiting request loads from its producer (None:
        it computes its prompt here). The producer's blocks cover the whole prompt: all that the
        local prefix cache lacks; 0 when it lacks none (the pull then moves no blocks, and still
        ends the producer's hold and brings the first token in, as any load does)."""
        if not self.consumes or not isinstance(seq.kv_params, RemotePrefill) or seq.num_output_tokens:
            return None
        return max(seq.num_prompt_tokens - num_computed_tokens, 0)

    def add_request(self, seq) -> None:
        """Engine thread: a request whose prompt KV a producer holds for us; its lease has just begun."""
        with self._lock:
            self.leases[seq.request_id] = _Lease(seq.kv_params, self.clock())

    def request_aborted(self, seq) -> None:
        """Engine thread: the request ended before its pull started (e.g. client gone): release
        the remote KV. One whose pull runs ends it itself."""
        with self._lock:
            lease = self.leases.get(seq.request_id)
            if lease is None or lease.pulling:
                return
            del self.leases[seq.request_id]
        self._pulls.submit(self.transport.release, lease.rp)

    def update_state_after_alloc(self, seq) -> list[int]:
        """Engine thread: seq's blocks are allocated; fetch the ones the prefix cache lacks.
        Returns the blocks the pull writes into (the core pins them until the load ends: a
        request aborted mid-pull must not hand them to another while the pull still writes)."""
        rid, rp = seq.request_id, seq.kv_params
        start = seq.num_cached_tokens // self.spec.block_size
        dst = seq.block_table[start:len(rp.block_ids)]
        src = rp.block_ids[start:]
        with self._lock:
            lease = self.leases.setdefault(rid, _Lease(rp, self.clock()))
            lease.pulling = True
        self._pulls.submit(self._pull, rid, rp, src, dst)
        return dst

    def renew_leases(self) -> int:
        """Extend the producers' leases on every request that waits for its pull or runs it,
        once a third of its lease has passed since the last renewal (as vLLM's heartbeat).
        Returns how many were renewed. The lease thread calls this every second."""
        now, due = self.clock(), {}
        with self._lock:
            for lease in self.leases.values():
                if now - lease.renewed >= lease.rp.lease / 3:
                    lease.renewed = now
                    due.setdefault((lease.rp.host, lease.rp.port), []).append(lease.rp)
        for rps in due.values():
            self.transport.renew(rps)
        return sum(len(v) for v in due.values())

    def _renew_loop(self) -> None:
        while not self._closed.wait(1.0):
            try:
                self.renew_leases()
            except Exception:
                log.exception("renewing KV leases failed")

    # ---- consumer: worker side (pull threads) -------------------------------------------
    def _pull(self, rid: str, rp: RemotePrefill, src: list[int], dst: list[int]) -> None:
        ok, error, t0 = True, None, time.perf_counter()
        try:
            nbytes, transport = self.transport.pull(rp, src, dst)
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
            self.transport.release(rp)
        finally:
            with self._lock:
                self.leases.pop(rid, None)
        self._report("loaded", (rid, ok, error))
