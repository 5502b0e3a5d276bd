"""The engine's KV pool seen as blocks of bytes.

The pool is one tensor [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim], so
blocks b..b+n of one layer's K (or V) are one contiguous run of bytes. Every transport moves
the same stream: for each layer, K then V, the requested blocks in order.
"""
from __future__ import annotations

import torch

from pdserve.kv.wire import id_runs, runs


class BlockPool:
    def __init__(self, kv_cache: torch.Tensor):
        self.kv = kv_cache
        self.num_layers = kv_cache.shape[0]
        self.on_cpu = kv_cache.device.type == "cpu"
        # a flat byte view of the pool (CPU only): slices of it are what the socket reads/writes
        self._bytes = kv_cache.view(torch.uint8).numpy() if self.on_cpu else None

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K or V."""
        return self.kv[0, 0, 0].numel() * self.kv.element_size()

    def stream_bytes(self, num_blocks: int) -> int:
        return 2 * self.num_layers * num_blocks * self.block_bytes

    def layer_views(self, layer: int, ids: list[int]) -> list[memoryview]:
        """Zero-copy byte views of one layer's K and V for these blocks (CPU pool)."""
        out = []
        for kv in (0, 1):
            for start, n in id_runs(ids):
                out.append(memoryview(self._bytes[layer, kv, start:start + n].reshape(-1)))
        return out

    def gather_layer(self, layer: int, ids: list[int]) -> torch.Tensor:
        """One layer's K and V for these blocks, staged in host memory (GPU pool over tcp)."""
        idx = torch.tensor(ids, device=self.kv.device)
        return self.kv[layer].index_select(1, idx).to("cpu", non_blocking=False).contiguous()

    def scatter_layer(self, layer: int, ids: list[int], staged: torch.Tensor) -> None:
        idx = torch.tensor(ids, device=self.kv.device)
        self.kv[layer].index_copy_(1, idx, staged.to(self.kv.device))

    def copy_from(self, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> int:
        """Copy blocks from another pool tensor of the same layout (shared memory, CUDA IPC)
        into ours: one contiguous copy per run of consecutive ids, per layer, K and V."""
        pairs = runs(src_ids, dst_ids)
        for layer in range(self.num_layers):
            for kv in (0, 1):
                s_l, d_l = src[layer, kv], self.kv[layer, kv]
                for s, d, n in pairs:
                    d_l[d:d + n].copy_(s_l[s:s + n], non_blocking=True)
        if self.kv.device.type == "cuda":
            torch.cuda.synchronize(self.kv.device)
        return self.stream_bytes(len(src_ids))
