"""Megatron-style tensor parallelism of the Llama-shaped decoder.

q/k/v and gate/up are column-parallel (each rank computes its heads' and its part of the MLP's
rows), o_proj and down_proj row-parallel (each rank's partial sum, then one all-reduce per
projection: two per layer). Embedding, norms and lm_head are replicated; only rank 0 computes
logits (it samples). The KV cache is sharded by KV heads: each rank keeps the blocks of its own
heads. When the ranks outnumber the KV heads, each KV head is replicated on tp / kv_heads ranks,
as vLLM does.

Which rows or columns of a checkpoint tensor a rank keeps is decided here alone (`TPLayout`); the
loader asks it for each tensor and the KV hand-off asks it which heads a rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPLayout:
    """How a model's heads and MLP rows are split over `size` ranks; the view of rank `rank`."""
    size: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def of(cls, cfg, size: int = 1, rank: int = 0) -> "TPLayout":
        check_divisible(cfg, size)
        return cls(size, rank, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.size

    def kv_heads_of(self, rank: int) -> range:
        """The model's KV head indices that `rank` holds (one replicated head when the ranks
        outnumber the KV heads)."""
        return kv_head_ranges(self.size, self.num_kv_heads)[rank]

    @property
    def kv_heads(self) -> range:
        return self.kv_heads_of(self.rank)

    def shard(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (a Hugging Face name)."""
        if self.size == 1:
            return w
        leaf = name.rsplit(".", 2)
        proj, kind = (leaf[-2], leaf[-1]) if len(leaf) == 3 else ("", "")
        r, hd = self.rank, self.head_dim
        if proj == "q_proj":
            n = self.local_heads * hd
            return w[r * n:(r + 1) * n]
        if proj in ("k_proj", "v_proj"):
            heads = self.kv_heads
            return w[heads.start * hd:heads.stop * hd]
        if proj == "o_proj" and kind == "weight":
            n = self.local_heads * hd
            return w[:, r * n:(r + 1) * n]
        if proj in ("gate_proj", "up_proj"):
            n = self.local_intermediate
            return w[r * n:(r + 1) * n]
        if proj == "down_proj" and kind == "weight":
            n = self.local_intermediate
            return w[:, r * n:(r + 1) * n]
        if proj in ("o_proj", "down_proj") and kind == "bias":   # added once, after the all-reduce
            return w if r == 0 else torch.zeros_like(w)
        return w


def kv_head_ranges(size: int, num_kv_heads: int) -> list[range]:
    """The KV heads of each of `size` ranks: equal runs, or, when the ranks outnumber the heads,
    each head on size // num_kv_heads consecutive ranks. The one rule; the KV hand-off maps
    between two workers' layouts with it (kv/heads.py)."""
    if size <= num_kv_heads:
        n = num_kv_heads // size
        return [range(r * n, (r + 1) * n) for r in range(size)]
    per = size // num_kv_heads
    return [range(r // per, r // per + 1) for r in range(size)]


def check_divisible(cfg, size: int) -> None:
    """A clear error at start when the model cannot be split `size` ways."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        problems.append(f"{kv} KV heads (neither divides the other)")
    if cfg.intermediate_size % size:
        problems.append(f"MLP size {cfg.intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's "
                         f"{', '.join(problems)}")


class RankLostError(RuntimeError):
    """A collective with the other ranks failed: a rank died or its link broke. Fatal for the
    worker: no step can run without every rank."""


class TPGroup:
    """The ranks of one model replica. `all_reduce` sums a row-parallel projection's partial
    outputs in place (nothing to do for one rank); rank 0 broadcasts each step's inputs.
    group: start-up collectives; steps: the step broadcast; inner: the in-step all-reduces
    (process groups of their own, with their own timeouts: pdserve.engine.tp_ranks)."""

    def __init__(self, size: int = 1, rank: int = 0, group=None, steps=None, inner=None):
        self.size, self.rank, self.group = size, rank, group
        self.steps = group if steps is None else steps
        self.inner = group if inner is None else inner

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist
            try:
                dist.all_reduce(x, group=self.inner)
            except Exception as e:   # gloo / NCCL: a peer gone or its link broken
                raise RankLostError(f"tensor-parallel all-reduce failed on rank {self.rank}: {e}") from e
        return x

    def min_int(self, n: int) -> int:
        """The smallest of every rank's n (e.g. KV blocks that fit on each rank's device)."""
        if self.size == 1:
            return n
        import torch.distributed as dist
        t = torch.tensor([n], dtype=torch.long)
        if dist.get_backend(self.group) == "nccl":   # NCCL reduces device tensors only
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def gather_to_0(self, obj) -> list | None:
        """Every rank's obj, on rank 0 (in rank order); None elsewhere. Start-up only."""
        import torch.distributed as dist
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier(group=self.group)

    def broadcast_step(self, step) -> object:
        """Rank 0 sends `step` (plain Python lists); the others receive and return it."""
        import torch.distributed as dist
        box = [step]
        try:
            dist.broadcast_object_list(box, src=0, group=self.steps)
        except Exception as e:
            raise RankLostError(f"tensor-parallel step broadcast failed on rank {self.rank}: {e}") from e
        return box[0]
