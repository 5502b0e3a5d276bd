"""The one place that starts, watches and stops local processes (workers, routers, a whole
`pdserve up`): free ports, a command in its own session with its output in a log file,
optionally dying with its parent (PR_SET_PDEATHSIG) and pinned to cores, waiting for /health,
and stopping with TERM then KILL for the whole group. `start()` gives a bare Popen (the tests,
one-off workers); `Proc` wraps one for a long-lived supervisor (`pdserve up`, the Ray actors);
`pdserve.bench.deploy.UpProcess` runs a whole `pdserve up` on top of them. Linux semantics."""
from __future__ import annotations

import ctypes
import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


LOWEST_CHOSEN_PORT = 10000   # free_port draws from here up to the kernel's ephemeral range


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (another process may still take it before it is bound), drawn at
    random from below the kernel's ephemeral range where there is room. A port from that range,
    what binding port 0 gives, is also what the kernel hands out as the local end of outgoing
    connections: a worker's own tensor-parallel ranks connecting to each other took the port
    chosen for its HTTP server before it was bound (EADDRINUSE, once in a full suite)."""
    low = ephemeral_ports()[0]
    pick = random.SystemRandom()
    for _ in range(64 if low > LOWEST_CHOSEN_PORT + 1000 else 0):
        port = pick.randrange(LOWEST_CHOSEN_PORT, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default where
    it cannot be read)."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


class PortInUse(ValueError):
    """A port a server is about to bind is taken (a ValueError: the CLI prints it in one line)."""


def check_port(host: str, port: int) -> None:
    """Raise PortInUse unless a server could bind host:port now. SO_REUSEADDR as the servers
    set it (uvicorn, aiohttp): a port left in TIME_WAIT is free, a listening one is not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on {host} is already in use") from None
            if e.errno == errno.EACCES:
                raise PortInUse(f"port {port} on {host} needs privileges (use a port above 1023)") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise PortInUse(f"cannot bind {host}: not an address of this machine") from None
            raise PortInUse(f"cannot bind port {port} on {host}: {e.strerror}") from None


def distinct_free_ports(host: str, n: int, avoid=()) -> list[int]:
    """n different free ports, none of them in avoid (free_port alone may repeat itself)."""
    out: list[int] = []
    while len(out) < n:
        p = free_port(host)
        if p not in out and p not in avoid:
            out.append(p)
    return out


def pdserve_command(*args: str) -> list[str]:
    """`pdserve ARGS...` run by this Python, so it works without the console script on PATH."""
    return [sys.executable, "-m", "pdserve.cli", *map(str, args)]


PR_SET_PDEATHSIG = 1


def _child_setup(die_with_parent: bool, cpus: list[int] | None) -> None:
    """Runs in the child between fork and exec: die with the parent, stay on the given cores."""
    if die_with_parent:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass   # not Linux: the signal handlers of `pdserve up` still stop the children
    if cpus:
        os.sched_setaffinity(0, cpus)


def start(cmd: list[str], log_path: str | Path | None = None, env: dict | None = None, *,
          die_with_parent: bool = False, cpus: list[int] | None = None,
          header: bool = False) -> subprocess.Popen:
    """Start cmd in its own session and process group (so stop() reaches its children), output
    to log_path (appended; `header` writes the command line first). die_with_parent: SIGTERM
    when this process dies, even by SIGKILL; cpus: the cores it may run on."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        if header and log_path:
            out.write(f"$ {' '.join(map(str, cmd))}\n".encode())
            out.flush()
        setup = (lambda: _child_setup(die_with_parent, cpus)) if die_with_parent or cpus else None
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=setup)
    finally:
        if log_path:
            out.close()
    proc.log_path = str(log_path) if log_path else None
    return proc


def log_tail(proc: subprocess.Popen, n: int = 3000) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode(errors="replace")


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0,
                 path: str = "/health", interval: float = 0.2) -> None:
    """Poll url+path until it answers 200; fail early (with the log's tail) if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode} before {url} was healthy:\n"
                               + log_tail(proc))
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url}{path} not healthy after {timeout:.0f}s:\n" + (log_tail(proc) if proc else ""))


def stop(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM,
         kill_timeout: float | None = None, group: bool = True) -> int | None:
    """Send sig (graceful shutdown) to the process group, or to the main process alone when it
    stops its own children (`pdserve up`); wait up to timeout; then SIGKILL whatever is left of
    the group, grandchildren included, and reap (up to kill_timeout, default timeout)."""
    if proc.poll() is None:
        if group:
            signal_group(proc, sig)
        else:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc, signal.SIGKILL)  # children left behind (e.g. a resource tracker)
    try:
        proc.wait(timeout if kill_timeout is None else kill_timeout)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode


def kill(proc: subprocess.Popen) -> None:
    """Kill only the main process at once (no cleanup), as a crash would."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)   # start() made the process its group leader
    except (ProcessLookupError, PermissionError):
        pass


class Proc:
    """A long-lived child of a supervisor (`pdserve up`, a Ray actor): started by start() with
    its command line at the top of its log, dying with its parent, optionally pinned to cores."""

    def __init__(self, cmd: list[str], log_path: str, name: str, cpus: list[int] | None = None,
                 env: dict | None = None):
        self.cmd, self.log_path, self.name, self.cpus = cmd, log_path, name, cpus
        self.reported = False
        self.popen = start(cmd, log_path, env, die_with_parent=True, cpus=cpus, header=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def send(self, sig: int) -> None:
        signal_group(self.popen, sig)   # its own session: the group is the worker and its children

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        stop(self.popen, timeout, sig, kill_timeout=5)

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""
