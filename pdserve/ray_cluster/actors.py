"""The Ray actors: one per worker (it runs `pdserve serve` on its node and dies with it, so
that Ray restarts both), and one small controller that holds the wanted counts per role."""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading

import ray

from pdserve.procs import Proc, free_port, pdserve_command


class WorkerActor:
    """`pdserve serve` as a child of this actor, on this node's address (never a wildcard).

    The child dies with the actor (pdserve.procs' PR_SET_PDEATHSIG, the actor's main thread
    forks it): a ray.kill leaves no orphan. A lost node: the actor stops the child's process
    group itself once its raylet is gone, rather than trust Ray's worker to notice (this runs
    on the lost node, so it needs nothing from the driver, which is on another host). The
    actor dies with the child: Ray then restarts the pair (max_restarts), possibly on another
    node, on new ports; the driver reads the new URL from info().
    """

    def __init__(self, name: str, role: str, argv: list[str]):
        ctx = ray.get_runtime_context()
        self.name, self.role = name, role
        self.node_id = ctx.get_node_id()
        self.ip = ray.util.get_node_ip_address()
        self.port = free_port(self.ip)
        self.restarted = ctx.was_current_actor_reconstructed
        self.stopping = False
        log_dir = os.path.join(tempfile.gettempdir(), "pdserve-ray")
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{name}-{os.getpid()}.log")
        cmd = pdserve_command("serve", *argv, "--role", role, "--host", self.ip, "--port", self.port)
        # shared memory only between workers on one Ray node (two raylets or two pods on one
        # host share the boot id, not /dev/shm): the KV connector compares this id
        env = {"PDSERVE_HOST_ID": f"ray-node:{self.node_id}"}
        self.proc = Proc(cmd, self.log_path, name, env=env)
        # the raylet (or what it started us through) is our parent until it dies: then we are
        # reparented (to init or a subreaper), whatever pid namespace we run in
        self.parent = os.getppid()
        threading.Thread(target=self._watch, name="pdserve-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                self.proc.popen.wait(1.0)
            except subprocess.TimeoutExpired:
                if os.getppid() == self.parent:
                    continue
                self.proc.stop(timeout=5.0)   # the raylet is gone: so is this node, for Ray
                os._exit(1)
            if not self.stopping:   # the worker died on its own: let Ray restart the actor, and so it
                os._exit(1)
            return

    def info(self) -> dict:
        return {"name": self.name, "role": self.role, "url": f"http://{self.ip}:{self.port}",
                "node_id": self.node_id, "node_ip": self.ip, "pid": self.proc.pid, "actor_pid": os.getpid(),
                "alive": self.proc.alive(), "restarted": self.restarted, "log": self.log_path}

    def log_tail(self, n: int = 40) -> str:
        return self.proc.tail(n)

    def stop(self) -> None:
        self.stopping = True
        self.proc.stop()


class Controller:
    """What the running `pdserve up --ray` should have, and what it has: `pdserve scale`
    writes the counts, the driver reconciles towards them and reports its state here.

    A role with an autoscaling rule keeps its count within the rule's [min, max]: `pdserve
    scale` may set any count in it (the rule goes on from there), and is refused outside it."""

    def __init__(self, counts: dict[str, int], router_url: str, ranges: dict[str, tuple[int, int]] | None = None):
        self.counts, self.router_url, self.state = dict(counts), router_url, {}
        self.ranges = dict(ranges or {})

    def set_counts(self, counts: dict[str, int]) -> dict[str, int]:
        new = dict(self.counts)
        for role, n in counts.items():
            if role not in new or int(n) < 0:
                raise ValueError(f"unknown role {role!r} or negative count {n}")
            lo, hi = self.ranges.get(role, (0, None))
            if not lo <= int(n) <= (hi if hi is not None else int(n)):
                raise ValueError(f"{role}: {n} is outside its autoscale rule's min {lo}, max {hi} "
                                 f"(change the rule in the config to go beyond)")
            new[role] = int(n)
        if new.get("decode", 0) + new.get("both", 0) < 1:
            raise ValueError("at least one decode (or colocated) worker must stay")
        self.counts = new
        return dict(new)

    def autoscale(self, role: str, was: int, want: int) -> bool:
        """The rule's step, unless the count changed meanwhile (a `pdserve scale` wins)."""
        if self.counts.get(role) != was:
            return False
        try:
            self.set_counts({role: want})
        except ValueError:   # e.g. the last decode worker of a `decode: {min: 0}` rule
            return False
        return True

    def get(self) -> dict:
        return {"counts": dict(self.counts), "router_url": self.router_url, "state": self.state}

    def report(self, state: dict) -> None:
        self.state = state
