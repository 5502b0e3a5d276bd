"""The KV layer without a model: wire framing, block runs, handshake, the tcp and shm
transports between two in-process pools, cuda_ipc handle bookkeeping, transport selection.
Copies are checked against plain tensor indexing of the source pool."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

from pdserve.errors import RequestError
from pdserve.kv import cuda_ipc
from pdserve.kv.client import KVClient, KVPullError
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.select import check_consumer, choose, producer_offers
from pdserve.kv.server import KVServer
from pdserve.kv.shm import ShmPoolAllocator
from pdserve.kv.spec import KVHandshakeError, KVSpec, host_id
from pdserve.kv.wire import id_runs, recv_into_views, runs, send_views

SHAPE = (3, 2, 12, 4, 2, 8)   # layers, K/V, blocks, block size, kv heads, head dim


def spec(dtype=torch.float32, **kw) -> KVSpec:
    d = dict(model="m", dtype=str(dtype).removeprefix("torch."), block_size=4, num_kv_heads=2, head_dim=8,
             num_layers=3)
    d.update(kw)
    return KVSpec(**d)


class FakeProducer:
    """What KVServer needs from a connector: the pool, the handshake, grants."""

    def __init__(self, kv: torch.Tensor, offers=("tcp",), shm=None, engine_id="E1"):
        self.pool, self.spec = BlockPool(kv), spec(kv.dtype)
        self.offers, self.shm, self.engine_id = list(offers), shm, engine_id
        self.grants = {"r1": ("tok", {7, 8, 2, 3})}
        self.released = []

    def hello_reply(self, remote, remote_tp=None):
        self.spec.check(remote)
        self.hellos = getattr(self, "hellos", 0) + 1
        shm = self.shm.describe_for_peer() if hasattr(self.shm, "describe_for_peer") else self.shm
        return {"ok": True, "spec": self.spec.to_dict(), "engine_id": self.engine_id, "host_id": host_id(),
                "transports": self.offers, "shm": shm}

    def authorize(self, rid, token, ids, reader=None, part=(0, 1)):
        g = self.grants.get(rid)
        return None if g and g[0] == token and set(ids) <= g[1] else "refused"

    def unclaim(self, reader, rid=None):
        pass

    def done(self, rid, token, reader=None):
        ok = self.grants.get(rid, ("",))[0] == token
        if ok:
            self.released.append(rid)
            del self.grants[rid]
        return ok

    def renew(self, rid, token):
        self.renewed = getattr(self, "renewed", []) + [rid]
        return self.grants.get(rid, ("",))[0] == token

    def served(self, n, s, transport):
        pass


def wait_released(prod, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not prod.released:
        assert time.monotonic() < deadline, "the producer never got `done`"
        time.sleep(0.01)
    return prod.released


def remote(port, token="tok", engine_id="E1", ids=(7, 8, 2)) -> RemotePrefill:
    return RemotePrefill(engine_id, "127.0.0.1", port, list(ids), "r1", token, 5, [1] * 10, ["tcp"])


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


def random_pool(dtype=torch.float32, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape).to(dtype)


# ---- wire -----------------------------------------------------------------------------------
def test_runs():
    assert runs([7, 8, 2, 3], [0, 1, 2, 3]) == [(7, 0, 2), (2, 2, 2)]
    assert runs([1, 2, 3], [5, 9, 10]) == [(1, 5, 1), (2, 9, 2)]
    assert id_runs([4, 5, 6, 9]) == [(4, 3), (9, 1)]
    assert runs([], []) == []


def test_scatter_gather_over_a_socket():
    a, b = socket.socketpair()
    rng = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 5000, (1500,), generator=rng).tolist()   # more buffers than one sendmsg takes
    src = [os.urandom(n) for n in sizes]
    dst = [bytearray(n) for n in sizes]
    t = threading.Thread(target=send_views, args=(a, [memoryview(x) for x in src]))
    t.start()
    assert recv_into_views(b, [memoryview(x) for x in dst]) == sum(sizes)
    t.join()
    assert [bytes(x) for x in dst] == src
    a.close(), b.close()


def test_spec_check_names_the_field():
    with pytest.raises(KVHandshakeError) as e:
        spec().check(spec(block_size=32).to_dict())
    assert e.value.field == "block_size" and "block_size" in str(e.value) and "32" in str(e.value)
    with pytest.raises(KVHandshakeError) as e:
        spec().check(spec(torch.bfloat16).to_dict())
    assert e.value.field == "dtype"
    spec().check(spec().to_dict())


# ---- transports ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tcp_pull_lands_in_the_right_blocks(serve, dtype):
    src = random_pool(dtype)
    prod = FakeProducer(src)
    srv = serve(prod)
    dst = torch.zeros(SHAPE, dtype=dtype)
    n, transport = KVClient(spec(dtype), BlockPool(dst)).pull(remote(srv.port), [7, 8, 2], [0, 1, 5])
    assert transport == "tcp" and n == BlockPool(dst).stream_bytes(3)
    assert torch.equal(dst[:, :, [0, 1, 5]], src[:, :, [7, 8, 2]])
    untouched = [i for i in range(SHAPE[2]) if i not in (0, 1, 5)]
    assert not dst[:, :, untouched].any()
    assert wait_released(prod) == ["r1"]   # one-time: the grant is gone after `done`
    with pytest.raises(KVPullError, match="refused"):
        KVClient(spec(dtype), BlockPool(dst)).pull(remote(srv.port), [7], [0])


def test_shm_pull(serve):
    before = set(os.listdir("/dev/shm"))
    alloc = ShmPoolAllocator()
    src = alloc(SHAPE, torch.float32, torch.device("cpu"))
    src.copy_(random_pool())
    try:
        assert set(os.listdir("/dev/shm")) == before   # an anonymous memfd: no name to leak
        prod = FakeProducer(src, offers=("shm", "tcp"), shm=alloc)
        srv = serve(prod)
        dst = torch.zeros(SHAPE)
        client = KVClient(spec(), BlockPool(dst), wanted="auto")
        n, transport = client.pull(remote(srv.port), [2, 3, 7], [9, 10, 4])
        assert transport == "shm" and n == BlockPool(dst).stream_bytes(3)
        assert torch.equal(dst[:, :, [9, 10, 4]], src[:, :, [2, 3, 7]])
        assert wait_released(prod) == ["r1"]
    finally:
        alloc.close()


def test_shm_falls_back_to_tcp_when_the_pool_cannot_be_mapped(serve):
    src = random_pool()
    prod = FakeProducer(src, offers=("shm", "tcp"), shm={"socket": "pdserve-kv-nobody-listens", "shape": list(SHAPE)})
    srv = serve(prod)
    dst = torch.zeros(SHAPE)
    n, transport = KVClient(spec(), BlockPool(dst), wanted="auto").pull(remote(srv.port), [7, 8], [0, 1])
    assert transport == "tcp" and torch.equal(dst[:, :, [0, 1]], src[:, :, [7, 8]])
    with pytest.raises(KVPullError, match="shared-memory"):
        KVClient(spec(), BlockPool(dst), wanted="shm").pull(remote(srv.port), [7, 8], [0, 1])


def test_connection_and_handshake_reused_across_pulls(serve):
    src = random_pool()
    prod = FakeProducer(src)
    prod.grants["r2"] = ("tok2", {4, 5})
    srv = serve(prod)
    dst = torch.zeros(SHAPE)
    client = KVClient(spec(), BlockPool(dst))
    client.pull(remote(srv.port), [7, 8], [0, 1])
    rp2 = RemotePrefill("E1", "127.0.0.1", srv.port, [4, 5], "r2", "tok2", 5, [1] * 8, ["tcp"])
    client.pull(rp2, [4, 5], [2, 3])
    assert torch.equal(dst[:, :, [0, 1, 2, 3]], src[:, :, [7, 8, 4, 5]])
    assert prod.hellos == 1
    client.close()


def test_handshake_refusal_and_restart_are_errors(serve):
    srv = serve(FakeProducer(random_pool()))
    dst = BlockPool(torch.zeros(SHAPE))
    with pytest.raises(KVHandshakeError) as e:
        KVClient(spec(block_size=8), dst).pull(remote(srv.port), [7], [0])
    assert e.value.field == "block_size"
    with pytest.raises(KVPullError, match="restarted"):
        KVClient(spec(), dst).pull(remote(srv.port, engine_id="E0"), [7], [0])
    port = srv.port
    srv.close()
    with pytest.raises(KVPullError, match="cannot reach"):
        KVClient(spec(), dst, timeout=2).pull(remote(port), [7], [0])


def test_release_without_pull(serve):
    prod = FakeProducer(random_pool())
    srv = serve(prod)
    KVClient(spec(block_size=8), BlockPool(torch.zeros(SHAPE))).release(remote(srv.port))  # no handshake needed
    assert prod.released == ["r1"]


# ---- cuda_ipc bookkeeping (no GPU needed) --------------------------------------------------------
def fake_ipc_args():
    return (torch.Tensor, torch.Size([3, 2, 12]), (24, 12, 1), 0, torch.storage.TypedStorage, torch.bfloat16, 0,
            b"\x00handle\xff", 1 << 20, 0, False, b"refcount", 64, b"event", True)


def test_cuda_ipc_handle_round_trips_as_json():
    import json
    enc = cuda_ipc.encode_args(fake_ipc_args())
    assert cuda_ipc.decode_args(json.loads(json.dumps(enc))) == fake_ipc_args()


def test_cuda_ipc_handle_rejects_other_classes():
    enc = cuda_ipc.encode_args(fake_ipc_args())
    with pytest.raises(ValueError):
        cuda_ipc.decode_args({**enc, "storage_cls": "os.system"})
    with pytest.raises((ValueError, AttributeError)):
        cuda_ipc.decode_args({**enc, "dtype": "nn"})


def test_imported_pools_open_once_per_producer():
    opened = []
    pools = cuda_ipc.ImportedPools(opener=lambda d: opened.append(d) or torch.zeros(1))
    a = pools.get("E1", {"h": 1})
    assert pools.get("E1", {"h": 1}) is a and opened == [{"h": 1}]
    pools.get("E2", {"h": 2})
    pools.drop("E1")
    pools.get("E1", {"h": 3})   # a restarted producer: opened again
    assert opened == [{"h": 1}, {"h": 2}, {"h": 3}]


# ---- selection and params -------------------------------------------------------------------
def test_transport_selection():
    assert producer_offers("auto", "cpu", True, False) == ["shm", "tcp"]
    assert producer_offers("auto", "cuda", False, True) == ["cuda_ipc", "tcp"]
    assert producer_offers("tcp", "cpu", True, False) == ["tcp"]
    with pytest.raises(ValueError, match="not available"):
        producer_offers("cuda_ipc", "cpu", True, False)
    with pytest.raises(ValueError, match="NIXL"):
        producer_offers("nixl", "cpu", True, False)
    with pytest.raises(ValueError, match="on a GPU"):
        check_consumer("cuda_ipc", "cpu")
    check_consumer("shm", "cuda")
    assert choose("auto", ["cuda_ipc", "shm", "tcp"], True, "cuda") == "cuda_ipc"
    assert choose("auto", ["cuda_ipc", "tcp"], True, "cpu") == "tcp"
    assert choose("auto", ["shm", "tcp"], True, "cuda") == "shm"
    assert choose("auto", ["cuda_ipc", "shm", "tcp"], False, "cuda") == "tcp"   # other host
    with pytest.raises(ValueError, match="cannot be used"):
        choose("shm", ["shm", "tcp"], False, "cpu")


def test_params_round_trip_and_validation():
    rp = remote(1234)
    assert RemotePrefill.from_params(rp.to_params()) == rp
    p = rp.to_params()
    assert p["do_remote_prefill"] and not p["do_remote_decode"]
    for broken in ({**p, "remote_port": "x"}, {k: v for k, v in p.items() if k != "kv_token"},
                   {**p, "remote_block_ids": []}, {**p, "remote_block_ids": [1, "a"]}, {**p, "remote_port": 0}):
        with pytest.raises(RequestError) as e:
            RemotePrefill.from_params(broken)
        assert e.value.param == "kv_transfer_params"
