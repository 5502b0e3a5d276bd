"""`pdserve up`: N prefill + M decode workers (or K colocated ones) and the router, as local
processes on free ports; ready when all answer /health; every child stopped on exit.

Every port is checked before anything loads (a taken one fails in one line); on CPU each
worker gets cores of its own by default (launch.config.pin_evenly; the worker sets its torch
threads from them, pdserve.cpu_threads); processes that exit are restarted
(launch.supervise); the logs go to a temp dir removed on exit unless --log-dir is given.

Children run in sessions of their own (a worker's own children go with it when its group is
killed) and are asked by the kernel to die with this process (PR_SET_PDEATHSIG), so not
even a SIGKILL of `pdserve up` leaves orphans.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from pdserve.cpu_threads import format_cpu_list
from pdserve.launch.config import Deployment, WorkerSpec, load_deployment
from pdserve.launch.supervise import Supervisor
from pdserve.procs import Proc, check_port, distinct_free_ports, wait_healthy as _wait_healthy

READY_LINE = "pdserve is up:"   # what `up` prints once the router answers, before its table of workers

log = logging.getLogger("pdserve.up")


def wait_healthy(proc: Proc, url: str, deadline: float) -> None:
    _wait_healthy(url, proc.popen, timeout=max(1.0, deadline - time.monotonic()))


@dataclass
class WorkerProcess:
    spec: WorkerSpec
    port: int
    host: str
    proc: Proc | None = None
    name: str = ""             # prefill0, decode1, ...: its log file and its name in messages

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Cluster:
    """A running deployment. Tests use it directly to kill and restart workers."""
    dep: Deployment
    log_dir: str
    workers: list[WorkerProcess] = field(default_factory=list)
    router: Proc | None = None
    router_url: str = ""
    router_port: int = 0
    # the workers' shared KV secret when no API key is there to derive one from: a KV server
    # then accepts only this deployment's decode workers (also across hosts, with --host)
    kv_secret: str = field(default_factory=lambda: secrets.token_hex(16))

    # ---- commands ----------------------------------------------------------------------
    def worker_cmd(self, w: WorkerProcess, restart: bool = False) -> list[str]:
        d = self.dep
        cmd = [sys.executable, "-m", "pdserve.cli", "serve"] + ([d.model] if d.model else [])
        cmd += ["--role", w.spec.role, "--host", w.host, "--port", str(w.port), "--kv-transport", d.kv_transport]
        # the API key goes in the environment (key_env), not in `ps`
        return cmd + engine_flags({**w.spec.engine, **(w.spec.restart_engine if restart else {})})

    def router_cmd(self, port: int) -> list[str]:
        d = self.dep
        # the router's own entry point: `pdserve router` would load every command's module
        cmd = [sys.executable, "-m", "pdserve.router.cli", "--host", d.host, "--port", str(port),
               "--policy", d.policy, "--local-prefill-max-tokens", str(d.local_prefill_max_tokens),
               "--health-interval", str(d.health_interval)]
        for w in self.workers:
            cmd += ["--prefill" if w.spec.role == "prefill" else "--decode", f"{w.host}:{w.port}"]
        return cmd + list(d.router_args)

    def key_env(self) -> dict:
        """The API key (and the KV secret, without a key) for a child, through its environment:
        argv is visible to every local user. A KV secret the user exported wins."""
        from pdserve.api_key import ENV
        if self.dep.api_key:
            return {ENV: self.dep.api_key}
        return {} if os.environ.get("PDSERVE_KV_SECRET") else {"PDSERVE_KV_SECRET": self.kv_secret}

    # ---- lifecycle ---------------------------------------------------------------------
    def assign_ports(self) -> None:
        """Choose every port (the router's as configured, the workers' free ones) and check
        that each can be bound, before anything is started: raises PortInUse."""
        d = self.dep
        if not self.workers:
            fixed = [d.port] if d.port else []
            ports = distinct_free_ports(d.host, len(d.workers) + (0 if d.port else 1), avoid=fixed)
            self.router_port = d.port or ports.pop()
            self.workers = [WorkerProcess(spec, port, d.host, name=f"{spec.role}{i}")
                            for i, (spec, port) in enumerate(zip(d.workers, ports))]
            self.router_url = f"http://{d.host}:{self.router_port}"
        for port in [self.router_port] + [w.port for w in self.workers]:
            check_port(d.host, port)

    def start(self, timeout: float = 600.0) -> "Cluster":
        d = self.dep
        if not self.workers:
            self.assign_ports()
        try:
            deadline = time.monotonic() + timeout
            for w in self.workers:
                self._spawn(w)
                if d.sequential_start:   # GPU sharers: each sizes its KV cache after the previous one
                    wait_healthy(w.proc, w.url, deadline)
            for w in self.workers:
                wait_healthy(w.proc, w.url, deadline)
            self.respawn_router()
            wait_healthy(self.router, self.router_url, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, w: WorkerProcess, restart: bool = False) -> None:
        # no thread settings here: the worker sets its torch threads from the affinity it is
        # started with (pdserve.cpu_threads); OMP_NUM_THREADS given to `up` still wins there
        env = self.key_env()
        if w.spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = w.spec.gpu
        w.proc = Proc(self.worker_cmd(w, restart), os.path.join(self.log_dir, f"{w.name}.log"), name=w.name,
                      cpus=w.spec.cpus, env=env)

    def respawn(self, w: WorkerProcess) -> None:
        """Start a worker that exited again on its port, without waiting for it."""
        if w.proc and w.proc.alive():
            w.proc.stop()
        self._spawn(w, restart=True)

    def respawn_router(self) -> None:
        """(Re)start the router on its port; the workers are left as they are. The router is
        light and not pinned: it shares the cores with the workers."""
        if self.router and self.router.alive():
            self.router.stop()
        self.router = Proc(self.router_cmd(self.router_port), os.path.join(self.log_dir, "router.log"),
                           name="router", env=self.key_env())

    def kill(self, w: WorkerProcess, sig: int = signal.SIGKILL) -> None:
        w.proc.stop(sig)

    def restart(self, w: WorkerProcess, timeout: float = 300.0) -> None:
        """Start a stopped worker again on the same port (the router finds it by health check)."""
        self.respawn(w)
        wait_healthy(w.proc, w.url, time.monotonic() + timeout)

    def placement(self) -> str:
        """One line: which cores each process got."""
        parts = [f"{w.name} {format_cpu_list(w.spec.cpus) if w.spec.cpus else 'all'}" for w in self.workers]
        return "pdserve up: cpus: " + ", ".join(parts) + ", router all (shared)"

    def stop(self) -> None:
        procs = ([self.router] if self.router else []) + [w.proc for w in self.workers if w.proc]
        for p in procs:
            p.send(signal.SIGTERM)
        for p in procs:
            p.stop()   # waits, then SIGKILLs what is left of the group

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_flags(opts: dict) -> list[str]:
    """{'max_num_seqs': 8, 'enable_prefix_caching': False} -> ['--max-num-seqs', '8', '--no-enable-prefix-caching']."""
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


def ready_message(c: Cluster, model_id: str) -> str:
    roles = [w.spec.role for w in c.workers]
    counts = ", ".join(f"{roles.count(r)} {r}" for r in ("prefill", "decode", "both") if roles.count(r))
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello! Who are you?"}],
                       "max_tokens": 64})
    auth = f" -H 'Authorization: Bearer {c.dep.api_key}'" if c.dep.api_key else ""
    lines = [f"{READY_LINE} {c.router_url}/v1  ({counts}; model {model_id}; logs in {c.log_dir})"]
    for w in c.workers:
        lines.append(f"  {w.spec.role:8s} {w.url}  pid {w.proc.pid}"
                     + (f"  cpus {format_cpu_list(w.spec.cpus)}" if w.spec.cpus else "")
                     + (f"  gpu {w.spec.gpu}" if w.spec.gpu is not None else ""))
    lines.append(f"  router   {c.router_url}  pid {c.router.pid}   status: {c.router_url}/status")
    lines.append("try:")
    lines.append(f"  curl {c.router_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                 f"-d {shlex.quote(body)}")
    lines.append("Ctrl+C stops everything.")
    return "\n".join(lines)


def model_id(c: Cluster) -> str:
    import urllib.request
    req = urllib.request.Request(c.router_url + "/v1/models")
    if c.dep.api_key:
        req.add_header("Authorization", f"Bearer {c.dep.api_key}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"][0]["id"]


# ---- the command ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, name: str = "up") -> None:
    from pdserve.cli.args import add_engine_args
    add_engine_args(p, exclude=("role",))   # --prefill, --decode and --colocated give the roles
    g = p.add_argument_group("deployment")
    g.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill workers (default 1)")
    g.add_argument("--decode", type=int, default=None, metavar="M", help="decode workers (default 1)")
    g.add_argument("--prefill-tp", type=int, default=None, metavar="P",
                   help="tensor-parallel size of each prefill worker (default: -tp, else 1)")
    g.add_argument("--decode-tp", type=int, default=None, metavar="D",
                   help="tensor-parallel size of each decode worker (default: -tp, else 1)")
    g.add_argument("--colocated", type=int, default=None, metavar="K",
                   help="K `both` workers behind the router instead of prefill/decode pools")
    g.add_argument("--config", default=None, help="YAML or JSON file describing the deployment "
                   "(per-role engine options, cpus); flags given here override it")
    g.add_argument("--host", default=None, help="bind address of all processes (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="router port (default 8000; 0: a free one)")
    g.add_argument("--policy", default=None, help="routing policy (round_robin, least_loaded, prefix_aware)")
    g.add_argument("--local-prefill-max-tokens", type=int, default=None, metavar="N",
                   help="router: prefill on the decode worker when at most N uncached prompt tokens (default 0)")
    g.add_argument("--kv-transport", default=None, help="auto | tcp | shm | cuda_ipc | nixl")
    g.add_argument("--api-key", default=None, help="clients must send it as a Bearer token (default: none)")
    g.add_argument("--pin-cpus", action=argparse.BooleanOptionalAction, default=None,
                   help="pin each worker to its own core(s), split evenly among the workers; its torch "
                        "threads follow (default: on for workers on CPU; --no-pin-cpus: leave placement to "
                        "the OS; explicit `cpus:` in --config always win)")
    g.add_argument("--log-dir", default=None,
                   help="keep the children's logs in DIR (default: a temp dir, removed on exit)")
    g.add_argument("--max-restarts", type=int, default=None, metavar="N",
                   help="restart a worker or the router that exits, up to N times in a row with backoff "
                        "(default 5; 0: never)")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds the workers may take to come up")
    g.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the workers as Ray actors on this Ray cluster (or `auto`); the router runs here")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "ray", None):
        from pdserve.ray_cluster.cli import run_up
        return run_up(args)
    dep = load_deployment(args)
    c = Cluster(dep, "")
    c.assign_ports()          # a taken port fails here, in one line, before anything loads
    c.log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-")
    os.makedirs(c.log_dir, exist_ok=True)
    try:
        return _serve(c, args)
    finally:
        if not args.log_dir:
            shutil.rmtree(c.log_dir, ignore_errors=True)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGINT become one KeyboardInterrupt in the main thread (a second signal
    while stopping is ignored): the supervisor's `finally` stops every child."""
    stopping = []

    def on_signal(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def ignore_signals() -> None:
    """While the children are being stopped: a second Ctrl+C must not cut that short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _serve(c: Cluster, args: argparse.Namespace) -> int:
    interrupt_on_signals()
    kept = "" if args.log_dir else ", removed on exit; --log-dir DIR keeps them"
    print(f"pdserve up: starting {len(c.workers)} worker(s) and the router (logs in {c.log_dir}{kept}) ...",
          flush=True)
    print(c.placement(), flush=True)
    try:
        try:
            c.start(timeout=args.startup_timeout)
        except (RuntimeError, TimeoutError) as e:   # a child failed to start: its log's tail says why
            print(f"pdserve up: error: {e}", file=sys.stderr, flush=True)
            return 1
        print(ready_message(c, model_id(c)), flush=True)
        sup = Supervisor(c, c.dep.max_restarts, say=lambda m: print(m, flush=True))
        while True:
            sup.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("pdserve up: stopping ...", flush=True)
        return 0
    finally:
        ignore_signals()
        c.stop()
        print("pdserve up: stopped", flush=True)
