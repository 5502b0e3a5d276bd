"""Framing on the KV control connection, and scatter/gather I/O of raw block bytes.

Control messages are length-prefixed JSON (a few per request, never per block). Block bytes
go straight from the producer's KV pool to the socket (sendmsg over a list of memoryviews)
and from the socket into the consumer's pool (recvmsg_into), with no copy in between.
"""
from __future__ import annotations

import json
import socket
import struct

_LEN = struct.Struct("!I")
MAX_MSG = 64 << 20       # a control message carries at most a prompt's token ids
IOV_MAX = 512            # buffers per sendmsg/recvmsg_into call (the OS limit is 1024)


class KVWireError(ConnectionError):
    pass


def send_msg(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_msg(sock: socket.socket) -> dict:
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if n > MAX_MSG:
        raise KVWireError(f"control message of {n} bytes is too large")
    obj = json.loads(recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise KVWireError("control message is not a JSON object")
    return obj


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_views(sock, [memoryview(buf)])
    return bytes(buf)


def send_views(sock: socket.socket, views: list[memoryview]) -> int:
    """Send the buffers back to back; returns the byte count."""
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        batch = views[i:i + IOV_MAX]
        sent = sock.sendmsg(batch)
        # skip what went out; a partly sent buffer stays at the front, trimmed
        while batch and sent >= batch[0].nbytes:
            sent -= batch[0].nbytes
            batch.pop(0)
            i += 1
        if sent:
            views = views[:i] + [views[i][sent:]] + views[i + 1:]
    return total


def recv_into_views(sock: socket.socket, views: list[memoryview]) -> int:
    """Fill the buffers back to back from the socket; raises if the peer closes early."""
    total = sum(v.nbytes for v in views)
    views = [v for v in views if v.nbytes]
    while views:
        got = sock.recvmsg_into(views[:IOV_MAX])[0]
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
