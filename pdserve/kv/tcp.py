"""tcp data path: the producer streams the pieces' bytes on the KV connection itself, after its
{"ok": true, "nbytes": n}; the consumer reads them into its pools. A piece of all of a rank's
heads goes straight from the producer's pool to the socket and from the socket into the
consumer's pool (CPU); fewer heads, or a GPU pool, are staged in host memory per layer."""
from __future__ import annotations

import torch

from pdserve.kv.wire import recv_into_views, send_views


class TcpPath:
    name = "tcp"
    streams = True   # the bytes follow the pull's reply on the connection

    def ready(self, engine_id: str, offer: dict) -> bool:
        return True

    def send(self, sock, pool, ids: list[int], pieces, deadline: float) -> int:
        """Producer: every piece (rank, lo, hi), each layer by layer, K then V."""
        n = 0
        for rank, lo, hi in pieces:
            if pool.on_cpu and pool.whole(rank, lo, hi):   # one gather-send straight out of the pool
                views = [v for layer in range(pool.num_layers) for v in pool.layer_views(layer, ids, rank)]
                n += send_views(sock, views, deadline)
                continue
            for layer in range(pool.num_layers):
                staged = pool.gather_layer(layer, ids, rank, lo, hi)
                n += send_views(sock, [memoryview(staged.view(-1).view(torch.uint8).numpy())], deadline)
        return n

    def receive(self, sock, offer: dict, engine_id: str, pool, pieces, src, dst, deadline: float) -> int:
        """Consumer: the same stream, each piece into the heads of our rank it fills."""
        n = 0
        for p in pieces:
            if pool.on_cpu and pool.whole(p.d_rank, p.d_lo, p.d_hi):   # straight into our pool
                views = [v for layer in range(pool.num_layers) for v in pool.layer_views(layer, dst, p.d_rank)]
                n += recv_into_views(sock, views, deadline)
                continue
            for layer in range(pool.num_layers):   # some of the rank's heads, or a GPU pool
                staged = torch.empty((2, len(dst), pool.kv.shape[3], p.d_hi - p.d_lo, pool.kv.shape[5]),
                                     dtype=pool.kv.dtype)
                n += recv_into_views(sock, [memoryview(staged.view(-1).view(torch.uint8).numpy())], deadline)
                pool.scatter_layer(layer, dst, staged, p.d_rank, p.d_lo, p.d_hi)
        return n
