"""A KV server as an attacker or a broken peer writes one: a plain socket server that speaks
the wire protocol (length-prefixed JSON, then raw bytes) without the secret, and answers any
pull with bytes of its own choosing, at a pace of its own choosing.

It speaks both handshakes a consumer might use: its first message is a challenge (a server
speaking first) that also reads as an offer to a consumer that said hello first, and a hello
carrying a proof gets an offer whose own proof is made up (it has no secret to make one with)."""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import time

_LEN = struct.Struct("!I")


def _send(sock, obj):
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv(sock):
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    (n,) = _LEN.unpack(head)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return json.loads(body)


class FakeKVPeer:
    """serve(spec dict, engine_id, stream_bytes(n_blocks) -> int). `payload(n)` makes the block
    bytes; `drip` > 0 sends them one byte per `drip` seconds."""

    def __init__(self, spec: dict, engine_id: str, stream_bytes, payload=None, drip: float = 0.0,
                 secret: str | None = None):
        self.spec, self.engine_id, self.stream_bytes = spec, engine_id, stream_bytes
        # secret: a peer that has it (a slow but genuine prefill worker), proving itself as
        # DESIGN's protocol says: HMAC-SHA256 over both nonces, under SHA-256 of the secret
        self.key = hashlib.sha256(b"pdserve-kv-secret\0" + secret.encode()).digest() if secret else None
        self.payload = payload or (lambda n: secrets.token_bytes(n))
        self.drip = drip
        self.pulls = 0            # pull requests it received
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self._lsock.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self._stop.set()
        self._lsock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _offer(self):
        return {"ok": True, "spec": self.spec, "engine_id": self.engine_id, "host_id": "elsewhere",
                "transports": ["tcp"], "shm": None, "cuda_ipc": None}

    def _serve(self, conn):
        try:
            ours = secrets.token_hex(16)
            _send(conn, {"op": "challenge", "nonce": ours, "auth": False, **self._offer()})
            while not self._stop.is_set():
                msg = _recv(conn)
                op = msg.get("op")
                if op == "hello" and "mac" in msg:   # a consumer that proves itself wants our proof
                    if self.key is None:             # we cannot make one: make one up
                        proof = secrets.token_hex(32)
                    else:
                        proof = hmac.new(self.key, f"pdserve-kv-v1|server|{msg['nonce']}|{ours}".encode(),
                                         hashlib.sha256).hexdigest()
                    _send(conn, {**self._offer(), "mac": proof})
                elif op == "pull":
                    self.pulls += 1
                    n = self.stream_bytes(len(msg["block_ids"]))
                    _send(conn, {"ok": True, "nbytes": n})
                    data = self.payload(n)
                    if self.drip:
                        for i in range(n):
                            if self._stop.wait(self.drip):
                                return
                            conn.sendall(data[i:i + 1])
                            self.bytes_sent += 1
                    else:
                        conn.sendall(data)
                        self.bytes_sent += n
        except (OSError, ValueError, ConnectionError):
            pass
        finally:
            conn.close()


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class LocalTransport:
    """The worker side of kv/base.py with no sockets: producers and consumers of one process
    meet in `hub` (port -> producer connector). A pull goes through exactly the calls a KV server
    makes on the producer (authorize, unclaim, done) and copies the blocks pool to pool, so a
    connector driven by it holds, pulls, aborts and expires as with the real transport."""

    def __init__(self, hub: dict, pool):
        self.hub, self.pool = hub, pool   # pool: this worker's BlockPool (a consumer pulls into it)
        self.port = None

    def serve(self, producer):
        self.port = len(self.hub) + 1
        self.hub[self.port] = producer
        return "local", self.port

    def _producer(self, rp):
        prod = self.hub.get(rp.port)
        if prod is None or prod.engine_id != rp.engine_id:
            raise ConnectionError(f"no producer {rp.engine_id} at port {rp.port}")
        return prod

    def pull(self, rp, src, dst):
        prod, reader, n = self._producer(rp), object(), 0
        if src:
            error = prod.authorize(rp.request_id, rp.token, src, reader)
            if error:
                raise RuntimeError(f"the prefill worker refused the pull: {error}")
            try:
                n = self.pool.copy_from(prod.pool.kv, src, dst)
            finally:
                prod.unclaim(reader, rp.request_id)
        prod.done(rp.request_id, rp.token, reader)
        return n, "local"

    def renew(self, rps):
        for rp in rps:
            self._producer(rp).renew(rp.request_id, rp.token)

    def release(self, rp):
        try:
            self._producer(rp).done(rp.request_id, rp.token)
        except ConnectionError:
            pass

    def close(self):
        self.hub.pop(self.port, None)
