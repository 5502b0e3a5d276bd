"""GPU pools: tcp staging through host memory, and cuda_ipc between two processes.
Skipped without CUDA (the CPU-side logic of cuda_ipc is in test_kv_unit.py)."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from pdserve.kv.client import KVClient
from pdserve.kv.cuda_ipc import export_pool
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.server import KVServer
from pdserve.kv.auth import resolve_secret
from pdserve.kv.spec import KVSpec, host_id

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SHAPE = (4, 2, 16, 16, 2, 64)
SPEC = KVSpec("m", "bfloat16", 16, 2, 64, 4)
SECRET = resolve_secret("gpu test", None)   # the authenticated path, as across hosts


class Producer:
    def __init__(self, kv, offers):
        self.pool = BlockPool(kv)
        self.reply = {"ok": True, "spec": SPEC.to_dict(), "engine_id": "G", "host_id": host_id(),
                      "transports": offers, "shm": None,
                      "cuda_ipc": export_pool(kv) if "cuda_ipc" in offers else None}

    def hello_reply(self, remote, remote_tp=None):
        SPEC.check(remote)
        return self.reply

    def authorize(self, rid, token, ids, reader=None, part=(0, 1)):
        return None

    def unclaim(self, reader, rid=None):
        pass

    def done(self, rid, token, reader=None):
        return True

    def renew(self, rid, token):
        return True

    def served(self, n, s, transport):
        pass


def source_pool() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g).to(torch.bfloat16)


def producer_main(conn, offers):
    kv = source_pool().cuda()
    srv = KVServer(Producer(kv, offers), "127.0.0.1", secret=SECRET).start()
    conn.send(srv.port)
    conn.recv()
    srv.close()


@pytest.mark.parametrize("transport", ["tcp", "cuda_ipc"])
def test_gpu_pull(transport):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=producer_main, args=(child, [transport]), daemon=True)
    p.start()
    try:
        port = parent.recv()
        dst = torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda")
        client = KVClient(SPEC, BlockPool(dst), wanted=transport, secret=SECRET)
        rp = RemotePrefill("G", "127.0.0.1", port, [5, 6, 7, 12], "r", "t", 0, [0] * 60, [transport])
        n, used = client.pull(rp, [5, 6, 7, 12], [0, 1, 9, 10])
        assert used == transport and n == BlockPool(dst).stream_bytes(4)
        src = source_pool()
        assert torch.equal(dst[:, :, [0, 1, 9, 10]].cpu(), src[:, :, [5, 6, 7, 12]])
        assert not dst[:, :, [2, 3, 4, 5, 6, 7, 8, 11]].any()
        client.close()
        client.paths["cuda_ipc"].pools.clear()
    finally:
        parent.send("stop")
        p.join(20)
