"""The consumer's side of a pull: connect to the producer's KV server, handshake, fetch the
blocks over the chosen transport into our pool, and confirm so the producer frees them."""
from __future__ import annotations

import concurrent.futures
import logging
import socket
import ssl
import threading
import time

from pdserve.cpu_threads import one_openmp_thread
from pdserve.kv import auth, heads, tls as kv_tls
from pdserve.kv.heads import by_rank
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.paths import consumer_paths
from pdserve.kv.select import choose
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id
from pdserve.kv.wire import KVTimeout, KVWireError, recv_msg, send_msg

log = logging.getLogger("pdserve.kv")


class KVPullError(RuntimeError):
    pass


class KVClient:
    MAX_IDLE = 4   # idle connections kept per producer
    CHALLENGE_MAX, OFFER_MAX, REPLY_MAX = 1 << 10, 1 << 20, 4 << 10   # bytes we read from a producer

    def __init__(self, spec: KVSpec, pool: BlockPool, wanted: str = "auto", timeout: float = 30.0,
                 secret: bytes | None = None, allowed_peers: frozenset[str] | None = None,
                 tls: ssl.SSLContext | None = None):
        # timeout: the deadline of a whole pull (connect, handshake, every byte), not of one read
        self.spec, self.pool, self.wanted, self.timeout = spec, pool, wanted, timeout
        self.secret, self.allowed_peers, self.tls = secret, allowed_peers, tls
        self.local_device = pool.kv.device.type
        self.host_id = host_id()
        self.paths = consumer_paths(pool.kv.dtype)   # tcp, shm, cuda_ipc (kv/paths.py)
        self._idle: dict[tuple[str, int], list[tuple[socket.socket, dict]]] = {}
        self._lock = threading.Lock()
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None   # parallel parts of a pull

    def _connect(self, rp: RemotePrefill, deadline: float) -> tuple[socket.socket, dict]:
        """A new connection to the producer's KV server, both sides proven, spec agreed."""
        refusal = auth.peer_refusal(rp.host, rp.port, self.allowed_peers, self.secret)
        if refusal:   # before any byte goes out: an untrusted address is never dialled
            raise KVPullError(f"refusing to pull KV from an untrusted peer: {refusal}")
        sock = self._dial(rp, deadline)
        try:
            offer = self._handshake(sock, rp, deadline)
        except BaseException:
            sock.close()
            raise
        return sock, offer

    def _dial(self, rp: RemotePrefill, deadline: float) -> socket.socket:
        """A connection to the producer's KV server, inside TLS if this worker has a CA for it."""
        where = f"{rp.host}:{rp.port}"
        try:
            sock = socket.create_connection((rp.host, rp.port), timeout=max(0.01, deadline - time.monotonic()))
        except OSError as e:
            raise KVPullError(f"cannot reach the prefill worker's KV server at {where}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            return sock
        try:
            return kv_tls.wrap(self.tls, sock, deadline - time.monotonic(), server_hostname=rp.host)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise KVPullError(f"the KV server at {where} presented a certificate that --kv-tls-ca does not "
                              f"verify ({e.verify_message}): not a trusted prefill worker") from e
        except socket.timeout as e:
            sock.close()
            raise KVTimeout(f"no TLS handshake with {where} within the deadline") from e
        except (ssl.SSLError, OSError) as e:
            sock.close()
            raise KVPullError(f"TLS handshake with the KV server at {where} failed ({e}); does it serve "
                              f"TLS (--kv-tls-cert on the prefill worker)?") from e

    def _handshake(self, sock: socket.socket, rp: RemotePrefill, deadline: float) -> dict:
        where = f"{rp.host}:{rp.port}"
        try:
            ch = recv_msg(sock, self.CHALLENGE_MAX, deadline)
        except KVTimeout:
            raise
        except KVWireError as e:   # closed before its first word: most likely it wanted TLS
            hint = " (it may require TLS: give this worker --kv-tls-ca)" if self.tls is None else ""
            raise KVPullError(f"the KV server at {where} closed the connection before its challenge{hint}") from e
        theirs = ch.get("nonce")
        if ch.get("op") != "challenge" or not auth.valid_nonce(theirs):
            raise KVPullError(f"the KV server at {where} does not speak pdserve's KV protocol")
        if ch.get("auth") and self.secret is None:
            raise KVPullError(f"the KV server at {where} requires a KV secret and this worker has none "
                              f"(give both workers the same --kv-secret or --api-key)")
        ours = auth.nonce()
        proof = auth.mac(self.secret, "client", theirs, ours) if self.secret is not None else None
        send_msg(sock, {"op": "hello", "nonce": ours, "mac": proof, "spec": self.spec.to_dict(),
                        "tp": heads.to_wire(self.pool.heads)}, deadline)
        offer = recv_msg(sock, self.OFFER_MAX, deadline)
        if self.secret is not None and not auth.check_mac(self.secret, offer.get("mac"), "server", ours, theirs):
            # whatever it says next is not a trusted prefill worker's: nothing of it is used
            raise KVPullError(f"the KV server at {where} did not prove it holds the KV secret "
                              f"({offer.get('error') or 'no valid proof'}): not a trusted prefill worker")
        if not offer.get("ok"):
            if offer.get("field"):
                raise KVHandshakeError(str(offer["field"]), message=str(offer.get("error")))
            raise KVPullError(f"the KV server at {where} refused the handshake: {offer.get('error')}")
        self.spec.check(offer.get("spec") or {}, ("decode worker", "prefill worker"))
        # which heads of which producer rank fill each of our ranks: fixed per connection
        offer["pieces"] = heads.plan(heads.from_wire(offer.get("tp"), self.spec.num_kv_heads, "prefill worker"),
                                     self.pool.heads)
        return offer

    def _checkout(self, rp: RemotePrefill, deadline: float) -> tuple[socket.socket, dict, bool]:
        """An idle connection to this producer if there is one (no connect, no handshake:
        two round trips saved per pull), else a new one. Returns (sock, offer, reused)."""
        with self._lock:
            idle = self._idle.get((rp.host, rp.port))
            if idle:
                return (*idle.pop(), True)
        return (*self._connect(rp, deadline), False)

    def _checkin(self, rp: RemotePrefill, sock: socket.socket, offer: dict) -> None:
        with self._lock:
            idle = self._idle.setdefault((rp.host, rp.port), [])
            if len(idle) < self.MAX_IDLE:
                idle.append((sock, offer))
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            conns, self._idle = [c for idle in self._idle.values() for c in idle], {}
        for sock, _ in conns:
            sock.close()
        if self._workers is not None:
            self._workers.shutdown(wait=False)

    def pull(self, rp: RemotePrefill, src: list[int], dst: list[int]) -> tuple[int, str]:
        """Copy remote blocks src into local blocks dst; returns (bytes, transport). All of it
        within self.timeout: a peer that trickles bytes fails this pull, not the next ones."""
        deadline = time.monotonic() + self.timeout
        sock = None
        try:
            sock, offer, reused = self._checkout(rp, deadline)
            if reused and offer.get("engine_id") != rp.engine_id:
                sock.close()   # an idle connection to an earlier server on that port
                sock, offer, reused = (*self._connect(rp, deadline), False)
            result, sock, offer = self._afresh_if_dropped(
                rp, sock, offer, reused, deadline, lambda s, o: self._pull_on(s, o, rp, src, dst, deadline))
        except KVTimeout as e:
            if sock is not None:
                sock.close()
            raise KVPullError(f"the KV transfer from {rp.host}:{rp.port} did not finish within "
                              f"{self.timeout:g}s (--kv-pull-timeout)") from e
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self._checkin(rp, sock, offer)
        return result

    def renew(self, rps: list[RemotePrefill], timeout: float = 5.0) -> None:
        """Extend the producer's leases on these requests' blocks (one producer; best effort)."""
        rp, deadline = rps[0], time.monotonic() + timeout
        sock = None
        try:
            sock, offer, _ = self._checkout(rp, deadline)
            items = [[r.request_id, r.token] for r in rps if r.engine_id == offer.get("engine_id")]
            for i in range(0, len(items), 64):
                send_msg(sock, {"op": "renew", "items": items[i:i + 64]}, deadline)
        except Exception as e:  # the lease runs out and the pull, if it comes, is refused
            log.info("could not renew KV leases on %s:%s: %s", rp.host, rp.port, e)
            if sock is not None:
                sock.close()
            return
        self._checkin(rp, sock, offer)

    def _pull_on(self, sock, offer, rp, src, dst, deadline) -> tuple[int, str]:
        if offer.get("engine_id") != rp.engine_id:
            raise KVPullError(f"the KV server at {rp.host}:{rp.port} is engine {offer.get('engine_id')}, "
                              f"not {rp.engine_id}: the prefill worker restarted and lost the blocks")
        if len(src) != len(dst):  # checked after the handshake, which names a block size mismatch
            raise KVPullError(f"{len(src)} remote blocks for {len(dst)} local ones")
        same_host = offer.get("host_id") == self.host_id
        try:
            transport = choose(self.wanted, offer.get("transports") or [], same_host, self.local_device)
        except ValueError as e:
            raise KVPullError(str(e)) from e
        if transport not in self.paths:
            raise KVPullError(f"transport {transport} is not supported by this worker")
        if not self.paths[transport].ready(rp.engine_id, offer):
            if self.wanted != "auto":
                kind = "shared-memory" if transport == "shm" else transport
                raise KVPullError(f"cannot map the prefill worker's {kind} KV pool")
            transport = "tcp"   # e.g. another network namespace: the socket is not reachable
        n = self._pull_parts(sock, offer, rp, transport, src, dst, deadline) if src else 0
        # no answer awaited: the producer frees the blocks, we have what we need
        send_msg(sock, {"op": "done", "request_id": rp.request_id, "token": rp.token}, deadline)
        return n, transport

    def _afresh_if_dropped(self, rp, sock, offer, reused: bool, deadline: float, fn):
        """fn(sock, offer); once more on a new connection if a reused idle one turns out dropped
        by the producer (not after a timeout). Returns (fn's result, sock, offer) of the one used."""
        try:
            return fn(sock, offer), sock, offer
        except KVTimeout:
            raise
        except (OSError, KVWireError):
            if not reused:
                raise
            sock.close()
            sock, offer = self._connect(rp, deadline)
            try:
                return fn(sock, offer), sock, offer
            except BaseException:
                sock.close()   # the caller still holds the dropped one
                raise

    def _pull_parts(self, sock, offer, rp, transport, src, dst, deadline) -> int:
        """Each of our ranks' pieces in parallel: over tcp a connection per rank (part i of n of
        the grant), over a mapped path one authorisation and then each rank's copies."""
        path = self.paths[transport]
        groups = by_rank(offer["pieces"])
        if not path.streams or len(groups) == 1:
            reply = self._ask(sock, rp, transport, offer["pieces"], (0, 1), src, deadline)
            if path.streams:
                return self._receive(sock, reply, path, rp.engine_id, offer, groups[0], src, dst, deadline)
            return sum(self._parallel(lambda g: self._receive(sock, reply, path, rp.engine_id, offer, g, src, dst,
                                                               deadline), groups))
        conns = [(sock, offer, False)]
        try:
            for _ in groups[1:]:
                conns.append(self._checkout(rp, deadline))

            def part(i: int) -> int:
                reply, s, o = self._afresh_if_dropped(
                    rp, *conns[i], deadline, lambda s, o: self._ask(s, rp, transport, groups[i], (i, len(groups)),
                                                                     src, deadline))
                conns[i] = (s, o, False)
                return self._receive(s, reply, path, rp.engine_id, o, groups[i], src, dst, deadline)
            n = sum(self._parallel(part, range(len(groups))))
        except BaseException:
            for s, _, _ in conns[1:]:
                s.close()
            raise
        for s, o, _ in conns[1:]:
            self._checkin(rp, s, o)
        return n

    def _parallel(self, fn, items) -> list:
        """fn over items, all but the first on the pool's threads; the first error is raised
        once every call has ended (none still writes into our pool)."""
        items = list(items)
        if len(items) == 1:
            return [fn(items[0])]
        with self._lock:
            if self._workers is None:
                self._workers = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="pdserve-kv-part",
                                                                      initializer=one_openmp_thread)
        futs = [self._workers.submit(fn, x) for x in items[1:]]
        first, error = None, None
        try:
            first = fn(items[0])
        except BaseException as e:
            error = e
        results = [first]
        for f in futs:
            try:
                results.append(f.result())
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error
        return results

    def _ask(self, sock, rp, transport, pieces, part, src, deadline) -> dict:
        send_msg(sock, {"op": "pull", "request_id": rp.request_id, "token": rp.token, "block_ids": src,
                        "transport": transport, "pieces": [list(p[:3]) for p in pieces], "part": list(part)},
                 deadline)
        reply = recv_msg(sock, self.REPLY_MAX, deadline)
        if not reply.get("ok"):
            raise KVPullError(f"the prefill worker refused the pull: {reply.get('error')}")
        return reply

    def _receive(self, sock, reply, path, engine_id, offer, pieces, src, dst, deadline) -> int:
        if path.streams:
            want = sum(self.pool.piece_bytes(len(dst), p.d_hi - p.d_lo) for p in pieces)
            if reply.get("nbytes") != want:
                raise KVPullError(f"the prefill worker sends {reply.get('nbytes')} bytes, expected {want}")
        try:
            return path.receive(sock, offer, engine_id, self.pool, pieces, src, dst, deadline)
        except ValueError as e:   # a producer whose pools do not match its own layout
            raise KVPullError(str(e)) from e

    def release(self, rp: RemotePrefill) -> None:
        """Tell the producer it may free the blocks without a pull (best effort). The handshake
        proves us, but a refused spec does not stop it: the token alone authorises a release."""
        deadline = time.monotonic() + min(self.timeout, 5.0)
        try:
            if auth.peer_refusal(rp.host, rp.port, self.allowed_peers, self.secret):
                return   # never dial an untrusted address, not even to say goodbye
            with self._dial(rp, deadline) as sock:
                try:
                    self._handshake(sock, rp, deadline)
                except KVHandshakeError:
                    pass   # authenticated, spec refused: `done` is still heard
                send_msg(sock, {"op": "done", "request_id": rp.request_id, "token": rp.token}, deadline)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.recv(1)   # the producer closes after it handled the release
        except Exception as e:  # it frees them when its lease runs out anyway
            log.info("could not release %s on %s:%s: %s", rp.request_id, rp.host, rp.port, e)
