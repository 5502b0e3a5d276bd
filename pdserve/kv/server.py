"""The producer's KV server: a bounded pool of connection threads speaking the control protocol.

    producer -> {"op": "challenge", "nonce", "auth"}     first, unasked
    consumer -> {"op": "hello", "nonce", "mac", "spec", "tp"}  its proof (auth.py), KV spec and
                                                         tensor-parallel layout (kv/heads.py)
    producer -> offer + {"mac"} (with its own "tp" layout), or an error; a spec mismatch or a
                layout it cannot fill names the field, but only to a consumer that proved the
                secret; an unproven one hears "authentication failed"
    consumer -> {"op": "pull", "request_id", "token", "block_ids", "transport", "pieces", "part"}
        pieces: [[rank, first head, end head], ...] of the producer's ranks (kv/heads.py)
        part: [i, n]: the i-th of n pulls of this grant in parallel (one connection per decode
              rank), each allowed once; default [0, 1]
        tcp:  producer -> {"ok": true, "nbytes": n} then n raw bytes (piece by piece; each layer by
              layer, K then V)
        else: producer -> {"ok": true}; the consumer copies from the mapped pool itself
    consumer -> {"op": "done", "request_id", "token"}    producer releases the held blocks (no answer)
    consumer -> {"op": "renew", "items": [[request_id, token], ...]}   extend those leases (no answer)

Nothing is spent on a peer before it authenticates: the handshake has a deadline, its
messages a small size bound, and connections still in their handshake a quota of their own.
After it, message sizes are bounded by the pool (a pull names at most every block), every
read has a deadline (an idle connection is closed), and a connection past the pool's
bound is closed at once rather than given a thread. With a TLS context (kv/tls.py) every
connection is TLS, its handshake inside the same deadline; the challenge then runs inside it.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time

from pdserve.cpu_threads import one_openmp_thread
from pdserve.kv import auth, tls as kv_tls
from pdserve.kv.spec import KVHandshakeError
from pdserve.kv.paths import producer_path
from pdserve.kv.wire import KVWireError, recv_msg, send_msg

log = logging.getLogger("pdserve.kv")

HANDSHAKE_S = 5.0      # a peer must have proved itself within this
HELLO_MAX = 8 << 10    # bytes of the one message read from an unproven peer
IDLE_S = 60.0          # an authenticated connection with nothing to say is closed after this
MAX_PIECES = 256       # head ranges one pull may name (one per pair of ranks at most)
SEND_S = 30.0          # a pull's bytes must leave within this (the consumer has its own deadline)


class KVServer:
    def __init__(self, producer, host: str, port: int = 0, secret: bytes | None = None,
                 max_connections: int = 128, tls: ssl.SSLContext | None = None):
        self.producer = producer   # the connector: hello_reply, authorize, unclaim, done, renew, pool
        self.secret, self.tls = secret, tls
        self.max_connections = max_connections
        self.max_handshaking = max(4, max_connections // 4)
        self._count_lock = threading.Lock()
        self.connections = self.handshaking = 0
        self.refused = 0           # connections closed at once: over the bound
        # a pull names at most every block of the pool, as JSON ints: bound every message by that
        self.max_msg = 4096 + 12 * max(1, producer.pool.kv.shape[2]) + 40 * MAX_PIECES
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(h):
                try:
                    one_openmp_thread()   # a connection's thread lives on beside the engine
                    self._serve(h.request)
                finally:
                    with self._count_lock:
                        self.connections -= 1

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def verify_request(s, request, client_address) -> bool:
                """Over the bound: refused before any thread exists (socketserver closes it)."""
                with server._count_lock:
                    if (server.connections >= server.max_connections
                            or server.handshaking >= server.max_handshaking):
                        server.refused += 1
                        return False
                    server.connections += 1
                    server.handshaking += 1
                return True

        self._server = Server((host, port), Handler)
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="pdserve-kv-server",
                                        daemon=True)
        if secret is None:
            log.warning("KV server %s:%d has no secret (no --kv-secret, $PDSERVE_KV_SECRET or --api-key): any "
                        "process that reaches it may try tokens; keep it on loopback", host, self.port)

    def start(self) -> "KVServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = "%s:%s" % sock.getpeername()[:2]
        owner = object()   # this connection, as the owner of the grants it claims
        try:
            try:
                if self.tls is not None:
                    try:
                        sock = kv_tls.wrap(self.tls, sock, HANDSHAKE_S, server_side=True)
                    except (ssl.SSLError, OSError) as e:   # not TLS, or a client that dislikes our cert
                        log.info("KV TLS handshake from %s failed: %s", peer, e)
                        return
                greeted = self._handshake(sock, peer)
            finally:
                with self._count_lock:
                    self.handshaking -= 1
            if greeted is None:
                return
            while True:
                try:
                    msg = recv_msg(sock, self.max_msg, time.monotonic() + IDLE_S)
                except (KVWireError, OSError):
                    return  # the consumer hung up, idled out or sent garbage
                op = msg.get("op")
                if op == "done":  # token-gated, allowed after a refused spec; no answer
                    self.producer.done(str(msg.get("request_id")), str(msg.get("token")), owner)
                elif op == "renew":
                    items = msg.get("items")
                    for item in items if isinstance(items, list) else []:
                        if isinstance(item, list) and len(item) == 2:
                            self.producer.renew(str(item[0]), str(item[1]))
                elif not greeted:
                    send_msg(sock, {"ok": False, "error": "KV spec not accepted on this connection"},
                             time.monotonic() + SEND_S)
                    return
                elif op == "pull":
                    self._pull(sock, msg, owner)
                else:
                    send_msg(sock, {"ok": False, "error": f"unknown op {str(op)[:40]!r}"}, time.monotonic() + SEND_S)
                    return
        except OSError as e:
            log.info("KV connection from %s ended: %s", peer, e)
        finally:
            self.producer.unclaim(owner)   # a pull that ended without `done` reads nothing any more
            sock.close()

    def _handshake(self, sock: socket.socket, peer: str) -> bool | None:
        """Challenge, proof, spec. True: authenticated and greeted; False: authenticated but the
        spec differs (only `done`/`renew` follow); None: the connection is over."""
        deadline = time.monotonic() + HANDSHAKE_S
        ours = auth.nonce()
        try:
            send_msg(sock, {"op": "challenge", "nonce": ours, "auth": self.secret is not None}, deadline)
            hello = recv_msg(sock, HELLO_MAX, deadline)
        except (KVWireError, OSError) as e:
            log.info("KV handshake from %s abandoned: %s", peer, e)
            return None
        theirs = hello.get("nonce")
        if hello.get("op") != "hello" or not auth.valid_nonce(theirs) or (
                self.secret is not None and not auth.check_mac(self.secret, hello.get("mac"), "client", ours, theirs)):
            log.warning("KV connection from %s failed authentication", peer)
            try:   # says nothing about this worker: not its spec, not why
                send_msg(sock, {"ok": False, "error": "KV authentication failed"}, deadline)
            except OSError:
                pass
            return None
        proof = {"mac": auth.mac(self.secret, "server", theirs, ours)} if self.secret is not None else {}
        try:
            send_msg(sock, {**self.producer.hello_reply(hello.get("spec") or {}, hello.get("tp")), **proof}, deadline)
            return True
        except KVHandshakeError as e:   # authenticated: it may hear which field differs
            log.warning("KV handshake from %s refused: %s", peer, e)
            send_msg(sock, {"ok": False, "error": str(e), "field": e.field, **proof}, deadline)
            return False

    def _pull(self, sock: socket.socket, msg: dict, owner) -> None:
        rid, ids = str(msg.get("request_id")), msg.get("block_ids")
        pool = self.producer.pool
        pieces = self._pieces(msg.get("pieces"), pool)
        if pieces is None:   # before the grant is claimed: a malformed pull spends nothing
            send_msg(sock, {"ok": False, "error": "malformed pieces: each is [rank, first head, end head] "
                                                  "of this worker's ranks"}, time.monotonic() + SEND_S)
            return
        part = msg.get("part", [0, 1])
        if not (isinstance(part, list) and len(part) == 2 and all(type(x) is int for x in part)
                and 0 <= part[0] < part[1] <= MAX_PIECES):
            send_msg(sock, {"ok": False, "error": "malformed part: [index, count] of a pull in parallel parts"},
                     time.monotonic() + SEND_S)
            return
        error = self.producer.authorize(rid, str(msg.get("token")), ids, owner, tuple(part))
        if error:
            send_msg(sock, {"ok": False, "error": error}, time.monotonic() + SEND_S)
            return
        nbytes = sum(pool.piece_bytes(len(ids), hi - lo) for _, lo, hi in pieces)
        transport = str(msg.get("transport"))
        path = producer_path(transport)
        deadline = time.monotonic() + SEND_S
        if path is None or not path.streams:   # the consumer copies from our pools itself
            send_msg(sock, {"ok": True}, deadline)
            self.producer.served(nbytes, 0.0, transport)
            return
        t0 = time.perf_counter()
        send_msg(sock, {"ok": True, "nbytes": nbytes}, deadline)
        n = path.send(sock, pool, ids, pieces, deadline)
        self.producer.unclaim(owner, rid)   # sent: nothing reads these blocks for this pull any more
        self.producer.served(n, time.perf_counter() - t0, transport)

    @staticmethod
    def _pieces(raw, pool) -> list[tuple[int, int, int]] | None:
        """The [rank, lo, hi) head ranges a pull asks for (kv/heads.py); absent: all of rank 0's."""
        if raw is None:
            return [(0, 0, pool.local_heads(0))]
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_PIECES:
            return None
        out = []
        for p in raw:
            if not (isinstance(p, list) and len(p) == 3 and all(type(x) is int for x in p)):
                return None
            rank, lo, hi = p
            if not (0 <= rank < len(pool.ranks) and 0 <= lo < hi <= pool.local_heads(rank)):
                return None
            out.append((rank, lo, hi))
        return out
