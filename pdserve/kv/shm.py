"""shm transport: the producer's KV pool lives in shared memory; a consumer on the same host
maps it and copies the blocks it needs straight into its own pool.

The pool is an anonymous memfd, not a named /dev/shm segment: nothing has a name that could
outlive the worker (a SIGKILLed worker leaks nothing). A consumer gets the file descriptor
over a Unix socket in the abstract namespace (SCM_RIGHTS), from a process of the same user.
"""
from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import threading
import uuid

import torch

log = logging.getLogger("pdserve.kv")
_CRED = struct.Struct("3i")   # SO_PEERCRED: pid, uid, gid


class ShmPoolAllocator:
    """A kv_allocator for the engine: the pool tensor is backed by a memfd that consumers can
    map. Only CPU pools; on another device it falls back to an ordinary allocation."""

    def __init__(self):
        self.fd: int | None = None
        self.shape: tuple | None = None
        self._listener: socket.socket | None = None

    def __call__(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        count = torch.Size(shape).numel()
        nbytes = max(count * torch.empty(0, dtype=dtype).element_size(), 1)
        self.fd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)   # zero-filled, like torch.zeros
        self.map = mmap.mmap(self.fd, nbytes)
        self.shape = tuple(shape)
        self.address = f"pdserve-kv-{uuid.uuid4().hex}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.address)
        self._listener.listen(16)
        threading.Thread(target=self._serve_fd, name="pdserve-kv-shm", daemon=True).start()
        return torch.frombuffer(self.map, dtype=dtype, count=count).view(shape)

    def _serve_fd(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with conn:
                _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
                if uid not in (os.getuid(), 0):
                    log.warning("refused the KV pool to a process of uid %d", uid)
                    continue
                try:
                    socket.send_fds(conn, [b"k"], [self.fd])
                except OSError:
                    pass

    def describe(self) -> dict | None:
        """What a consumer needs to map the pool; None when the pool is not in shared memory."""
        if self.fd is None:
            return None
        return {"socket": self.address, "shape": list(self.shape)}

    def close(self) -> None:
        """Stop handing out the pool (its memory goes with the last process that maps it)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class ShmAttachment:
    """A consumer's mapping of a producer's pool, kept until the producer's engine id changes
    (the mapping stays valid even if the producer exits)."""

    def __init__(self, desc: dict, dtype: torch.dtype, timeout: float = 5.0):
        shape = tuple(desc["shape"])
        count = torch.Size(shape).numel()
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect("\0" + desc["socket"])
            _, fds, _, _ = socket.recv_fds(s, 1, 1)
        if not fds:
            raise OSError("the producer sent no file descriptor for its KV pool")
        try:
            if os.fstat(fds[0]).st_size < nbytes:
                raise OSError("the producer's KV pool is smaller than its shape says")
            self.map = mmap.mmap(fds[0], nbytes)
        finally:
            for fd in fds:
                os.close(fd)
        self.tensor = torch.frombuffer(self.map, dtype=dtype, count=count).view(shape)
