"""`pdserve up`'s supervisor on real child processes (short ones that exit at once, long ones that
sleep) with an injected clock: backoff doubling, the restart limit, a fresh count for a process
that stayed up, and a router restart that leaves the workers alone. The real deployment (a
SIGKILLed decode worker and router coming back) is in test_up_real.py."""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

import pytest

from pdserve.launch.supervise import Supervisor
from pdserve.procs import Proc

pytestmark = pytest.mark.slow  # starts processes

EXITS = [sys.executable, "-c", "import sys; sys.exit(3)"]
SLEEPS = ["sleep", "300"]


@dataclass
class W:
    name: str
    proc: Proc


class Children:
    """What the supervisor needs of a Cluster: its processes and how to start each again."""

    def __init__(self, tmp, worker_cmd):
        self.tmp, self.worker_cmd = tmp, worker_cmd
        self.workers = [W("decode0", self._start("decode0", worker_cmd))]
        self.router = self._start("router", SLEEPS)

    def _start(self, name, cmd):
        return Proc(cmd, str(self.tmp / f"{name}.log"), name)

    def respawn(self, w):
        w.proc = self._start(w.name, self.worker_cmd)

    def respawn_router(self):
        self.router = self._start("router", SLEEPS)

    def stop(self):
        for p in [self.router] + [w.proc for w in self.workers]:
            p.stop()


def test_backoff_and_limit(tmp_path):
    c = Children(tmp_path, EXITS)
    now, said = [0.0], []
    sup = Supervisor(c, max_restarts=2, backoff=1.0, say=said.append, clock=lambda: now[0])
    try:
        first = c.workers[0].proc
        first.popen.wait(60)
        router_pid = c.router.pid
        sup.check()
        assert said == [f"pdserve up: decode0 exited (3); restart 1 of 2 in 1 s; log: {first.log_path}"]
        now[0] = 0.9
        sup.check()
        assert c.workers[0].proc is first                    # not before the backoff
        now[0] = 1.0
        sup.check()
        second = c.workers[0].proc
        assert second is not first and said[-1] == f"pdserve up: restarted decode0 (pid {second.pid})"
        second.popen.wait(60)
        sup.check()
        assert said[-1].endswith("restart 2 of 2 in 2 s; log: " + second.log_path)   # doubled
        now[0] = 3.0
        sup.check()
        c.workers[0].proc.popen.wait(60)
        sup.check()
        assert "not restarting it: 2 restart(s) in a row already" in said[-1]
        n = len(said)
        now[0] = 100.0
        sup.check()
        assert len(said) == n and sup.restarted == {"decode0": 2}      # given up, said once
        assert c.router.pid == router_pid and c.router.alive()         # the router was left alone
    finally:
        c.stop()


def test_router_restart_and_fresh_count(tmp_path):
    c = Children(tmp_path, SLEEPS)
    now, said = [0.0], []
    sup = Supervisor(c, max_restarts=1, backoff=2.0, stable_s=600.0, say=said.append, clock=lambda: now[0])
    try:
        worker_pid = c.workers[0].proc.pid
        for round_ in range(3):            # one restart in a row allowed: it must be earned back
            c.router.stop(signal.SIGKILL)
            sup.check()
            assert said[-1].startswith("pdserve up: router exited (-9); restart 1 of 1 in 2 s")
            now[0] += 2.0
            sup.check()
            assert c.router.alive() and said[-1].startswith("pdserve up: restarted router")
            now[0] += 600.0                  # stayed up: a fresh count
            sup.check()
        assert sup.restarted == {"router": 3}
        assert c.workers[0].proc.pid == worker_pid and c.workers[0].proc.alive()
        c.router.stop(signal.SIGKILL)        # killed again soon after a restart: over the limit
        sup.check()
        now[0] += 2.0
        sup.check()
        c.router.stop(signal.SIGKILL)
        sup.check()
        assert "not restarting it" in said[-1]
    finally:
        c.stop()


def test_no_restarts_when_off(tmp_path):
    c = Children(tmp_path, EXITS)
    said = []
    sup = Supervisor(c, max_restarts=0, say=said.append, clock=lambda: 0.0)
    try:
        c.workers[0].proc.popen.wait(60)
        sup.check()
        assert "restarts are off (--max-restarts 0)" in said[-1] and not sup.restarted
    finally:
        c.stop()
