"""Start a local deployment (`pdserve up ...`) as a child process, wait until it answers, stop it.

The child gets its own process group (pdserve.procs) and every descendant is remembered while it
runs, so stopping it leaves no orphan workers even if `pdserve up` itself dies badly.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request

from pdserve import procs
from pdserve.launch.cluster import READY_LINE


def _descendants(pid: int) -> list:
    """psutil.Process objects: they remember the start time, so a reused PID is never killed."""
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        return []


class UpProcess:
    """A running `pdserve up` (not launch.config's Deployment, which describes one):
    `with UpProcess("up --prefill 1 --decode 1", log_path) as d:` -> d.url answers completions."""

    def __init__(self, spec: str, log_path: str, ready_timeout: float = 300.0, port: int | None = None,
                 launcher: list[str] | None = None, env: dict[str, str] | None = None):
        self.spec, self.log_path, self.ready_timeout = spec, log_path, ready_timeout
        self.env = env or {}
        self.launcher = launcher or [sys.executable, "-m", "pdserve.cli"]
        self.port = port or procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.seen: dict[int, object] = {}  # pid -> psutil.Process of every descendant seen

    def command(self) -> list[str]:
        args = shlex.split(self.spec)
        if args[:1] == ["up"] and "--log-dir" not in args:
            # the workers' logs beside this deployment's own (kept for a look), none in /tmp
            args += ["--log-dir", os.path.splitext(os.path.abspath(self.log_path))[0] + "-logs"]
        return [*self.launcher, *args, "--port", str(self.port)]

    def start(self) -> "UpProcess":
        cmd = self.command()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
        self.proc = procs.start(cmd, self.log_path, self.env)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Ready when a one-token completion succeeds (/health alone may pass before workers do) and,
        for `up`, once it has printed its table of workers (it does so just after the router answers)."""
        deadline = time.monotonic() + self.ready_timeout
        answered = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`pdserve {self.spec}` exited with {self.proc.returncode}:\n{self.log_tail()}")
            self.children()
            answered = answered or self._probe()
            if answered and self._announced():
                return
            time.sleep(1.0)
        raise RuntimeError(f"`pdserve {self.spec}` not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def _probe(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                model = json.load(r)["data"][0]["id"]
            body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
            req = urllib.request.Request(self.url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError):
            return False

    def _announced(self) -> bool:
        if shlex.split(self.spec)[:1] != ["up"]:
            return True
        try:
            with open(self.log_path) as f:
                return READY_LINE in f.read()
        except OSError:
            return False

    def children(self) -> list[int]:
        """PIDs of every process under the deployment now (workers, router)."""
        kids = _descendants(self.proc.pid) if self.proc else []
        self.seen.update({k.pid: k for k in kids})
        return [k.pid for k in kids]

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        self.children()
        # `pdserve up` stops its children on SIGTERM: to it alone, then SIGKILL to its group
        procs.stop(self.proc, grace_s, signal.SIGTERM, group=False)
        # anything left (a hung `up`, or a worker it lost) is ours to end
        for p in self.seen.values():
            try:
                if p.is_running():  # compares the start time too
                    p.kill()
            except Exception:  # gone meanwhile
                pass
        self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop(grace_s=5)
            raise

    def __exit__(self, *exc):
        self.stop()

