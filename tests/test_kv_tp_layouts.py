"""The KV hand-off between workers of different tensor-parallel sizes, without a model: a
producer with P rank pools and a consumer with D rank pools over the real KV server and client
(tcp and shm). Each consumer rank must end up with exactly its heads of the requested blocks,
as a slice of one reference pool that holds every head; the handshake refuses a layout it
cannot fill, naming both."""
from __future__ import annotations

import time

import pytest
import torch

from pdserve.kv import heads
from pdserve.kv.client import KVClient
from pdserve.kv.heads import Piece, layout_of, plan
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.server import KVServer
from pdserve.kv.shm import ShmPoolAllocator, memfd_tensor, seal
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id
from helpers import wait_for

LAYERS, BLOCKS, BS, HD = 2, 10, 4, 8


def spec(kv_heads: int) -> KVSpec:
    return KVSpec("m", "float32", BS, kv_heads, HD, LAYERS)


def split(full: torch.Tensor, layout: list[range]) -> list[torch.Tensor]:
    return [full[:, :, :, :, r.start:r.stop].contiguous() for r in layout]


class RankedProducer:
    """What KVServer needs from a connector, over P rank pools (rank 0's first)."""

    def __init__(self, full: torch.Tensor, size: int, shm: bool = False, layout=None):
        self.layout = layout or layout_of(size, full.shape[4])
        self.spec, self.alloc = spec(full.shape[4]), None
        pools = split(full, self.layout)
        if shm:   # every rank's pool in a memfd, rank 0's through the worker's allocator
            self.alloc = ShmPoolAllocator()
            own = self.alloc(pools[0].shape, torch.float32, torch.device("cpu"))
            own.copy_(pools[0])
            shared = [own]
            for p in pools[1:]:
                fd, _, t = memfd_tensor(p.shape, torch.float32)
                t.copy_(p)
                seal(fd)
                self.alloc.add_rank_pool(fd, p.shape)
                shared.append(t)
            pools = shared
        self.pool = BlockPool(pools[0], pools, self.layout)
        self.grants = {"r1": ("tok", set(range(BLOCKS)))}
        self.released = []

    def hello_reply(self, remote_spec, remote_tp=None):
        self.spec.check(remote_spec)
        heads.plan(self.layout, heads.from_wire(remote_tp, self.spec.num_kv_heads, "decode worker"))
        return {"ok": True, "spec": self.spec.to_dict(), "engine_id": "E1", "host_id": host_id(),
                "transports": ["shm", "tcp"] if self.alloc else ["tcp"],
                "shm": self.alloc.describe_for_peer() if self.alloc else None, "tp": heads.to_wire(self.layout)}

    claims = 0

    def authorize(self, rid, token, ids, reader=None, part=(0, 1)):
        self.claims += 1
        self.parts = getattr(self, "parts", []) + [part]
        g = self.grants.get(rid)
        return None if g and g[0] == token and set(ids) <= g[1] else "refused"

    def unclaim(self, reader, rid=None):
        pass

    def done(self, rid, token, reader=None):
        self.released.append(rid)
        return True

    def renew(self, rid, token):
        return True

    def served(self, n, s, transport):
        self.served_bytes = n


@pytest.fixture
def serve():
    servers = []

    def start(producer):
        s = KVServer(producer, "127.0.0.1").start()
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()
        if s.producer.alloc:
            s.producer.alloc.close()


def remote(port) -> RemotePrefill:
    return RemotePrefill("E1", "127.0.0.1", port, list(range(BLOCKS)), "r1", "tok", 5, [1] * 10, ["tcp"])


