"""The consumer's side of a pull: connect to the producer's KV server, handshake, fetch the
blocks over the chosen transport into our pool, and confirm so the producer frees them."""
from __future__ import annotations

import logging
import socket

from pdserve.kv.cuda_ipc import ImportedPools
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.select import choose
from pdserve.kv.shm import ShmAttachment
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id
from pdserve.kv.wire import recv_into_views, recv_msg, send_msg

log = logging.getLogger("pdserve.kv")


class KVPullError(RuntimeError):
    pass


class KVClient:
    def __init__(self, spec: KVSpec, pool: BlockPool, wanted: str = "auto", timeout: float = 30.0):
        self.spec, self.pool, self.wanted, self.timeout = spec, pool, wanted, timeout
        self.local_device = pool.kv.device.type
        self.host_id = host_id()
        self.shm: dict[str, ShmAttachment] = {}   # producer engine id -> its mapped pool
        self.ipc = ImportedPools()

    def _connect(self, rp: RemotePrefill) -> tuple[socket.socket, dict]:
        try:
            sock = socket.create_connection((rp.host, rp.port), timeout=self.timeout)
        except OSError as e:
            raise KVPullError(f"cannot reach the prefill worker's KV server at {rp.host}:{rp.port}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            send_msg(sock, {"op": "hello", "spec": self.spec.to_dict()})
            offer = recv_msg(sock)
            if not offer.get("ok"):
                raise KVHandshakeError(offer.get("field", "?"), message=offer.get("error"))
            self.spec.check(offer.get("spec") or {})
            if offer.get("engine_id") != rp.engine_id:
                raise KVPullError(f"the KV server at {rp.host}:{rp.port} is engine {offer.get('engine_id')}, "
                                  f"not {rp.engine_id}: the prefill worker restarted and lost the blocks")
        except BaseException:
            sock.close()
            raise
        return sock, offer

    def pull(self, rp: RemotePrefill, src: list[int], dst: list[int]) -> tuple[int, str]:
        """Copy remote blocks src into local blocks dst; returns (bytes, transport)."""
        sock, offer = self._connect(rp)
        with sock:
            same_host = offer.get("host_id") == self.host_id
            try:
                transport = choose(self.wanted, offer.get("transports") or [], same_host, self.local_device)
            except ValueError as e:
                raise KVPullError(str(e)) from e
            if len(src) != len(dst):
                raise KVPullError(f"{len(src)} remote blocks for {len(dst)} local ones")
            n = 0
            if src:
                send_msg(sock, {"op": "pull", "request_id": rp.request_id, "token": rp.token,
                                "block_ids": src, "transport": transport})
                reply = recv_msg(sock)
                if not reply.get("ok"):
                    raise KVPullError(f"the prefill worker refused the pull: {reply.get('error')}")
                n = self._receive(sock, reply, transport, rp.engine_id, offer, src, dst)
            send_msg(sock, {"op": "done", "request_id": rp.request_id, "token": rp.token})
            recv_msg(sock)
        return n, transport

    def _receive(self, sock, reply, transport, engine_id, offer, src, dst) -> int:
        pool = self.pool
        if transport == "tcp":
            if reply.get("nbytes") != pool.stream_bytes(len(dst)):
                raise KVPullError(f"the prefill worker sends {reply.get('nbytes')} bytes, expected "
                                  f"{pool.stream_bytes(len(dst))}")
            if pool.on_cpu:  # straight into our pool
                views = [v for layer in range(pool.num_layers) for v in pool.layer_views(layer, dst)]
                return recv_into_views(sock, views)
            import torch
            n = 0
            for layer in range(pool.num_layers):
                staged = torch.empty((2, len(dst), *pool.kv.shape[3:]), dtype=pool.kv.dtype)
                n += recv_into_views(sock, [memoryview(staged.view(-1).view(torch.uint8).numpy())])
                pool.scatter_layer(layer, dst, staged)
            return n
        if transport == "shm":
            att = self.shm.get(engine_id)
            if att is None:
                if not offer.get("shm"):
                    raise KVPullError("the prefill worker offered shm but sent no segment")
                att = self.shm[engine_id] = ShmAttachment(offer["shm"], pool.kv.dtype)
            return pool.copy_from(att.tensor, src, dst)
        if transport == "cuda_ipc":
            return pool.copy_from(self.ipc.get(engine_id, offer["cuda_ipc"]), src, dst)
        raise KVPullError(f"transport {transport} is not supported by this worker")

    def release(self, rp: RemotePrefill) -> None:
        """Tell the producer it may free the blocks without a pull (best effort)."""
        try:  # no handshake: the token alone authorises a release (it may have failed)
            with socket.create_connection((rp.host, rp.port), timeout=min(self.timeout, 5.0)) as sock:
                send_msg(sock, {"op": "done", "request_id": rp.request_id, "token": rp.token})
                recv_msg(sock)
        except Exception as e:  # it frees them after its abort timeout anyway
            log.info("could not release %s on %s:%s: %s", rp.request_id, rp.host, rp.port, e)
