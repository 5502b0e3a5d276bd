"""A CPU step's sequences as independent parts, each run by its own one-thread worker.

Splitting every op of a step over N OpenMP threads joins them at a barrier after each op: a
decode step of the default model is hundreds of them, and while a neighbour's process holds a
core, each barrier waits for the thread it descheduled (cpu_threads). Here the step's sequences
are divided into N parts of about equal work instead; each part runs the whole forward on one
thread of its own, and the parts meet once, at the end of the step. Beside two CPU hogs on two
cores such a process runs N threads the kernel shares out fairly, with nothing to wait on
between ops.

It is the engine's default only while neighbours hold cores (cpu_threads.Yielding): each part
reads every weight, where the op-split threads read half each, so idle it costs more than it
saves. Measured on 2 cores of an AVX-512 host, the 64-request workload of
benchmarks/engine_vs_vllm_cpu.py: idle, ops split over 2 threads 13.9-16.1 s against 2 parts
17.5-18.7 s; beside two CPU hogs, 2 parts 30-33 s against one thread (what the engine ran there
before) 35-42 s.

A step splits when it pays: at least two sequences and no part holding more than SPLIT_SHARE of
the step's work (a lone 2,000-token prefill, or batch-1 decode, runs on the op-split threads).
Rows of different sequences share nothing within a step: each writes its own KV slots, and a
block becomes a prefix-cache hit only after the step that computed it (BlockManager.commit).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

SPLIT_SHARE = 0.75   # the largest part's share of the step's work above which one part runs it


def plan_parts(costs: list[float], parts: int, share: float = SPLIT_SHARE) -> list[list[int]] | None:
    """Indices of `costs` in `parts` groups of about equal sum (longest first to the lightest
    group), each group in the input's order; None when the step should run as one part."""
    if parts < 2 or len(costs) < 2:
        return None
    parts = min(parts, len(costs))
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = min(range(parts), key=load.__getitem__)
        groups[g].append(i)
        load[g] += costs[i]
    total = sum(load)
    if total <= 0 or max(load) > share * total:
        return None
    return [sorted(g) for g in groups]


class PartWorkers:
    """`n` threads that each run torch ops on one OpenMP thread (the ICV is per thread: torch's
    count in the thread that set the engine's stays as it was)."""

    def __init__(self, n: int):
        import torch
        main = torch.get_num_threads()
        ready = threading.Barrier(n + 1)

        def init():
            torch.set_num_threads(1)
            torch.get_num_threads()   # torch reads its count once per thread, on first use: now, at 1
            ready.wait()

        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="pdserve-part", initializer=init)
        for _ in range(n):            # start every thread now, while nothing else sets the count
            self.pool.submit(lambda: None)
        ready.wait()
        torch.set_num_threads(main)   # the process default, for threads started later

    def run(self, fn, args_per_part: list[tuple]) -> list:
        """fn(*args) for each part on its own worker; the results in part order. A part that
        fails raises here only once every part has ended: none runs on into the next step."""
        futures: list[Future] = [self.pool.submit(fn, *a) for a in args_per_part]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
