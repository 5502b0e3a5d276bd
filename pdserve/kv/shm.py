"""shm transport: the producer's KV pool lives in shared memory; a consumer on the same host
maps it and copies the blocks it needs straight into its own pool.

The pool is an anonymous memfd, not a named /dev/shm segment: nothing has a name that could
outlive the worker (a SIGKILLed worker leaks nothing). A consumer gets the file descriptor
over a Unix socket in the abstract namespace (SCM_RIGHTS), from a process of the same user,
and only for a one-time ticket that the KV server put in an authenticated handshake's offer
(abstract socket names are visible to every local process). The memfd is sealed against
new writable mappings, so what a consumer gets can be read, never written.
"""
from __future__ import annotations

import fcntl
import hmac
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time
import uuid
import warnings

import torch

log = logging.getLogger("pdserve.kv")
_CRED = struct.Struct("3i")   # SO_PEERCRED: pid, uid, gid
F_SEAL_FUTURE_WRITE = 0x10    # Linux >= 5.1: no new writable mapping or write(), ours keep working
TICKET_S = 60.0               # a ticket not used within this is void


class ShmPoolAllocator:
    """A kv_allocator for the engine: the pool tensor is backed by a memfd that consumers can
    map. Only CPU pools; on another device it falls back to an ordinary allocation."""

    def __init__(self):
        self.fd: int | None = None
        self.shapes: list[list[int]] = []      # every rank's pool shape, rank 0's first
        self._listener: socket.socket | None = None
        self._tickets: dict[str, float] = {}   # one-time ticket -> issued at (monotonic)
        self._lock = threading.Lock()

    def __call__(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=device)
        self.fd, self.map, tensor = memfd_tensor(shape, dtype)
        seal(self.fd)
        self._ro_fds = [os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)]
        self.shapes = [list(shape)]
        self.address = f"pdserve-kv-{uuid.uuid4().hex}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.address)
        self._listener.listen(16)
        threading.Thread(target=self._serve_fd, name="pdserve-kv-shm", daemon=True).start()
        return tensor

    def add_rank_pool(self, ro_fd: int, shape: tuple) -> None:
        """Hand out another tensor-parallel rank's pool beside ours (a read-only descriptor of a
        memfd that rank sealed, engine/tp_pools.py): consumers map every rank's pool."""
        self._ro_fds.append(ro_fd)
        self.shapes.append(list(shape))

    def issue_ticket(self) -> str:
        """A one-time ticket for the pool's descriptor, for an authenticated KV peer's offer."""
        now = time.monotonic()
        ticket = secrets.token_urlsafe(24)
        with self._lock:
            for t in [t for t, at in self._tickets.items() if now - at > TICKET_S]:
                del self._tickets[t]
            self._tickets[ticket] = now
        return ticket

    def _take_ticket(self, ticket: str) -> bool:
        with self._lock:
            for t in list(self._tickets):
                if hmac.compare_digest(t, ticket):
                    return time.monotonic() - self._tickets.pop(t) <= TICKET_S
        return False

    def _serve_fd(self) -> None:
        listener = self._listener   # close() sets the attribute to None
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            with conn:
                _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
                if uid not in (os.getuid(), 0):
                    log.warning("refused the KV pool to a process of uid %d", uid)
                    continue
                try:
                    conn.settimeout(2.0)
                    ticket = conn.recv(64).decode(errors="replace").strip()
                    if not self._take_ticket(ticket):
                        log.warning("refused the KV pool to a local process without a valid ticket")
                        continue
                    socket.send_fds(conn, [b"k"], self._ro_fds)
                except OSError:
                    pass

    def describe(self) -> dict | None:
        """What a consumer needs to map the pool; None when the pool is not in shared memory."""
        if self.fd is None:
            return None
        return {"socket": self.address, "shapes": self.shapes}

    def describe_for_peer(self) -> dict | None:
        """describe() plus a one-time ticket: what goes in one authenticated peer's offer."""
        desc = self.describe()
        return desc and {**desc, "ticket": self.issue_ticket()}

    def close(self) -> None:
        """Stop handing out the pool (its memory goes with the last process that maps it)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class ShmAttachment:
    """A consumer's mapping of a producer's pools (one per tensor-parallel rank), kept until the
    producer's engine id changes (the mappings stay valid even if the producer exits)."""

    def __init__(self, desc: dict, dtype: torch.dtype, timeout: float = 5.0):
        shapes = [tuple(s) for s in desc["shapes"]]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect("\0" + desc["socket"])
            s.sendall(str(desc.get("ticket", "")).encode()[:64])
            _, fds, _, _ = socket.recv_fds(s, 1, len(shapes))
        self.maps, self.tensors = [], []
        try:
            if len(fds) != len(shapes):
                raise OSError(f"the producer sent {len(fds)} file descriptors for {len(shapes)} KV pools")
            for fd, shape in zip(fds, shapes):
                count = torch.Size(shape).numel()
                nbytes = count * torch.empty(0, dtype=dtype).element_size()
                if os.fstat(fd).st_size < nbytes:
                    raise OSError("the producer's KV pool is smaller than its shape says")
                m = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)   # the descriptor is read-only
                with warnings.catch_warnings():   # torch warns of a read-only buffer: we only ever copy out of it
                    warnings.simplefilter("ignore", UserWarning)
                    self.tensors.append(torch.frombuffer(m, dtype=dtype, count=count).view(shape))
                self.maps.append(m)
        finally:
            for fd in fds:
                os.close(fd)

    @property
    def tensor(self) -> torch.Tensor:
        return self.tensors[0]


class ShmPath:
    """shm data path (consumer side): map the producer's pools once per engine id, then copy each
    piece out of them; the producer only authorises (nothing follows its reply)."""
    name = "shm"
    streams = False

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.attached: dict[str, ShmAttachment] = {}   # producer engine id -> its mapped pools

    def ready(self, engine_id: str, offer: dict) -> bool:
        """Map a producer's pools once; False if they cannot be mapped from here."""
        if engine_id in self.attached:
            return True
        try:
            self.attached[engine_id] = ShmAttachment(offer["shm"], self.dtype)
        except (OSError, KeyError, TypeError) as e:
            log.warning("cannot map the shared-memory KV pool of %s: %s", engine_id, e)
            return False
        return True

    def send(self, sock, pool, ids, pieces, deadline) -> int:
        return 0

    def receive(self, sock, offer, engine_id, pool, pieces, src, dst, deadline) -> int:
        return pool.copy_pieces(self.attached[engine_id].tensors, pieces, src, dst)


def memfd_tensor(shape: tuple, dtype: torch.dtype) -> tuple[int, mmap.mmap, torch.Tensor]:
    """A zero-filled tensor backed by a fresh anonymous memfd (mapped shared, writable)."""
    count = torch.Size(shape).numel()
    nbytes = max(count * torch.empty(0, dtype=dtype).element_size(), 1)
    fd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)   # zero-filled, like torch.zeros
    m = mmap.mmap(fd, nbytes)
    return fd, m, torch.frombuffer(m, dtype=dtype, count=count).view(shape)


def seal(fd: int) -> None:
    """No new writable mapping or write() of the memfd from now on (mappings made before keep
    working), so a descriptor handed out read-only stays read-only."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError as e:   # an old kernel: consumers still get a read-only descriptor
        log.warning("cannot seal the shared-memory KV pool against writes: %s", e)
