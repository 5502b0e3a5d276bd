"""shm transport: the producer's KV pool lives in POSIX shared memory; a consumer on the same
host maps it and copies the blocks it needs straight into its own pool."""
from __future__ import annotations

import logging
import mmap
import os
import uuid
from multiprocessing import shared_memory

import torch

log = logging.getLogger("pdserve.kv")


class ShmPoolAllocator:
    """A kv_allocator for the engine: the pool tensor is backed by a shared-memory segment.
    Only CPU pools; on another device it falls back to an ordinary allocation."""

    def __init__(self):
        self.segment: shared_memory.SharedMemory | None = None
        self.shape: tuple | None = None

    def __call__(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        # the resource tracker of this process unlinks the segment if the worker dies
        self.segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1),
                                                  name=f"pdserve-kv-{uuid.uuid4().hex[:16]}")
        self.shape = tuple(shape)
        return torch.frombuffer(self.segment.buf, dtype=dtype, count=torch.Size(shape).numel()).view(shape)

    def describe(self) -> dict | None:
        """What a consumer needs to map the pool; None when the pool is not in shared memory."""
        if self.segment is None:
            return None
        return {"name": self.segment.name, "shape": list(self.shape)}

    def close(self) -> None:
        """Unlink the segment (the mapping itself goes with the process)."""
        if self.segment is not None:
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass
            self.segment = None


class ShmAttachment:
    """A consumer's mapping of a producer's pool. The mapping stays valid even after the
    producer unlinks the segment, so it is kept until the producer's engine id changes.

    Mapped with mmap rather than SharedMemory(name): attaching through multiprocessing would
    register the segment with this process's resource tracker, which then unlinks (or
    complains about) a segment that is not ours."""

    def __init__(self, desc: dict, dtype: torch.dtype):
        shape = tuple(desc["shape"])
        count = torch.Size(shape).numel()
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        fd = os.open(os.path.join("/dev/shm", os.path.basename(desc["name"])), os.O_RDWR)
        try:
            if os.fstat(fd).st_size < nbytes:
                raise ValueError(f"shared-memory segment {desc['name']} is smaller than its pool")
            self.map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self.map, dtype=dtype, count=count).view(shape)
