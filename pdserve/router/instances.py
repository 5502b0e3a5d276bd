"""The router's view of its workers: who they are, whether they answer, how busy they are.

Plain state plus one health-check loop. A request that cannot reach an instance marks it down
at once (no need to wait for the next check); the periodic check brings it back. A check that
gets no answer in time takes an instance that has answered before down only when it is the
MISSED_CHECKS-th in a row: a worker whose machine is busy may answer late once (measured: a
decode worker beside two CPU hogs and three TP ranks missed single 1 s checks mid-stream, and
its in-flight calls were given up on), while a dead one refuses at once and a frozen one keeps
missing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger("pdserve.router")

ROLES = ("prefill", "decode")
MISSED_CHECKS = 2   # health checks in a row with no answer in time that take a reachable instance down


def normalize_url(addr: str) -> str:
    """'host:port', 'http://host:port/' -> 'http://host:port'."""
    addr = addr.strip().rstrip("/")
    if not addr:
        raise ValueError("empty instance address")
    if "://" not in addr:
        addr = "http://" + addr
    return addr


def split_addrs(values: list[str] | None) -> list[str]:
    """Repeatable and comma-separated flags: ['a:1,b:2', 'c:3'] -> ['http://a:1', ...]."""
    return [normalize_url(a) for v in values or [] for a in v.split(",") if a.strip()]


@dataclass
class Instance:
    url: str
    role: str                      # prefill | decode (a `both` worker in the decode pool prefills locally)
    healthy: bool = True           # optimistic until a check or a request says otherwise
    reachable: bool = False        # has answered since the router started (the log's words depend on it)
    in_flight: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    down_since: float | None = None
    requests: int = 0
    failures: int = 0
    assigned: int = 0              # requests routed here and not finished (in_flight counts only calls)
    draining: bool = False         # no new requests: it is about to be removed
    missed: int = 0                # health checks in a row that got no answer in time
    late: bool = False             # down for missed checks only: reachable, maybe just busy
    meta: dict = field(default_factory=dict)   # who registered it says where it runs (e.g. ray_node_id)
    # calls that would rather give up than wait on an instance that went down (see went_down)
    _down_waiters: set = field(default_factory=set, repr=False)

    def mark_down(self, error: str, late: bool = False) -> bool:
        """Record a failure; True if this took a healthy instance down. late: the instance
        stopped answering health checks in time but never refused one (see went_down)."""
        self.late = late
        self.last_error, self.last_error_time = error, time.time()
        self.failures += 1
        was = self.healthy
        self.healthy = False
        if was:
            self.down_since = time.time()
            if self.reachable:
                log.warning("%s instance %s is down: %s", self.role, self.url, error)
            else:   # e.g. a router started before its workers: expected, not a fault yet
                log.info("%s instance %s not reachable yet (%s)", self.role, self.url, error)
            for f in self._down_waiters:
                if not f.done():
                    f.set_result(None)
        return was

    def went_down(self) -> asyncio.Future:
        """A future that completes when this instance is next marked down (a hung worker's
        health check times out long before its calls do). Discard it with forget_waiter()."""
        f = asyncio.get_running_loop().create_future()
        self._down_waiters.add(f)
        return f

    def forget_waiter(self, f: asyncio.Future) -> None:
        self._down_waiters.discard(f)

    def status(self) -> dict:
        return {**self.meta, "url": self.url, "draining": self.draining, "assigned": self.assigned, "role": self.role, "healthy": self.healthy, "in_flight": self.in_flight,
                "requests": self.requests, "failures": self.failures, "last_error": self.last_error,
                "last_error_time": self.last_error_time, "down_since": self.down_since}


@dataclass
class Pools:
    instances: dict[str, Instance] = field(default_factory=dict)   # url -> instance
    on_change: list = field(default_factory=list)   # callbacks(instance, event) for policies and metrics

    def add(self, url: str, role: str, meta: dict | None = None) -> Instance:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        url = normalize_url(url)
        old = self.instances.get(url)
        if old is not None and old.role == role:
            if meta is not None:
                old.meta = dict(meta)
            return old
        if old is not None:
            self.remove(url)
        inst = self.instances[url] = Instance(url, role, meta=dict(meta or {}))
        log.info("added %s instance %s", role, url)
        self._notify(inst, "added")
        return inst

    def remove(self, url: str) -> Instance | None:
        inst = self.instances.pop(normalize_url(url), None)
        if inst is not None:
            log.info("removed %s instance %s", inst.role, inst.url)
            self._notify(inst, "removed")
        return inst

    def healthy(self, role: str, exclude: set[str] = frozenset()) -> list[Instance]:
        return [i for i in self.instances.values()
                if i.role == role and i.healthy and not i.draining and i.url not in exclude]

    def of_role(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == role]

    def mark_up(self, inst: Instance) -> None:
        first, inst.reachable = not inst.reachable, True
        if first or not inst.healthy:
            log.info("%s instance %s is reachable%s", inst.role, inst.url, "" if first else " again")
        if not inst.healthy:
            inst.healthy, inst.down_since, inst.late = True, None, False
            # it may have restarted with an empty cache: forget what we believed it held
            self._notify(inst, "up")

    def _notify(self, inst: Instance, event: str) -> None:
        for cb in self.on_change:
            cb(inst, event)


class HealthAnswer(Exception):
    """/health answered, but not 200."""


def describe_failure(e: BaseException, timeout: float) -> str:
    """A failed health check in words for the log and /status (no exception reprs)."""
    if isinstance(e, HealthAnswer):
        return str(e)
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer to /health within {timeout:g} s"
    if isinstance(e, aiohttp.ClientConnectorError):
        err = e.os_error
        words = os.strerror(err.errno) if isinstance(err.errno, int) and err.errno > 0 else (err.strerror or str(err))
        return words[:1].lower() + words[1:]                 # "connection refused"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "connection closed without an answer"
    text = str(e) or type(e).__name__
    return text[:200]


async def check_one(session: aiohttp.ClientSession, pools: Pools, inst: Instance, timeout: float) -> None:
    try:
        async with session.get(inst.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                body = " ".join((await r.text(errors="replace")).split())[:160]
                raise HealthAnswer(f"/health answered {r.status}" + (f": {body}" if body else ""))
    except (aiohttp.ClientError, asyncio.TimeoutError, HealthAnswer, OSError) as e:
        why = "health check failed: " + describe_failure(e, timeout)
        late = isinstance(e, asyncio.TimeoutError)
        inst.missed = inst.missed + 1 if late else 0
        if late and inst.reachable and inst.healthy and inst.missed < MISSED_CHECKS:
            log.info("%s instance %s answered no check in time (%d of %d before it counts as down): %s",
                     inst.role, inst.url, inst.missed, MISSED_CHECKS, why)
            return
        inst.mark_down(why, late=late and inst.reachable)
        return
    inst.missed = 0
    pools.mark_up(inst)


async def health_loop(session: aiohttp.ClientSession, pools: Pools, interval: float, timeout: float) -> None:
    while True:
        await asyncio.gather(*(check_one(session, pools, i, timeout) for i in list(pools.instances.values())))
        await asyncio.sleep(interval)
