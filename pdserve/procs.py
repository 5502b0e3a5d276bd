"""Start, watch and stop local server processes (workers, routers): a command line in, a
Popen out. Used by the tests, `pdserve up` and the benchmarks."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (another process may still take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def start(cmd: list[str], log_path: str | Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start cmd in its own process group (so stop() reaches its children), output to log_path."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
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
                 path: str = "/health") -> None:
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
        time.sleep(0.2)
    raise TimeoutError(f"{url}{path} not healthy after {timeout:.0f}s:\n" + (log_tail(proc) if proc else ""))


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM the process group (graceful shutdown), SIGKILL it if it lingers; reap."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # children left behind (e.g. a resource tracker)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode


def kill(proc: subprocess.Popen) -> None:
    """Kill only the main process at once (no cleanup), as a crash would."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)   # start() made the process its group leader
    except (ProcessLookupError, PermissionError):
        pass
