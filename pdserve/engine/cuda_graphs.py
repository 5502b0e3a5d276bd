"""Decode-only steps replayed from CUDA graphs, one graph per (batch bucket, block-table width bucket).

A decode step launches hundreds of small kernels; on a GPU their launch cost, not the math,
sets the step time. A CUDA graph replays them all with one launch, but only for fixed shapes
and fixed input addresses. So a step of B sequences is padded to a batch bucket and its block
tables to a width bucket, its inputs are copied into static buffers, and the graph captured
for that pair of buckets (on first use) is replayed.

Padded rows must not touch real KV: they write their K/V into, and attend over, one scratch
block that the ModelRunner allocates past the block manager's blocks and never hands out.

With capture=False the same padded path runs eagerly: that is how CPU tests check it.
"""
from __future__ import annotations

import torch

from pdserve.models.attention import AttentionMetadata


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below limit, then limit itself: every size up to limit has a bucket."""
    out = [1]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return out if out[-1] == limit else out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class DecodeGraphRunner:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_num_seqs: int,
                 max_model_len: int, scratch_block: int, capture: bool = True):
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.scratch_block, self.capture = scratch_block, capture
        self.batch_buckets = buckets(max_num_seqs)
        self.width_buckets = buckets(-(-max_model_len // block_size))
        b, w, dev = self.batch_buckets[-1], self.width_buckets[-1], kv_cache.device
        # static inputs and output: a graph reads and writes these very addresses on every replay
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(b, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(b, w, dtype=torch.long, device=dev)
        self.context_lens = torch.zeros(b, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(b, model.config.hidden_size, dtype=next(model.parameters()).dtype,
                                  device=dev)   # the weights' dtype (the KV cache may have another)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None  # one memory pool for all graphs: they never run concurrently

    def fits(self, tables: list[list[int]], lens: list[int]) -> bool:
        return (len(tables) <= self.batch_buckets[-1]
                and -(-max(lens) // self.block_size) <= self.width_buckets[-1])

    def forward(self, ids: list[int], pos: list[int], slots: list[int], tables: list[list[int]],
                lens: list[int]) -> torch.Tensor:
        """Hidden states [B, hidden] of B decode tokens (lens: context incl. the new token)."""
        n = len(ids)
        b = bucket_for(n, self.batch_buckets)
        w = bucket_for(-(-max(lens) // self.block_size), self.width_buckets)
        self._fill(ids, pos, slots, tables, lens, b, w)
        if not self.capture:
            self.hidden[:b] = self._run(b, w)
        else:
            graph = self.graphs.get((b, w)) or self._capture(b, w)
            graph.replay()
        return self.hidden[:n]

    def _fill(self, ids, pos, slots, tables, lens, b: int, w: int) -> None:
        n, bs, scratch = len(ids), self.block_size, self.scratch_block
        # padded rows: token 0 at position 0, written to and read from the scratch block only
        rows = [t[:-(-ln // bs)] for t, ln in zip(tables, lens)] + [[]] * (b - n)
        table = torch.tensor([r + [scratch] * (w - len(r)) for r in rows], dtype=torch.long)
        pad = b - n
        self.input_ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots + [scratch * bs] * pad), non_blocking=True)
        self.context_lens[:b].copy_(torch.tensor(lens + [1] * pad), non_blocking=True)
        self.block_tables[:b, :w].copy_(table, non_blocking=True)

    def _run(self, b: int, w: int) -> torch.Tensor:
        """The padded forward pass over the static buffers; what a graph records."""
        tables, lens = self.block_tables[:b, :w], self.context_lens[:b]
        # the mask comes from lens inside the graph, so a replay sees this step's lengths
        mask = torch.arange(w * self.block_size, device=lens.device)[None, :] < lens[:, None]
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:b], prefill_query_lens=[],
                                 prefill_context_lens=[], prefill_block_tables=[],
                                 decode_block_tables=tables, decode_context_lens=lens,
                                 decode_mask=mask[:, None, None, :])
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, meta)

    def _capture(self, b: int, w: int) -> torch.cuda.CUDAGraph:
        # warm up on a side stream first (PyTorch's recipe): lazy initialisation such as cuBLAS
        # workspaces and kernel selection must happen outside the capture. The warm-up writes
        # this step's K/V to this step's slots, the same values the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(b, w)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: capture happens lazily while serving, and KV pull threads may issue CUDA
        # work on their own streams meanwhile; under "global" that would invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.hidden[:b] = self._run(b, w)  # copy into the static output, outside the pool
        self.graphs[(b, w)] = graph
        return graph
