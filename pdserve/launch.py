"""`pdserve up`: N prefill + M decode workers (or K colocated ones) and the router, as local
processes on free ports; ready when all answer /health; every child stopped on exit.

Children run in sessions of their own (a worker's own children go with it when its group is
killed) and are asked by the kernel to die with this process (PR_SET_PDEATHSIG), so not
even a SIGKILL of `pdserve up` leaves orphans.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

from pdserve.launch_config import Deployment, WorkerSpec, load_deployment
from pdserve.launch_procs import Proc
from pdserve.procs import free_port, wait_healthy as _wait_healthy

log = logging.getLogger("pdserve.up")


def wait_healthy(proc: Proc, url: str, deadline: float) -> None:
    _wait_healthy(url, proc.popen, timeout=max(1.0, deadline - time.monotonic()))


@dataclass
class Worker:
    spec: WorkerSpec
    port: int
    host: str
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Cluster:
    """A running deployment. Tests use it directly to kill and restart workers."""
    dep: Deployment
    log_dir: str
    workers: list[Worker] = field(default_factory=list)
    router: Proc | None = None
    router_url: str = ""

    # ---- commands ----------------------------------------------------------------------
    def worker_cmd(self, w: Worker) -> list[str]:
        d = self.dep
        cmd = [sys.executable, "-m", "pdserve.cli", "serve"] + ([d.model] if d.model else [])
        cmd += ["--role", w.spec.role, "--host", w.host, "--port", str(w.port), "--kv-transport", d.kv_transport]
        return cmd + engine_flags(w.spec.engine)   # the API key goes in the environment (key_env), not in `ps`

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
        """The API key for a child, through its environment: argv is visible to every local user."""
        from pdserve.api_key import ENV
        return {ENV: self.dep.api_key} if self.dep.api_key else {}

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> "Cluster":
        d = self.dep
        try:
            deadline = time.monotonic() + timeout
            for i, spec in enumerate(d.workers):
                w = Worker(spec, free_port(d.host), d.host)
                self.workers.append(w)
                self._spawn(w, f"{spec.role}{i}")
                if d.sequential_start:   # GPU sharers: each sizes its KV cache after the previous one
                    wait_healthy(w.proc, w.url, deadline)
            for w in self.workers:
                wait_healthy(w.proc, w.url, deadline)
            port = d.port or free_port(d.host)
            self.router_url = f"http://{d.host}:{port}"
            self.router = Proc(self.router_cmd(port), os.path.join(self.log_dir, "router.log"), name="router",
                               env=self.key_env())
            wait_healthy(self.router, self.router_url, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, w: Worker, name: str) -> None:
        env = self.key_env()
        if w.spec.cpus:
            # torch would otherwise start one thread per core of the machine on a single core
            env.update(OMP_NUM_THREADS=str(len(w.spec.cpus)), MKL_NUM_THREADS=str(len(w.spec.cpus)))
        if w.spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = w.spec.gpu
        w.proc = Proc(self.worker_cmd(w), os.path.join(self.log_dir, f"{name}.log"), name=name,
                      cpus=w.spec.cpus, env=env)

    def kill(self, w: Worker, sig: int = signal.SIGKILL) -> None:
        w.proc.stop(sig)

    def restart(self, w: Worker, timeout: float = 300.0) -> None:
        """Start a stopped worker again on the same port (the router finds it by health check)."""
        if w.proc and w.proc.alive():
            w.proc.stop()
        self._spawn(w, f"{w.spec.role}-{w.port}-restart")
        wait_healthy(w.proc, w.url, time.monotonic() + timeout)

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
    lines = [f"pdserve is up: {c.router_url}/v1  ({counts}; model {model_id}; logs in {c.log_dir})"]
    for w in c.workers:
        lines.append(f"  {w.spec.role:8s} {w.url}  pid {w.proc.pid}" + (f"  cpus {w.spec.cpus}" if w.spec.cpus else "")
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
    from pdserve.cli_args import add_engine_args
    add_engine_args(p)
    g = p.add_argument_group("deployment")
    g.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill workers (default 1)")
    g.add_argument("--decode", type=int, default=None, metavar="M", help="decode workers (default 1)")
    g.add_argument("--colocated", type=int, default=None, metavar="K",
                   help="K `both` workers behind the router instead of prefill/decode pools")
    g.add_argument("--config", default=None, help="YAML or JSON file describing the deployment "
                   "(per-role engine options, cpus); flags given here override it")
    g.add_argument("--host", default=None, help="bind address of all processes (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="router port (default 8000; 0: a free one)")
    g.add_argument("--policy", default=None, help="routing policy (round_robin, least_loaded, prefix_aware)")
    g.add_argument("--local-prefill-max-tokens", type=int, default=None, metavar="N")
    g.add_argument("--kv-transport", default=None, help="auto | tcp | shm | cuda_ipc | nixl")
    g.add_argument("--api-key", default=None)
    g.add_argument("--pin-cpus", action="store_true",
                   help="pin each worker to its own core(s), split evenly among the workers")
    g.add_argument("--log-dir", default=None, help="where the children's logs go (default: a temp dir)")
    g.add_argument("--startup-timeout", type=float, default=600.0)


def run(args: argparse.Namespace) -> int:
    dep = load_deployment(args)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-")
    os.makedirs(log_dir, exist_ok=True)
    stopping = []

    def on_signal(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    n = len(dep.workers)
    print(f"pdserve up: starting {n} worker(s) and the router (logs in {log_dir}) ...", flush=True)
    c = Cluster(dep, log_dir)
    try:
        c.start(timeout=args.startup_timeout)
        print(ready_message(c, model_id(c)), flush=True)
        while True:
            for w in c.workers:  # a worker died on its own: say so once, keep serving with the rest
                if not w.proc.reported and not w.proc.alive():
                    w.proc.reported = True
                    print(f"pdserve up: {w.proc.name} exited ({w.proc.returncode()}); log: {w.proc.log_path}",
                          flush=True)
            if not c.router.alive():
                print(f"pdserve up: the router exited ({c.router.returncode()}); log: {c.router.log_path}",
                      flush=True)
                return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("pdserve up: stopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        c.stop()
        print("pdserve up: stopped", flush=True)
