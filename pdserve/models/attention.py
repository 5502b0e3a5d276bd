"""Paged attention over the block KV cache: the torch backend, which runs on any device.

A step's tokens are flattened into one [T, ...] batch. Prefill sequences (several query
tokens) come first, each attended on its own; decode sequences (one query token) follow,
sorted by context length, and are attended in padded groups: one group pads every row to
the longest context, so one long sequence among short ones would multiply the work of the
whole batch; `plan_decode_groups` splits the rows where a group's padding costs more than
another gather and attention call. On CPU, decode rows are attended by a kernel that reads
the cache in place instead (pdserve.models.cpu_kernels): no gather, no padding; so are the
prompt chunks, all of a step's in one call (a flash-attention kernel that reads a cached prefix
where it lies instead of gathering it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] cache slot (block * block_size + offset) per token
    # prefill part: python lists, one entry per prefill sequence
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]     # tokens in cache after this step, incl. the queries
    prefill_block_tables: list[torch.Tensor]
    # decode part: tensors over the decode sequences
    decode_block_tables: torch.Tensor | None = None   # [B, max_blocks], padded with 0
    decode_context_lens: torch.Tensor | None = None   # [B]
    decode_mask: torch.Tensor | None = None           # [B, 1, 1, max_blocks*block_size], True = attend
    # several groups instead: (rows, block tables [rows, width], mask, context lens [rows]) in row
    # order; mask is None where the CPU kernel attends (it reads each row up to its own length)
    decode_groups: list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None
    # the prefill part as the CPU kernel takes it (None: SDPA per sequence): block tables [S, W],
    # first query row, query rows, tokens in cache after the step [S] (pdserve.models.cpu_kernels)
    prefill_kernel_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_query_lens)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """cache: [2, num_blocks, block_size, kv_heads, head_dim] of one layer; k and v are rounded to
    its dtype where that is another (--kv-cache-dtype)."""
    if k.dtype != cache.dtype:
        k, v = k.to(cache.dtype), v.to(cache.dtype)
    if cache.device.type == "cpu" and k.stride(-1) == 1 and v.stride(-1) == 1:
        from pdserve.models.cpu_kernels import write_kv_op
        op = write_kv_op()
        if op is not None:
            return op(cache, k, v, slots)
    kv_heads, head_dim = cache.shape[-2:]
    cache[0].view(-1, kv_heads, head_dim)[slots] = k
    cache[1].view(-1, kv_heads, head_dim)[slots] = v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for this step's tokens. Returns [T, H, D]."""
    write_kv(cache, k, v, meta.slot_mapping)
    groups = meta.decode_groups
    if groups is None and meta.decode_block_tables is not None:
        groups = [(meta.decode_block_tables.shape[0], meta.decode_block_tables, meta.decode_mask,
                   meta.decode_context_lens)]
    if not meta.prefill_query_lens and groups and len(groups) == 1 and groups[0][2] is None:
        from pdserve.models.cpu_kernels import paged_decode_op   # a decode-only step: the kernel's output as is
        return paged_decode_op()(q, cache, groups[0][1], groups[0][3], scale)
    out = torch.empty_like(q)
    start = 0
    if meta.prefill_kernel_args is not None:   # every prompt chunk in one call, from the cache in place
        from pdserve.models.cpu_kernels import paged_prefill_op
        start = meta.num_prefill_tokens
        out[:start] = paged_prefill_op()(q[:start], cache, *meta.prefill_kernel_args, scale)
    for qlen, ctx, table in zip(meta.prefill_query_lens, meta.prefill_context_lens,
                                meta.prefill_block_tables) if meta.prefill_kernel_args is None else ():
        qs = q[start:start + qlen]
        if ctx == qlen:  # nothing cached before: attend to this step's own keys
            ks, vs = k[start:start + qlen], v[start:start + qlen]
            mask, causal = None, True
        else:
            ks, vs = (x.to(q.dtype) for x in _gather(cache, table, ctx))
            pos = torch.arange(ctx - qlen, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]
            causal = False
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=causal,
            scale=scale, enable_gqa=True)
        out[start:start + qlen] = o.squeeze(0).transpose(0, 1)
        start += qlen
    for rows, tables, mask, lens in groups or ():
        if mask is None:
            from pdserve.models.cpu_kernels import paged_decode_op
            out[start:start + rows] = paged_decode_op()(q[start:start + rows], cache, tables, lens, scale)
        else:
            out[start:start + rows] = _decode_attention(q[start:start + rows], cache, tables, mask, scale)
        start += rows
    return out


def _decode_attention(q, cache, tables, mask, scale):
    """q: [B, H, D], one query token per row; tables: [B, W] blocks; mask: [B, 1, 1, W*bs]."""
    b, nblk = tables.shape
    bs, kvh, d = cache.shape[2:]
    ks = cache[0][tables].view(b, nblk * bs, kvh, d).transpose(1, 2)
    vs = cache[1][tables].view(b, nblk * bs, kvh, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), ks.to(q.dtype), vs.to(q.dtype), attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o.squeeze(2)


def plan_decode_groups(widths: list[int], group_cost: float) -> list[int]:
    """Split rows sorted by width (blocks) into consecutive groups; returns the group sizes.

    A group of n rows costs n x its widest row in gathered blocks, plus `group_cost` blocks'
    worth for its own gather and attention call. Minimises the total exactly, by dynamic
    programming over the distinct widths (rows of equal width never gain from a split).
    """
    if any(a > b for a, b in zip(widths, widths[1:])):
        raise ValueError("plan_decode_groups needs widths in ascending order")
    runs: list[list[int]] = []   # [width, rows]
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    k = len(runs)
    best = [0.0] + [float("inf")] * k   # best[j]: cost of runs [0, j)
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        rows, wj = 0, runs[j - 1][0]
        for i in range(j - 1, -1, -1):   # last group is runs [i, j), padded to runs[j - 1]'s width
            rows += runs[i][1]
            c = best[i] + rows * wj + group_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    sizes, j = [], k
    while j:
        sizes.append(sum(r for _, r in runs[cut[j]:j]))
        j = cut[j]
    return sizes[::-1]


def _gather(cache: torch.Tensor, table: torch.Tensor, ctx: int):
    bs, kvh, d = cache.shape[2:]
    k = cache[0][table].view(-1, kvh, d)[:ctx]
    v = cache[1][table].view(-1, kvh, d)[:ctx]
    return k, v
