"""A worker's KV pool seen as blocks of bytes, one tensor per tensor-parallel rank.

Each rank's pool is one tensor [layers, 2 (K, V), num_blocks, block_size, its kv heads,
head_dim] (rank 0's is the engine's own; the others are the ranks' pools mapped from shared
memory, engine/tp_pools.py), so blocks b..b+n of one layer's K (or V) are one contiguous run of
bytes. Every transport moves the same stream per piece (kv/heads.py: some heads of one rank):
for each layer, K then V, the requested blocks in order, each block's heads of the piece.
A piece of all of a rank's heads is the blocks' bytes as they lie; fewer heads are staged.
"""
from __future__ import annotations

import torch

from pdserve.kv.wire import id_runs, runs


class BlockPool:
    def __init__(self, kv_cache: torch.Tensor, ranks: list[torch.Tensor] | None = None,
                 heads: list[range] | None = None):
        """ranks: every rank's pool (rank 0's first), default just kv_cache; heads: the model KV
        heads each rank holds (kv/heads.layout_of), default all of them on rank 0."""
        self.ranks = list(ranks) if ranks else [kv_cache]
        self.kv = self.ranks[0]
        self.heads = list(heads) if heads else [range(kv_cache.shape[4])]
        self.num_layers = kv_cache.shape[0]
        self.on_cpu = kv_cache.device.type == "cpu"
        # flat byte views of the pools (CPU only): slices of them are what the socket reads/writes
        self._bytes = [t.view(torch.uint8).numpy() if self.on_cpu else None for t in self.ranks]

    def local_heads(self, rank: int) -> int:
        return self.ranks[rank].shape[4]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K or V, on rank 0."""
        return self.kv[0, 0, 0].numel() * self.kv.element_size()

    def stream_bytes(self, num_blocks: int) -> int:
        """Bytes of these blocks of rank 0, every layer, K and V."""
        return self.piece_bytes(num_blocks, self.local_heads(0))

    def piece_bytes(self, num_blocks: int, num_heads: int) -> int:
        bs, _, hd = self.kv.shape[3:]
        return 2 * self.num_layers * num_blocks * bs * num_heads * hd * self.kv.element_size()

    def whole(self, rank: int, lo: int, hi: int) -> bool:
        """The piece is every head of the rank: its bytes can move without staging."""
        return lo == 0 and hi == self.local_heads(rank)

    def layer_views(self, layer: int, ids: list[int], rank: int = 0) -> list[memoryview]:
        """Zero-copy byte views of one layer's K and V for these blocks (CPU pool, all heads)."""
        out = []
        for kv in (0, 1):
            for start, n in id_runs(ids):
                out.append(memoryview(self._bytes[rank][layer, kv, start:start + n].reshape(-1)))
        return out

    def gather_layer(self, layer: int, ids: list[int], rank: int = 0, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """One layer's K and V for these blocks and heads [lo, hi), staged contiguous in host memory."""
        pool = self.ranks[rank]
        idx = torch.tensor(ids, device=pool.device)
        return pool[layer, :, :, :, lo:hi].index_select(1, idx).to("cpu").contiguous()

    def scatter_layer(self, layer: int, ids: list[int], staged: torch.Tensor, rank: int = 0,
                      lo: int = 0, hi: int | None = None) -> None:
        pool = self.ranks[rank]
        idx = torch.tensor(ids, device=pool.device)
        pool[layer, :, :, :, lo:hi].index_copy_(1, idx, staged.to(pool.device))

    def copy_from(self, src: torch.Tensor, src_ids: list[int], dst_ids: list[int], rank: int = 0,
                  src_heads: tuple[int, int] | None = None, dst_heads: tuple[int, int] | None = None) -> int:
        """Copy blocks from another pool tensor of the same layout (shared memory, CUDA IPC)
        into rank `rank`'s: heads src_heads of src into dst_heads of ours (default all), one
        copy per run of consecutive ids across every layer, K and V."""
        dst = self.ranks[rank]
        (slo, shi), (dlo, dhi) = src_heads or (0, src.shape[4]), dst_heads or (0, dst.shape[4])
        for s, d, n in runs(src_ids, dst_ids):
            dst[:, :, d:d + n, :, dlo:dhi].copy_(src[:, :, s:s + n, :, slo:shi], non_blocking=True)
        if dst.device.type == "cuda":
            torch.cuda.synchronize(dst.device)
        return self.piece_bytes(len(src_ids), dhi - dlo)

    def copy_pieces(self, sources: list[torch.Tensor], pieces, src_ids: list[int], dst_ids: list[int]) -> int:
        """Every piece (kv/heads.Piece) from the producer's rank pools `sources` into ours."""
        if any(p.p_rank >= len(sources) for p in pieces):
            raise ValueError(f"the producer maps {len(sources)} KV pools; a piece needs rank "
                             f"{max(p.p_rank for p in pieces)}")
        return sum(self.copy_from(sources[p.p_rank], src_ids, dst_ids, p.d_rank, (p.p_lo, p.p_hi), (p.d_lo, p.d_hi))
                   for p in pieces)
