"""Which KV heads each tensor-parallel rank of a worker holds, and how a pull between two
layouts moves them.

A layout is one [start, stop) range of the model's KV heads per rank (TPLayout.kv_heads_of;
ranks share a head when they outnumber the heads; `layout_of`). A pull is a list of pieces: copy local heads
[p_lo, p_hi) of the producer's rank `p_rank` into local heads [d_lo, d_hi) of the consumer's rank
`d_rank`, for every requested block, layer, K and V. Each consumer rank gets exactly the heads it
owns, from the first producer rank that holds each of them; consecutive heads from one producer
rank go as one piece.
"""
from __future__ import annotations

from typing import NamedTuple

from pdserve.kv.spec import KVHandshakeError
from pdserve.models.tensor_parallel import kv_head_ranges as layout_of   # noqa: F401  (the one rule)


class Piece(NamedTuple):
    p_rank: int
    p_lo: int
    p_hi: int
    d_rank: int
    d_lo: int
    d_hi: int


def to_wire(layout: list[range]) -> list[list[int]]:
    return [[r.start, r.stop] for r in layout]


def describe(layout: list[range]) -> str:
    return f"tensor parallel {len(layout)} (KV heads per rank: {to_wire(layout)})"


def from_wire(obj, num_kv_heads: int, whose: str) -> list[range]:
    """A peer's layout from its handshake; absent means one rank with every head (TP 1).
    Anything malformed is refused, naming what is wrong."""
    if obj is None:
        return [range(num_kv_heads)]
    ok = isinstance(obj, list) and 0 < len(obj) <= 1024 and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        and 0 <= r[0] < r[1] <= num_kv_heads for r in obj)
    if not ok:
        raise KVHandshakeError("tensor_parallel_layout", message=f"KV handshake refused: the {whose}'s "
                               f"tensor-parallel layout {str(obj)[:200]} is not a list of KV head ranges "
                               f"within the model's {num_kv_heads} KV heads")
    return [range(a, b) for a, b in obj]


def plan(producer: list[range], consumer: list[range]) -> list[Piece]:
    """The pieces that give every consumer rank its heads, in consumer rank order. Raises
    KVHandshakeError naming both layouts when a head the consumer needs is held by no producer
    rank (a layout this cannot map)."""
    owner = {}
    for k, heads in enumerate(producer):
        for h in heads:
            owner.setdefault(h, k)
    pieces: list[Piece] = []
    for r, heads in enumerate(consumer):
        for h in heads:
            k = owner.get(h)
            if k is None:
                raise KVHandshakeError("tensor_parallel_layout", message=(
                    f"KV handshake refused: KV head {h} of decode rank {r} is held by no rank of the prefill "
                    f"worker; cannot map the prefill worker's {describe(producer)} onto the decode worker's "
                    f"{describe(consumer)}"))
            p_lo, d_lo = h - producer[k].start, h - heads.start
            last = pieces[-1] if pieces else None
            if last and last.p_rank == k and last.d_rank == r and last.p_hi == p_lo and last.d_hi == d_lo:
                pieces[-1] = last._replace(p_hi=p_lo + 1, d_hi=d_lo + 1)
            else:
                pieces.append(Piece(k, p_lo, p_lo + 1, r, d_lo, d_lo + 1))
    return pieces


def by_rank(pieces: list[Piece]) -> list[list[Piece]]:
    """The pieces grouped by the consumer rank they fill (in rank order): a pull moves each group
    in parallel."""
    groups: dict[int, list[Piece]] = {}
    for p in pieces:
        groups.setdefault(p.d_rank, []).append(p)
    return [groups[r] for r in sorted(groups)]
