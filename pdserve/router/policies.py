"""Routing policies: pure Python, no I/O, no clock. The router and the simulator share them.

A policy picks one instance among healthy candidates for a request. `key` is what the
prefix-aware policy matches on: token ids where known (the simulator), or the prompt text
(the router, which does not tokenize); any sequence of hashable items works.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass
class Choice:
    instance: str
    matched: int = 0   # leading items of the key the instance is believed to hold in its cache


class RoutingPolicy:
    name = "base"

    def select(self, candidates: Sequence[str], key: Sequence | None = None,
               loads: Mapping[str, int] | None = None) -> Choice:
        raise NotImplementedError

    def record(self, instance: str, key: Sequence | None) -> None:
        """The request with this key was sent to instance."""

    def remove(self, instance: str) -> None:
        """Forget an instance (removed, or its cache is gone after a restart)."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def select(self, candidates, key=None, loads=None) -> Choice:
        if not candidates:
            raise LookupError("no healthy instance to route to")
        c = candidates[self._next % len(candidates)]
        self._next += 1
        return Choice(c)


class LeastLoaded(RoutingPolicy):
    """Fewest requests in flight; ties go round robin so idle instances share the work."""
    name = "least_loaded"

    def __init__(self):
        self._rr = 0

    def select(self, candidates, key=None, loads=None) -> Choice:
        if not candidates:
            raise LookupError("no healthy instance to route to")
        loads = loads or {}
        low = min(loads.get(c, 0) for c in candidates)
        best = [c for c in candidates if loads.get(c, 0) == low]
        self._rr += 1
        return Choice(best[self._rr % len(best)])


class PrefixTree:
    """Approximate record of which key prefixes were sent to which instance.

    Keys are cut into chunks of `chunk` items; each chunk node remembers the instances that
    received it. Capacity-bounded: the least recently used leaf chunks are forgotten first,
    as the instances' own caches would evict them.
    """

    def __init__(self, chunk: int = 16, capacity: int = 200_000):
        self.chunk = chunk
        self.capacity = capacity
        self.nodes: OrderedDict[tuple, set[str]] = OrderedDict()  # chunk path hash -> instances

    def _paths(self, key: Sequence):
        h = None
        for i in range(0, len(key) - len(key) % self.chunk, self.chunk):
            h = hash((h, tuple(key[i:i + self.chunk])))
            yield h

    def insert(self, instance: str, key: Sequence) -> None:
        for p in self._paths(key):
            owners = self.nodes.get(p)
            if owners is None:
                self.nodes[p] = owners = set()
            else:
                self.nodes.move_to_end(p)
            owners.add(instance)
        while len(self.nodes) > self.capacity:
            self.nodes.popitem(last=False)

    def match(self, key: Sequence, instances: Sequence[str]) -> dict[str, int]:
        """Matched prefix length (in items) per instance."""
        out = dict.fromkeys(instances, 0)
        alive = set(instances)
        n = 0
        for p in self._paths(key):
            owners = self.nodes.get(p)
            if not owners:
                break
            alive &= owners
            if not alive:
                break
            n += self.chunk
            for inst in alive:
                out[inst] = n
        return out

    def remove(self, instance: str) -> None:
        for owners in self.nodes.values():
            owners.discard(instance)


class PrefixAware(RoutingPolicy):
    """Send a request where its prefix most likely sits in the cache, balanced against load.

    Score = matched fraction of the key - balance * (load / (max load + 1)): a long shared
    prefix wins unless that instance is much busier than the others.
    """
    name = "prefix_aware"

    def __init__(self, chunk: int = 16, balance: float = 0.5, capacity: int = 200_000):
        self.tree = PrefixTree(chunk, capacity)
        self.balance = balance
        self._fallback = LeastLoaded()

    def select(self, candidates, key=None, loads=None) -> Choice:
        if not candidates:
            raise LookupError("no healthy instance to route to")
        loads = loads or {}
        if not key:
            return self._fallback.select(candidates, key, loads)
        matched = self.tree.match(key, candidates)
        if not any(matched.values()):
            return self._fallback.select(candidates, key, loads)
        top = max(loads.get(c, 0) for c in candidates) + 1
        best = max(candidates, key=lambda c: matched[c] / len(key) - self.balance * loads.get(c, 0) / top)
        return Choice(best, matched[best])

    def record(self, instance, key) -> None:
        if key:
            self.tree.insert(instance, key)

    def remove(self, instance) -> None:
        self.tree.remove(instance)


POLICIES = {p.name: p for p in (RoundRobin, LeastLoaded, PrefixAware)}


def make_policy(name: str, **kwargs) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
