"""One rank of a two-rank CPU group made by pdserve.engine.tp_ranks._init_group, for
test_tensor_parallel_server: `python tests/tp_group_probe.py RANK PORT STEP_TIMEOUT`.

Rank 0 stays idle for twice the step timeout (rank 1 waits for the next step meanwhile: that
wait must not time out), runs one step, then a second one in which rank 1 freezes (SIGSTOP)
before its all-reduce: rank 0's all-reduce must give up with RankLostError. Rank 0 prints
what happened and exits 0; the test kills the frozen rank 1."""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from pdserve.engine.tp_ranks import _init_group
from pdserve.models.tensor_parallel import RankLostError


def main(rank: int, port: int, step_timeout: float) -> None:
    g = _init_group(rank, 2, port, "cpu", step_timeout)
    if rank == 1:
        g.broadcast_step(None)
        g.all_reduce(torch.ones(1))
        g.broadcast_step(None)
        os.kill(os.getpid(), signal.SIGSTOP)   # frozen mid-step, before its all-reduce
        return
    time.sleep(2 * step_timeout)               # idle: rank 1 waits for the next step
    g.broadcast_step([1])
    print("step 1:", g.all_reduce(torch.ones(1)).item(), flush=True)
    g.broadcast_step([2])
    try:
        g.all_reduce(torch.ones(1))
        print("step 2: all-reduce returned", flush=True)
    except RankLostError as e:
        print(f"step 2: {e}", flush=True)
    os._exit(0)   # not the group's teardown with a frozen peer


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