CASES = [(3, 1, 3), (1, 3, 3), (2, 1, 4), (1, 4, 4), (4, 2, 2), (2, 4, 2), (2, 2, 4), (1, 1, 4)]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("p_tp,d_tp,kv_heads", CASES)
def test_each_decode_rank_gets_exactly_its_heads(serve, transport, p_tp, d_tp, kv_heads):
    full = torch.randn(LAYERS, 2, BLOCKS, BS, kv_heads, HD)
    prod = RankedProducer(full, p_tp, shm=transport == "shm")
    srv = serve(prod)
    d_layout = layout_of(d_tp, kv_heads)
    d_pools = [torch.zeros(LAYERS, 2, BLOCKS, BS, len(r), HD) for r in d_layout]
    client = KVClient(spec(kv_heads), BlockPool(d_pools[0], d_pools, d_layout), wanted=transport)
    src, dst = [7, 8, 2], [0, 1, 5]
    n, used = client.pull(remote(srv.port), src, dst)
    assert used == transport
    assert n == sum(len(r) for r in d_layout) * 2 * LAYERS * len(src) * BS * HD * 4   # every head each rank owns
    for r, pool in zip(d_layout, d_pools):
        assert torch.equal(pool[:, :, dst], full[:, :, src, :, r.start:r.stop])
        assert not pool[:, :, [b for b in range(BLOCKS) if b not in dst]].any()   # nothing else written
    wait_for(lambda: prod.released == ["r1"], 10, "the producer never got `done`")
    ranks = len({p.d_rank for p in plan(prod.layout, d_layout)})
    # over tcp each decode rank pulls its pieces on a connection of its own, at once; a mapped
    # pool is authorised once and each rank's copies run in parallel
    assert sorted(prod.parts) == ([(i, ranks) for i in range(ranks)] if transport == "tcp" else [(0, 1)])


def test_the_plan_takes_each_head_once_from_the_first_rank_holding_it():
    assert plan(layout_of(3, 3), layout_of(1, 3)) == [Piece(0, 0, 1, 0, 0, 1), Piece(1, 0, 1, 0, 1, 2),
                                                      Piece(2, 0, 1, 0, 2, 3)]
    assert plan(layout_of(2, 4), layout_of(1, 4)) == [Piece(0, 0, 2, 0, 0, 2), Piece(1, 0, 2, 0, 2, 4)]
    assert plan(layout_of(4, 2), layout_of(1, 2)) == [Piece(0, 0, 1, 0, 0, 1), Piece(2, 0, 1, 0, 1, 2)]
    assert plan(layout_of(1, 4), layout_of(1, 4)) == [Piece(0, 0, 4, 0, 0, 4)]   # TP 1 -> 1: the whole pool


def test_a_layout_that_cannot_be_filled_is_refused_naming_both(serve):
    full = torch.randn(LAYERS, 2, BLOCKS, BS, 3, HD)
    # a producer whose ranks hold heads 0 and 1 only (not a layout pdserve makes; a broken peer)
    prod = RankedProducer(full, 2, layout=[range(0, 1), range(1, 2)])
    srv = serve(prod)
    pool = torch.zeros(LAYERS, 2, BLOCKS, BS, 3, HD)
    with pytest.raises(KVHandshakeError) as e:
        KVClient(spec(3), BlockPool(pool)).pull(remote(srv.port), [1], [1])
    assert e.value.field == "tensor_parallel_layout"
    assert "KV head 2" in str(e.value) and "[[0, 1], [1, 2]]" in str(e.value) and "[[0, 3]]" in str(e.value)
    assert not pool.any()
    # and the producer refuses, in the handshake, a consumer layout it cannot fill, by name
    srv2 = serve(RankedProducer(full, 1))
    with pytest.raises(KVHandshakeError) as e:
        KVClient(spec(3), BlockPool(pool, heads=[range(0, 4)])).pull(remote(srv2.port), [1], [1])
    assert e.value.field == "tensor_parallel_layout" and "decode worker" in str(e.value) and "[[0, 4]]" in str(e.value)


def test_malformed_pieces_are_refused_before_the_grant_is_spent(serve):
    from pdserve.kv.wire import recv_msg, send_msg
    full = torch.randn(LAYERS, 2, BLOCKS, BS, 2, HD)
    srv = serve(RankedProducer(full, 2))
    client = KVClient(spec(2), BlockPool(torch.zeros(LAYERS, 2, BLOCKS, BS, 2, HD)))
    sock, offer = client._connect(remote(srv.port), time.monotonic() + 30)
    for bad in ([[2, 0, 1]], [[0, 0, 2]], [[0, 1, 1]], "all", [[0, 0, True]]):
        send_msg(sock, {"op": "pull", "request_id": "r1", "token": "tok", "block_ids": [1],
                        "transport": "tcp", "pieces": bad})
        reply = recv_msg(sock)
        assert not reply["ok"] and "pieces" in reply["error"], bad
    sock.close()
    assert srv.producer.claims == 0
