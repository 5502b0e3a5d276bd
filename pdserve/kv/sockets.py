"""The worker side over the KV server's control channel: a producer's KVServer answers pulls
(raw bytes over tcp, or a go-ahead to copy from its pool mapped by shm or cuda_ipc); a
consumer's KVClient makes them, choosing the fastest data path both ends have."""
from __future__ import annotations

from pdserve.config import KVTransferConfig
from pdserve.kv import auth, tls as kv_tls
from pdserve.kv.client import KVClient
from pdserve.kv.layout import BlockPool
from pdserve.kv.server import KVServer
from pdserve.kv.spec import KVSpec


class SocketTransport:
    def __init__(self, config: KVTransferConfig, spec: KVSpec, pool: BlockPool, secret: bytes | None,
                 host: str, consumer: bool):
        self.config, self.pool, self.secret, self.host = config, pool, secret, host
        self.server: KVServer | None = None
        self.client = KVClient(spec, pool, config.kv_transport, config.kv_pull_timeout, secret,
                               auth.parse_peers(config.kv_allowed_peers), tls=kv_tls.client_context(config)) if consumer else None

    def serve(self, producer) -> tuple[str, int]:
        c = self.config
        self.server = KVServer(producer, c.kv_host or self.host, c.kv_port, self.secret, c.kv_max_connections,
                               tls=kv_tls.server_context(c)).start()
        return self.server.host, self.server.port

    def pull(self, rp, src, dst):
        return self.client.pull(rp, src, dst)

    def renew(self, rps) -> None:
        self.client.renew(rps)

    def release(self, rp) -> None:
        self.client.release(rp)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self.client.close()
