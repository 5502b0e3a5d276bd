"""KV transfer throughput of each transport beside its raw medium, measured in the same run.

    python benchmarks/kv_transfer.py [--tokens 2000] [--repeat 5] [--json out.json] [--plot out.png]

For each cache shape (the default model, SmolLM2-135M on CPU in float32, and a Qwen3-0.6B-shaped
cache in bfloat16), the blocks of one prompt are pulled from a producer process by the real
KVServer/KVClient code (connect, handshake, pull, confirm), and compared with:
  tcp  -> a plain socket copy of the same number of bytes between the same two processes
  shm  -> one memcpy of the same number of bytes out of a shared-memory segment
  cuda_ipc -> one device-to-device copy of the same bytes (only where CUDA is present)
The ratio transport/medium is the figure of merit (goal: at least 0.8).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.kv.client import KVClient            # noqa: E402
from pdserve.kv.cuda_ipc import export_pool       # noqa: E402
from pdserve.kv.layout import BlockPool           # noqa: E402
from pdserve.kv.params import RemotePrefill       # noqa: E402
from pdserve.kv.server import KVServer            # noqa: E402
from pdserve.kv.shm import ShmPoolAllocator       # noqa: E402
from pdserve.kv.spec import KVSpec, host_id       # noqa: E402

CASES = {  # name -> (layers, kv heads, head dim, dtype)
    "SmolLM2-135M fp32": (30, 3, 64, "float32"),
    "Qwen3-0.6B bf16": (28, 8, 128, "bfloat16"),
}
BLOCK = 16


def spec_of(case: str) -> KVSpec:
    layers, heads, dim, dtype = CASES[case]
    return KVSpec("bench", dtype, BLOCK, heads, dim, layers)


def shape_of(spec: KVSpec, num_blocks: int) -> tuple:
    return (spec.num_layers, 2, num_blocks, BLOCK, spec.num_kv_heads, spec.head_dim)


class Producer:
    """A KV server's producer that holds one grant for everything (no engine needed)."""

    def __init__(self, kv, spec, transport, shm_desc):
        self.pool, self.spec = BlockPool(kv), spec
        self.reply = {"ok": True, "spec": spec.to_dict(), "engine_id": "bench", "host_id": host_id(),
                      "transports": [transport], "shm": shm_desc,
                      "cuda_ipc": export_pool(kv) if transport == "cuda_ipc" else None}

    def hello_reply(self, remote):
        self.spec.check(remote)
        return self.reply

    def authorize(self, rid, token, ids):
        return None

    def done(self, rid, token):
        return True

    def served(self, n, s, transport):
        pass


def producer_main(conn, case: str, transport: str, num_blocks: int, threads: int) -> None:
    torch.set_num_threads(threads)
    spec = spec_of(case)
    alloc = ShmPoolAllocator()
    device = torch.device("cuda" if transport == "cuda_ipc" else "cpu")
    kv = alloc(shape_of(spec, num_blocks), spec.torch_dtype, device)
    kv.copy_(torch.randn(kv.shape, dtype=torch.float32).to(kv.dtype))
    srv = KVServer(Producer(kv, spec, transport, alloc.describe()), "127.0.0.1").start()
    conn.send(srv.port)
    conn.recv()   # run until told to stop
    srv.close()
    alloc.close()


