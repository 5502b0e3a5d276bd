"""`pdserve up` keeps its processes running: a worker or the router that exits is started again.

A restarted worker binds the same port, so the router (whose health loop checks every
instance, down ones included) takes it back once it answers /health. A restarted router gets
the same port and the same workers; the workers are not touched. Each process is restarted
at most `max_restarts` times in a row, after a backoff that doubles from `backoff` up to
`max_backoff` seconds; one that then stays up for `stable_s` earns a fresh count. check() never
waits: it starts processes and returns, and `pdserve up` calls it about once a second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Track:
    started: float            # when the current process was started
    restarts: int = 0         # in a row, reset once a process stays up for stable_s
    due: float | None = None  # when the pending restart may run (None: none pending)
    gave_up: bool = False


class Supervisor:
    def __init__(self, cluster, max_restarts: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 stable_s: float = 600.0, say: Callable[[str], None] = print, clock=time.monotonic):
        self.c, self.max_restarts, self.backoff, self.max_backoff = cluster, max_restarts, backoff, max_backoff
        self.stable_s, self.say, self.clock = stable_s, say, clock
        self.tracks: dict[str, _Track] = {}
        self.restarted: dict[str, int] = {}   # name -> restarts so far, for the tests and the log

    def _procs(self):
        """(name, current Proc, how to start it again) for every process of the deployment."""
        for w in self.c.workers:
            yield w.name, w.proc, (lambda w=w: self.c.respawn(w))
        if self.c.router is not None:
            yield "router", self.c.router, self.c.respawn_router

    def check(self) -> None:
        now = self.clock()
        for name, proc, start in self._procs():
            t = self.tracks.setdefault(name, _Track(now))
            if proc.alive():
                if t.due is None and t.restarts and now - t.started >= self.stable_s:
                    t.restarts = 0
                continue
            if t.gave_up:
                continue
            if t.due is None:                      # newly found dead
                if t.restarts >= self.max_restarts:
                    t.gave_up = True
                    why = (f"{t.restarts} restart(s) in a row already" if self.max_restarts
                           else "restarts are off (--max-restarts 0)")
                    self.say(f"pdserve up: {name} exited ({proc.returncode()}); not restarting it: {why}; "
                             f"log: {proc.log_path}")
                    continue
                delay = min(self.max_backoff, self.backoff * 2 ** t.restarts)
                t.due = now + delay
                self.say(f"pdserve up: {name} exited ({proc.returncode()}); restart {t.restarts + 1} of "
                         f"{self.max_restarts} in {delay:g} s; log: {proc.log_path}")
            elif now >= t.due:
                start()
                t.restarts, t.due, t.started = t.restarts + 1, None, now
                self.restarted[name] = self.restarted.get(name, 0) + 1
                self.say(f"pdserve up: restarted {name} (pid {self._current(name).pid})")

    def _current(self, name: str):
        return next(p for n, p, _ in self._procs() if n == name)
