"""The tensor-parallel ranks of one worker, as vLLM's multiprocess executor: rank 0 is the
engine's own process (scheduler, block manager, sampler: it decides); ranks 1..N-1 are child
processes (`python -m pdserve.engine.tp_ranks`) that load their shard of the weights, keep the KV
blocks of their heads and run every step rank 0 broadcasts, until rank 0 ends them. torch.distributed
groups (`_init_group`): gloo on CPU, NCCL on CUDA for the all-reduces; gloo for the step broadcast.

On CPU each rank gets its own share of the worker's cores (and as many threads); a rank that
dies makes the next collective fail on rank 0 (RankLostError), and so does one that is frozen, after
`tp_step_timeout`: the engine loop ends, the worker exits non-zero and its supervisor restarts it;
the other ranks die with rank 0 (PDEATHSIG), with the broken group or by Ranks.stop.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading

from pdserve.models.tensor_parallel import RankLostError, TPGroup

# how long rank 0 waits for a rank to join, and the start-up collectives for their peers
JOIN_TIMEOUT_S = float(os.environ.get("PDSERVE_TP_TIMEOUT", "600"))
# how long ranks 1.. wait for rank 0's next step: as long as the worker is idle (a year: no limit)
IDLE_TIMEOUT = datetime.timedelta(days=365)


def split_cores(cores: list[int], size: int) -> list[list[int] | None]:
    """Each rank's cores: contiguous equal shares when there are enough, else every rank on
    all of them (None: leave the affinity as it is)."""
    if len(cores) < size:
        return [None] * size
    per = len(cores) // size
    return [cores[r * per:(r + 1) * per] for r in range(size)]


def threads_for(cores: list[int] | None, all_cores: list[int], size: int) -> int:
    return len(cores) if cores else max(1, len(all_cores) // size)


def _init_group(rank: int, size: int, port: int, device_type: str, step_timeout: float) -> TPGroup:
    import torch.distributed as dist
    if device_type == "cuda":   # rank r on the worker's r-th visible GPU (`up` sets CUDA_VISIBLE_DEVICES)
        import torch
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    # Two groups more, for serving. Steps (gloo, plain lists, also on CUDA): ranks 1.. wait there
    # for rank 0's next step as long as the worker is idle; rank 0 only step_timeout, as gloo's
    # send waits for the receiver (a frozen rank would hold it). In-step (the all-reduces):
    # step_timeout on every rank, so a frozen rank fails the step (RankLostError) within it.
    step = datetime.timedelta(seconds=step_timeout)
    steps = dist.new_group(backend="gloo", timeout=step if rank == 0 else IDLE_TIMEOUT)
    inner = dist.new_group(timeout=step)
    return TPGroup(size, rank, dist.group.WORLD, steps=steps, inner=inner)


def _place(cores: list[int] | None, threads: int, why: str) -> None:
    from pdserve import cpu_threads
    allowed = sorted(os.sched_getaffinity(0))
    cpu_threads.apply(cpu_threads.Placement(cores or allowed, threads, why, pin=cores is not None))


class Ranks:
    """Rank 0's handle on the others: start them, join the group, stop them."""

    def __init__(self, config, model_dir: str, max_positions: int):
        from pdserve.procs import free_port
        self.size = config.tensor_parallel_size
        self.port = free_port()
        allowed = sorted(os.sched_getaffinity(0))
        import torch
        self._before = (allowed, torch.get_num_threads())   # rank 0's placement, given back by stop()
        self.cores = split_cores(allowed, self.size)
        self.threads = [threads_for(c, allowed, self.size) for c in self.cores]
        cfg = json.dumps(dataclasses.asdict(config))
        self.procs = []
        self._stopping = threading.Event()
        for r in range(1, self.size):
            cmd = [sys.executable, "-m", "pdserve.engine.tp_ranks", "--rank", str(r), "--port", str(self.port),
                   "--config", cfg, "--model-dir", model_dir, "--max-positions", str(max_positions),
                   "--threads", str(self.threads[r])]
            if self.cores[r]:
                cmd += ["--cores", ",".join(map(str, self.cores[r]))]
            self.procs.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent))
        atexit.register(self.stop)
        _place(self.cores[0], self.threads[0], f"tensor-parallel rank 0 of {self.size}")
        self.group = _init_group(0, self.size, self.port, _device_type(config), config.tp_step_timeout)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def watch(self, on_lost) -> None:
        """Call on_lost(RankLostError) once, from a thread of its own, if a rank exits while
        serving: an idle engine would otherwise only notice at its next step."""
        def run():
            while self.procs and not self._stopping.wait(0.5):
                for r, p in enumerate(self.procs, start=1):
                    if p.poll() is not None:
                        on_lost(RankLostError(f"tensor-parallel rank {r} (pid {p.pid}) exited with {p.returncode}"))
                        return
        threading.Thread(target=run, name="pdserve-tp-watch", daemon=True).start()

    def stop(self) -> None:
        """End the other ranks (after the engine loop stopped: they hold no state of their own)."""
        self._stopping.set()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.send_signal(signal.SIGCONT)   # a frozen (SIGSTOPped) rank acts on SIGTERM once continued
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        from pdserve import cpu_threads   # this process may go on without ranks (tests, benchmarks)
        cores, threads = self._before
        cpu_threads.apply(cpu_threads.Placement(cores, threads, "tensor-parallel ranks stopped", pin=True))


def _device_type(config) -> str:
    from pdserve.engine.model_runner import pick_device
    return pick_device(config.device).type


def _die_with_parent() -> None:
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rank_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one tensor-parallel rank of a pdserve worker (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--max-positions", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cores", default=None)
    a = p.parse_args(argv)
    from pdserve import cpu_threads
    cpu_threads.prepare_env(a.threads)
    from pdserve.config import EngineConfig
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.models.loader import read_hf_config
    config = EngineConfig(**json.loads(a.config))
    if _device_type(config) == "cuda":
        config = dataclasses.replace(config, device=f"cuda:{a.rank}")
    cores = [int(c) for c in a.cores.split(",")] if a.cores else None
    _place(cores, a.threads, f"tensor-parallel rank {a.rank} of {config.tensor_parallel_size}")
    group = _init_group(a.rank, config.tensor_parallel_size, a.port, _device_type(config), config.tp_step_timeout)
    runner = ModelRunner(config, a.model_dir, read_hf_config(a.model_dir), a.max_positions, tp=group)
    try:
        runner.follow()
    except RankLostError as e:   # said here: rank 0 sees only its peer gone
        print(f"pdserve: tensor-parallel rank {a.rank}: {e}; exiting", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(rank_main())