def raw_sender_main(conn, nbytes: int) -> None:
    """The medium for tcp: the same bytes over a plain socket, sendall from one buffer."""
    buf = bytearray(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as ls:
        conn.send(ls.getsockname()[1])
        s, _ = ls.accept()
        with s:
            while s.recv(1):
                s.sendall(buf)


def timed_pair(a, b, repeat: int) -> tuple[float, float]:
    """Best-of-repeat seconds of a and of b, alternated (after one warm-up each) so that both
    see the same moments of a shared, noisy machine."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(ta), min(tb)


def bench_transport(case, transport, tokens, repeat, threads) -> dict:
    spec = spec_of(case)
    n = -(-tokens // BLOCK)
    src_ids = list(range(7, 7 + n))            # a producer pool's blocks: one run, offset
    dst_ids = list(range(3, 3 + n))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=producer_main, args=(child, case, transport, n + 16, threads), daemon=True)
    p.start()
    helpers = []
    try:
        port = parent.recv()
        device = "cuda" if transport == "cuda_ipc" else "cpu"
        dst = torch.zeros(shape_of(spec, n + 8), dtype=spec.torch_dtype, device=device)
        client = KVClient(spec, BlockPool(dst), wanted=transport)
        rp = RemotePrefill("bench", "127.0.0.1", port, src_ids, "r", "t", 0, [0] * tokens, [transport])
        nbytes = BlockPool(dst).stream_bytes(n)
        pull = lambda: client.pull(rp, src_ids, dst_ids)   # noqa: E731
        pull()   # maps the producer's pool (shm, cuda_ipc): the medium copies from the same memory
        secs, medium = timed_pair(pull, raw_medium(transport, nbytes, ctx, client, dst, helpers), repeat)
    finally:
        parent.send("stop")
        p.join(10)
        for h in helpers:   # the raw sender process and our socket to it
            if isinstance(h, socket.socket):
                h.close()
            else:
                h.kill()
                h.join(5)
    return {"case": case, "transport": transport, "tokens": tokens, "blocks": n, "bytes": nbytes,
            "seconds": secs, "bytes_per_s": nbytes / secs, "medium_bytes_per_s": nbytes / medium,
            "ratio": medium / secs}


def raw_medium(transport, nbytes, ctx, client, dst, helpers):
    """A function doing one raw-medium copy of nbytes."""
    if transport == "tcp":
        parent, child = ctx.Pipe()
        p = ctx.Process(target=raw_sender_main, args=(child, nbytes), daemon=True)
        p.start()
        helpers.append(p)
        view = memoryview(bytearray(nbytes))
        s = socket.create_connection(("127.0.0.1", parent.recv()))
        helpers.append(s)

        def once():
            s.sendall(b"g")
            got = 0
            while got < nbytes:
                got += s.recv_into(view[got:])
        return once
    if transport == "shm":
        src = next(iter(client.shm.values())).tensor   # the memory the pulls read from
        out = torch.empty(nbytes, dtype=torch.uint8)   # kept alive by the closure below
        return lambda: ctypes.memmove(out.data_ptr(), src.data_ptr(), nbytes)
    if transport == "cuda_ipc":
        src = next(iter(client.ipc.pools.values())).view(-1).view(torch.uint8)[:nbytes]
        out = torch.empty(nbytes, dtype=torch.uint8, device=dst.device)

        def once():
            out.copy_(src)
            torch.cuda.synchronize()
        return once
    raise ValueError(transport)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process (copies)")
    ap.add_argument("--transports", default="tcp,shm,cuda_ipc")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        for t in args.transports.split(","):
            if t == "cuda_ipc" and not torch.cuda.is_available():
                print(f"{case:20s} {t:9s} skipped: no CUDA device", flush=True)
                continue
            r = bench_transport(case, t, args.tokens, args.repeat, args.threads)
            rows.append(r)
            print(f"{case:20s} {t:9s} {r['bytes'] / 1e6:8.1f} MB  {r['bytes_per_s'] / 1e9:6.2f} GB/s  "
                  f"medium {r['medium_bytes_per_s'] / 1e9:6.2f} GB/s  ratio {r['ratio']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot and rows:
        plot(rows, args.plot)
    worst = min(r["ratio"] for r in rows) if rows else 0
    print(f"lowest ratio {worst:.2f} (goal >= 0.80); median {statistics.median(r['ratio'] for r in rows):.2f}")
    return 0


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['case']}\n{r['transport']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    ax.bar([i - 0.2 for i in x], [r["medium_bytes_per_s"] / 1e9 for r in rows], 0.4, label="raw medium")
    ax.bar([i + 0.2 for i in x], [r["bytes_per_s"] / 1e9 for r in rows], 0.4, label="pdserve transport")
    for i, r in zip(x, rows):
        ax.text(i + 0.2, r["bytes_per_s"] / 1e9, f"{r['ratio']:.2f}", ha="center", va="bottom")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title(f"KV transfer of a {rows[0]['tokens']}-token prompt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
