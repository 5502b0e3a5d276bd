"""`pdserve up --ray ADDRESS`: the workers as Ray actors, the router beside the caller.

The driver is the only thing that knows both sides: it asks each actor (by its Ray handle)
where its worker serves, registers that URL with the router once it answers /health
(POST /instances, with the Ray node in `meta`), re-registers when a restarted actor comes
back on a new URL, and drains a worker (POST /instances/drain, wait until nothing is routed
to it or running on it) before it kills the actor. Ray does the placing and restarting.
A role's autoscaling rule (autoscale.py) moves the controller's wanted count, the same count
`pdserve scale` sets, so adding and removing (draining first) go the same way.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pdserve.launch.cluster import READY_LINE, engine_flags
from pdserve.launch.config import Deployment, WorkerSpec
from pdserve.procs import Proc, free_port, wait_healthy
from pdserve.ray_cluster.actors import Controller, WorkerActor
from pdserve.ray_cluster.autoscale import METRICS, Clock, decide
from pdserve.ray_cluster.settings import RaySettings

log = logging.getLogger("pdserve.up")

ROLES = ("prefill", "decode", "both")
CONTROLLER = "pdserve-controller"


def router_pool(role: str) -> str:
    return "prefill" if role == "prefill" else "decode"   # a `both` worker serves whole requests


@dataclass
class Member:
    role: str
    index: int
    handle: object
    info: dict | None = None
    pending: object = None            # info() in flight
    polled: float = 0.0
    registered: str | None = None     # the URL the router knows this worker by
    draining_since: float | None = None
    idle_polls: int = 0
    error: str | None = None          # the actor is dead for good (its constructor failed)

    @property
    def name(self) -> str:
        return actor_name(self.role, self.index)


def actor_name(role: str, index: int) -> str:
    return f"pdserve-{role}-{index}"


class RayDeployment:
    def __init__(self, dep: Deployment, settings: RaySettings, log_dir: str, say=print):
        self.dep, self.s, self.log_dir, self.say = dep, settings, log_dir, say
        self.members: list[Member] = []
        self.specs = {r: next((w for w in dep.workers if w.role == r), None) for r in ROLES}
        fallback = next(w for w in dep.workers if w.role in ("decode", "both"))
        for r in ROLES:   # a role started with 0 workers takes another role's engine options
            self.specs[r] = self.specs[r] or WorkerSpec(r, dict(fallback.engine))
        self.router: Proc | None = None
        self.router_url = ""
        self.controller = None
        self.wanted: dict[str, int] = {}   # the counts last read from the controller
        self.has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.clocks = {r: Clock() for r in ROLES}    # the autoscaling rules' state
        self.sampled = {r: 0.0 for r in ROLES}

    # ---- actors ------------------------------------------------------------------------
    def worker_argv(self, spec: WorkerSpec) -> list[str]:
        d = self.dep
        argv = ([d.model] if d.model else []) + ["--kv-transport", d.kv_transport]
        if d.api_key:
            argv += ["--api-key", d.api_key]
        return argv + engine_flags(spec.engine)

    def spawn(self, role: str) -> Member | None:
        used = {m.index for m in self.members if m.role == role}
        index = next(i for i in range(len(used) + 1) if i not in used)
        p = self.s.roles[role]
        spec = self.specs[role]
        gpus = p.num_gpus
        if gpus is None:   # one worker, its TP ranks included, on one node: its GPUs in one actor
            on_gpu = self.has_gpus and spec.engine.get("device", "auto") != "cpu"
            gpus = float(spec.engine.get("tensor_parallel_size") or 1) if on_gpu else 0.0
        try:
            handle = ray.remote(WorkerActor).options(
                name=actor_name(role, index), namespace=self.s.namespace, max_restarts=self.s.max_restarts,
                max_task_retries=self.s.max_task_retries, num_cpus=p.num_cpus, num_gpus=gpus,
                resources=p.resources or None, scheduling_strategy=self.s.scheduling_strategy,
            ).remote(actor_name(role, index), role, self.worker_argv(spec))
        except ValueError as e:   # the name of a just-killed actor may not be free yet
            log.info("cannot create %s yet: %s", actor_name(role, index), e)
            return None
        m = Member(role, index, handle)
        self.members.append(m)
        return m

    def reconcile(self, counts: dict[str, int]) -> None:
        for role in ROLES:
            active = sorted((m for m in self.members if m.role == role and m.draining_since is None),
                            key=lambda m: m.index)
            for _ in range(counts.get(role, 0) - len(active)):
                if (m := self.spawn(role)) is not None:
                    self.say(f"pdserve up: adding {m.name}")
            for m in active[counts.get(role, 0):][::-1]:
                m.draining_since = time.monotonic()
                self.say(f"pdserve up: draining {m.name} {m.registered or ''}")
                if m.registered:
                    self.call("POST", "/instances/drain", {"url": m.registered})

    def poll(self, m: Member) -> None:
        """Read the actor's info without blocking; register a new URL once it is healthy."""
        if m.error:
            return
        if m.pending is None and time.monotonic() - m.polled > 1.0:
            m.pending, m.polled = m.handle.info.remote(), time.monotonic()
        if m.pending is None or not ray.wait([m.pending], timeout=0)[0]:
            return
        ref, m.pending = m.pending, None
        try:
            m.info = ray.get(ref)
        except ActorUnavailableError:
            return   # restarting: the router's health checks have it down meanwhile
        except (ActorDiedError, RayActorError) as e:
            m.error = str(e)[-2000:]
            self.say(f"pdserve up: {m.name} is dead for good: {m.error}")
            return
        except RayError as e:   # e.g. the reply lost with a node: ask again
            log.warning("info from %s: %r", m.name, e)
            return
        url = m.info["url"]
        if url != m.registered and m.draining_since is None and healthy(url):
            meta = {"ray_actor": m.name, "ray_node_id": m.info["node_id"], "node_ip": m.info["node_ip"],
                    "restarted": m.info["restarted"]}
            self.call("POST", "/instances", {"role": router_pool(m.role), "url": url, "meta": meta})
            if m.registered:   # a restarted actor: new ports, maybe a new node
                self.call("DELETE", "/instances", {"url": m.registered})
                self.say(f"pdserve up: {m.name} is back on {url} (node {m.info['node_id'][:12]})")
            m.registered = url

    def drain(self, m: Member) -> None:
        """Remove a draining worker once nothing is routed to it or runs on it (twice in a row:
        a request picked just before the drain may not have reached it yet)."""
        idle = True
        if m.registered:
            inst = next((i for i in self.call("GET", "/instances") or [] if i["url"] == m.registered), None)
            if inst and (inst.get("assigned") or inst.get("in_flight")):
                idle = False
            if idle:
                load = worker_load(m.registered)
                idle = load is None or load == 0
        m.idle_polls = m.idle_polls + 1 if idle else 0
        late = time.monotonic() - m.draining_since > self.s.drain_timeout
        if m.idle_polls < 2 and not late:
            return
        if late:
            self.say(f"pdserve up: {m.name} still busy after {self.s.drain_timeout:.0f}s: removing it anyway")
        if m.registered:
            self.call("DELETE", "/instances", {"url": m.registered})
        self.kill(m)
        self.members.remove(m)
        self.say(f"pdserve up: removed {m.name}")

    def kill(self, m: Member) -> None:
        try:
            ray.get(m.handle.stop.remote(), timeout=30)
        except Exception as e:   # dead or hung: ray.kill below ends it either way
            log.info("stop %s: %r", m.name, e)
        ray.kill(m.handle, no_restart=True)

    # ---- router ------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.router_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.dep.api_key:
            req.add_header("Authorization", f"Bearer {self.dep.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)
        except (urllib.error.URLError, OSError, ValueError) as e:
            log.warning("router %s %s: %s", method, path, e)
            return None

    def router_cmd(self, port: int) -> list[str]:
        import sys
        d = self.dep
        cmd = [sys.executable, "-m", "pdserve.router.cli", "--host", d.host, "--port", str(port),
               "--policy", d.policy, "--local-prefill-max-tokens", str(d.local_prefill_max_tokens),
               "--health-interval", str(d.health_interval)]
        if d.api_key:
            cmd += ["--api-key", d.api_key]
        return cmd + list(d.router_args)

    # ---- lifecycle ---------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {r: sum(w.role == r for w in self.dep.workers) for r in ROLES}

    def start(self, timeout: float = 600.0) -> "RayDeployment":
        deadline = time.monotonic() + timeout
        try:
            port = self.dep.port or free_port(self.dep.host)
            self.router_url = f"http://{self.dep.host}:{port}"
            self.router = Proc(self.router_cmd(port), os.path.join(self.log_dir, "router.log"), name="router")
            wait_healthy(self.router_url, self.router.popen, timeout=max(1.0, deadline - time.monotonic()),
                         path="/metrics")   # /health is 503 until a decode worker is registered
            self.wanted = self.counts()
            self.start_controller()
            ray.get(self.controller.get.remote(), timeout=max(1.0, deadline - time.monotonic()))
            while True:
                self.step()
                dead = [m for m in self.members if m.error]
                if dead:
                    raise RuntimeError(f"{dead[0].name} failed: {dead[0].error}")
                if all(m.registered for m in self.members) and len(self.members) == len(self.dep.workers):
                    return self
                if time.monotonic() > deadline:
                    waiting = [m.name for m in self.members if not m.registered]
                    raise TimeoutError(f"workers not healthy after {timeout:.0f}s: {', '.join(waiting)}"
                                       + "".join(f"\n--- {m.name}:\n{tail(m)}" for m in self.members
                                                 if not m.registered))
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def start_controller(self) -> None:
        """The wanted counts live beside the driver, on its node for sure (a soft affinity let Ray
        put them on any node, and a lost node took them along); they start from what the driver
        last read, so a controller lost anyway (killed, OOM) loses no `pdserve scale`."""
        here = ray.get_runtime_context().get_node_id()
        self.controller = ray.remote(Controller).options(
            name=CONTROLLER, namespace=self.s.namespace, num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(self.wanted, self.router_url,
                 {r: (p.autoscale.min, p.autoscale.max) for r, p in self.s.roles.items() if p.autoscale})

    def wanted_counts(self) -> dict[str, int] | None:
        """The controller's counts (None: it did not answer in time, try again next step)."""
        try:
            self.wanted = ray.get(self.controller.get.remote(), timeout=30)["counts"]
            return self.wanted
        except (GetTimeoutError, ActorUnavailableError):
            return None
        except RayActorError as e:   # dead for good: the workers must not go unwatched meanwhile
            self.say(f"pdserve up: the controller died ({type(e).__name__}); starting it again with "
                     f"the counts {self.wanted}")
            try:
                self.start_controller()
            except ValueError as e:   # its name not free yet: next step
                log.info("cannot start the controller yet: %s", e)
            return None

    def step(self) -> None:
        counts = self.wanted_counts()
        if counts is not None:
            self.autoscale(counts)
            self.reconcile(counts)
        for m in list(self.members):
            self.poll(m)
            if m.draining_since is not None:
                self.drain(m)
        self.controller.report.remote(self.state())

    def autoscale(self, counts: dict[str, int]) -> None:
        """Each rule's decision on its role's metrics, written to the controller (counts too)."""
        now = time.monotonic()
        for role in ROLES:
            rule = self.s.roles[role].autoscale
            if rule is None or now - self.sampled[role] < 1.0:
                continue
            self.sampled[role] = now
            mine = [m for m in self.members if m.role == role]
            if len(mine) != counts[role] or not all(m.registered and m.draining_since is None for m in mine):
                self.clocks[role] = Clock()   # a worker on its way in or out: judge once it settles
                continue
            values = [worker_metrics(m.registered).get(METRICS[rule.metric]) for m in mine]
            if None in values:   # a worker not answering: no decision on part of the load
                continue
            want, self.clocks[role], why = decide(rule, counts[role], values, now, self.clocks[role])
            if want != counts[role]:
                try:
                    done = ray.get(self.controller.autoscale.remote(role, counts[role], want), timeout=30)
                except GetTimeoutError:
                    done = False
                self.say(f"pdserve up: autoscale {role} {why}" + ("" if done else ": not applied (count "
                                                                  "changed meanwhile or refused)"))
                if done:
                    counts[role] = want

    def state(self) -> dict:
        return {r: [{"name": m.name, "url": m.registered, "node_id": (m.info or {}).get("node_id"),
                     "draining": m.draining_since is not None, "error": m.error}
                    for m in self.members if m.role == r] for r in ROLES}

    def stop(self) -> None:
        for m in self.members:
            try:
                m.handle.stop.remote()
            except Exception:
                pass
        for m in self.members:
            self.kill(m)
        self.members.clear()
        if self.controller is not None:
            ray.kill(self.controller, no_restart=True)
            self.controller = None
        if self.router is not None:
            self.router.stop()


def tail(m: Member) -> str:
    try:
        return ray.get(m.handle.log_tail.remote(), timeout=5)
    except Exception as e:
        return f"(no log: {e!r})"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def worker_metrics(url: str) -> dict[str, float]:
    """A worker's Prometheus samples, summed over labels, by name ({}: it does not answer)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    for name, v in re.findall(r"^([A-Za-z_:][\w:]*)(?:\{[^}]*\})? (\S+)$", text, re.M):
        out[name] = out.get(name, 0.0) + float(v)
    return out


def worker_load(url: str) -> float | None:
    """Requests running, waiting or holding KV on a worker (None: it does not answer)."""
    got = worker_metrics(url)
    if not got:
        return None
    return sum(got.get(f"pdserve:{n}", 0.0) for n in ("num_requests_running", "num_requests_waiting",
                                                       "num_requests_held"))


def ready_message(rd: RayDeployment, address: str) -> str:
    roles = [m.role for m in rd.members]
    counts = ", ".join(f"{roles.count(r)} {r}" for r in ROLES if roles.count(r))
    lines = [f"{READY_LINE} {rd.router_url}/v1  ({counts} as Ray actors on {address}, namespace "
             f"{rd.s.namespace}; router log in {rd.log_dir})"]
    for m in rd.members:
        i = m.info or {}
        lines.append(f"  {m.role:8s} {m.registered}  actor {m.name}  node {i.get('node_id', '?')[:12]}  "
                     f"pid {i.get('pid')}  log {i.get('node_ip')}:{i.get('log')}")
    lines.append(f"  router   {rd.router_url}  pid {rd.router.pid}   status: {rd.router_url}/status")
    lines.append(f"scale: pdserve scale --ray {address} --decode N")
    lines.append("Ctrl+C stops everything.")
    return "\n".join(lines)
