"""Rank 0's hold on every tensor-parallel rank's KV pool, so that one KV endpoint per worker
(its connector, in rank 0) can serve and fill the blocks of every rank's heads.

On CPU each rank r > 0 allocates its pool in an anonymous memfd (`RankPoolAllocator`) and tells
rank 0 its pid and descriptor number over the group; rank 0 (the ranks' parent, same user) opens
it through /proc and maps it shared, writable (a decode worker writes pulled heads into it), and
a second, read-only descriptor goes to the worker's shm allocator for consumers to map. Once rank
0 has its mappings, each rank seals its memfd against new writable mappings. On CUDA each rank
exports its pool by IPC and rank 0 opens the handles. Every rank's ModelRunner does this right
after it allocated its pool (the same collectives in the same order).
"""
from __future__ import annotations

import mmap
import os

import torch

from pdserve.kv import cuda_ipc
from pdserve.kv.shm import memfd_tensor, seal


class RankPoolAllocator:
    """kv_allocator of a rank r > 0: its pool in a memfd rank 0 can map (plain on CUDA)."""

    def __init__(self):
        self.fd: int | None = None
        self.tensor: torch.Tensor | None = None

    def __call__(self, shape, dtype, device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        else:
            self.fd, self._map, self.tensor = memfd_tensor(shape, dtype)
        return self.tensor

    def describe(self) -> dict:
        if self.fd is not None:
            return {"pid": os.getpid(), "fd": self.fd, "shape": list(self.tensor.shape)}
        return {"cuda_ipc": cuda_ipc.export_pool(self.tensor)}


def share_pool(group, alloc: RankPoolAllocator) -> None:
    """Rank r > 0: give rank 0 its pool, then seal it once rank 0 has mapped it."""
    group.gather_to_0(alloc.describe())
    group.barrier()
    if alloc.fd is not None:
        seal(alloc.fd)


def open_pools(group, own: torch.Tensor, shm_allocator=None) -> tuple[list[torch.Tensor], list]:
    """Rank 0: every rank's pool (its own first), and the CUDA IPC descriptions of ranks > 0 (for
    a cuda_ipc consumer; an imported handle cannot be exported again). Ranks > 0's read-only
    descriptors are registered with `shm_allocator` (when the worker offers shm)."""
    descs = group.gather_to_0(None)[1:]
    pools, ipc = [own], []
    for d in descs:
        if "cuda_ipc" in d:
            ipc.append(d["cuda_ipc"])
            pools.append(cuda_ipc.ImportedPools().get("", d["cuda_ipc"]))
            continue
        path = f"/proc/{int(d['pid'])}/fd/{int(d['fd'])}"
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            shape = tuple(d["shape"])
            m = mmap.mmap(fd, os.fstat(fd).st_size)
            pools.append(torch.frombuffer(m, dtype=own.dtype, count=torch.Size(shape).numel()).view(shape))
        finally:
            os.close(fd)
        if shm_allocator is not None and getattr(shm_allocator, "fd", None) is not None:
            shm_allocator.add_rank_pool(os.open(path, os.O_RDONLY | os.O_CLOEXEC), shape)
    group.barrier()
    return pools, ipc   # (each tensor keeps its mapping alive)
