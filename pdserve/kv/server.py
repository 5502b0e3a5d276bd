"""The producer's KV server: a thread per connection speaking the control protocol.

    consumer -> {"op": "hello", "spec": {...}}          producer -> offer, or error naming the field
    consumer -> {"op": "pull", "request_id", "token", "block_ids", "transport"}
        tcp:  producer -> {"ok": true, "nbytes": n} then n raw bytes (layer by layer, K then V)
        else: producer -> {"ok": true}; the consumer copies from the mapped pool itself
    consumer -> {"op": "done", "request_id", "token"}    producer releases the held blocks (no answer)

A consumer keeps the connection open for its next pull, so connect and hello happen once.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time

import torch

from pdserve.kv.spec import KVHandshakeError
from pdserve.kv.wire import KVWireError, recv_msg, send_msg, send_views

log = logging.getLogger("pdserve.kv")


class KVServer:
    def __init__(self, producer, host: str, port: int = 0):
        self.producer = producer   # the connector: hello_reply, authorize, done, pool

        class Handler(socketserver.BaseRequestHandler):
            def handle(h):
                self._serve(h.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._server = Server((host, port), Handler)
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="pdserve-kv-server",
                                        daemon=True)

    def start(self) -> "KVServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = "%s:%s" % sock.getpeername()[:2]
        greeted = False
        try:
            while True:
                try:
                    msg = recv_msg(sock)
                except (KVWireError, ConnectionError, OSError):
                    return  # the consumer hung up
                op = msg.get("op")
                if op == "hello":
                    try:
                        send_msg(sock, self.producer.hello_reply(msg.get("spec") or {}))
                        greeted = True
                    except KVHandshakeError as e:
                        log.warning("KV handshake from %s refused: %s", peer, e)
                        send_msg(sock, {"ok": False, "error": str(e), "field": e.field})
                        return
                elif op == "done":  # token-gated, so allowed even after a failed handshake; no answer
                    self.producer.done(str(msg.get("request_id")), str(msg.get("token")))
                elif not greeted:
                    send_msg(sock, {"ok": False, "error": "hello first"})
                    return
                elif op == "pull":
                    self._pull(sock, msg)
                else:
                    send_msg(sock, {"ok": False, "error": f"unknown op {op!r}"})
                    return
        except OSError as e:
            log.info("KV connection from %s ended: %s", peer, e)
        finally:
            sock.close()

    def _pull(self, sock: socket.socket, msg: dict) -> None:
        rid, ids = str(msg.get("request_id")), msg.get("block_ids")
        error = self.producer.authorize(rid, str(msg.get("token")), ids)
        if error:
            send_msg(sock, {"ok": False, "error": error})
            return
        transport = str(msg.get("transport"))
        pool = self.producer.pool
        if transport != "tcp":  # the consumer copies from our pool itself
            send_msg(sock, {"ok": True})
            self.producer.served(pool.stream_bytes(len(ids)), 0.0, transport)
            return
        t0 = time.perf_counter()
        send_msg(sock, {"ok": True, "nbytes": pool.stream_bytes(len(ids))})
        if pool.on_cpu:  # one gather-send straight out of the pool
            views = [v for layer in range(pool.num_layers) for v in pool.layer_views(layer, ids)]
            n = send_views(sock, views)
        else:            # GPU pool: stage each layer in host memory, then send it
            n = 0
            for layer in range(pool.num_layers):
                staged = pool.gather_layer(layer, ids)
                n += send_views(sock, [memoryview(staged.view(-1).view(torch.uint8).numpy())])
        self.producer.served(n, time.perf_counter() - t0, "tcp")
