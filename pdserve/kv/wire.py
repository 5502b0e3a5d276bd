"""Framing on the KV control connection, and scatter/gather I/O of raw block bytes.

Control messages are length-prefixed JSON (a few per request, never per block). Block bytes
go straight from the producer's KV pool to the socket (sendmsg over a list of memoryviews)
and from the socket into the consumer's pool (recvmsg_into), with no copy in between.
"""
from __future__ import annotations

import json
import socket
import ssl
import struct
import time

_LEN = struct.Struct("!I")
MAX_MSG = 1 << 20        # default bound of one control message; callers pass tighter ones
IOV_MAX = 512            # buffers per sendmsg/recvmsg_into call (the OS limit is 1024)
TLS_CHUNK = 1 << 20      # bytes per send on a TLS socket (it encrypts through its own buffers)


class KVWireError(ConnectionError):
    pass


class KVTimeout(KVWireError):
    """A deadline passed: the peer is too slow (or silent); the connection is not reusable."""


def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Make the next blocking call on sock give up at `deadline` (a time.monotonic() value):
    a deadline for a whole exchange, not a timeout per read that a trickling peer resets."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise KVTimeout("the KV transfer deadline passed")
    sock.settimeout(left)


def send_msg(sock: socket.socket, obj: dict, deadline: float | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    _arm(sock, deadline)
    try:
        sock.sendall(_LEN.pack(len(data)) + data)
    except socket.timeout as e:
        raise KVTimeout("the KV transfer deadline passed while sending") from e


def recv_msg(sock: socket.socket, max_size: int = MAX_MSG, deadline: float | None = None) -> dict:
    """One control message of at most max_size bytes, all of it before `deadline`. The bound
    is checked before anything is allocated: a peer cannot make us reserve more by claiming it."""
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size, deadline))
    if n > max_size:
        raise KVWireError(f"control message of {n} bytes is too large (at most {max_size} here)")
    try:
        obj = json.loads(recv_exact(sock, n, deadline))
    except ValueError as e:   # undecodable bytes are the peer's fault, like a broken frame
        raise KVWireError(f"control message is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise KVWireError("control message is not a JSON object")
    return obj


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    recv_into_views(sock, [memoryview(buf)], deadline)
    return bytes(buf)


def send_views(sock: socket.socket, views: list[memoryview], deadline: float | None = None) -> int:
    """Send the buffers back to back; returns the byte count."""
    total = sum(v.nbytes for v in views)
    if isinstance(sock, ssl.SSLSocket):   # no sendmsg on TLS: one buffer at a time, deadline each send
        for v in views:
            v = v.cast("B")
            for off in range(0, v.nbytes, TLS_CHUNK):
                _arm(sock, deadline)
                try:
                    sock.sendall(v[off:off + TLS_CHUNK])
                except socket.timeout as e:
                    raise KVTimeout("the KV transfer deadline passed while sending") from e
        return total
    i = 0
    while i < len(views):
        batch = views[i:i + IOV_MAX]
        _arm(sock, deadline)
        try:
            sent = sock.sendmsg(batch)
        except socket.timeout as e:
            raise KVTimeout("the KV transfer deadline passed while sending") from e
        # skip what went out; a partly sent buffer stays at the front, trimmed
        while batch and sent >= batch[0].nbytes:
            sent -= batch[0].nbytes
            batch.pop(0)
            i += 1
        if sent:
            views = views[:i] + [views[i][sent:]] + views[i + 1:]
    return total


def recv_into_views(sock: socket.socket, views: list[memoryview], deadline: float | None = None) -> int:
    """Fill the buffers back to back from the socket; raises if the peer closes early, or
    KVTimeout when `deadline` passes first however steadily the bytes trickle in."""
    total = sum(v.nbytes for v in views)
    tls = isinstance(sock, ssl.SSLSocket)   # no recvmsg_into on TLS: one buffer at a time
    views = [v.cast("B") if tls else v for v in views if v.nbytes]
    while views:
        _arm(sock, deadline)
        try:
            got = sock.recv_into(views[0]) if tls else sock.recvmsg_into(views[:IOV_MAX])[0]
        except socket.timeout as e:
            raise KVTimeout("the KV transfer deadline passed while receiving") from e
        if got == 0:
            raise KVWireError("the KV peer closed the connection mid-transfer")
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views.pop(0)
        if got:
            views[0] = views[0][got:]
    return total


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Pair up (src block, dst block) lists as (src start, dst start, length) runs in which
    both sides are consecutive, so each run is one contiguous copy per layer."""
    out: list[list[int]] = []
    for s, d in zip(src, dst):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1][2] += 1
        else:
            out.append([s, d, 1])
    return [tuple(r) for r in out]


def id_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Consecutive stretches of block ids as (start, length)."""
    return [(s, n) for s, _, n in runs(ids, ids)]
