"""Child processes for `pdserve up`: pdserve.procs' way (own process group, log file), plus
what a long-lived deployment needs: CPU pinning and death with the parent (PR_SET_PDEATHSIG).
Linux semantics."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1


def _child_setup(cpus: list[int] | None) -> None:
    """Runs in the child between fork and exec: die with the parent, stay on the given cores."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass   # not Linux: the signal handlers of `pdserve up` still stop the children
    if cpus:
        os.sched_setaffinity(0, cpus)


class Proc:
    def __init__(self, cmd: list[str], log_path: str, name: str, cpus: list[int] | None = None,
                 env: dict | None = None):
        self.cmd, self.log_path, self.name, self.cpus = cmd, log_path, name, cpus
        self.reported = False
        with open(log_path, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            self.popen = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env={**os.environ, **(env or {})},
                                          preexec_fn=lambda: _child_setup(cpus))
        self.popen.log_path = log_path   # where pdserve.procs looks for a failed start's last lines

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def send(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)   # its own session: the group is the worker and its children
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.alive():
            self.send(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.send(signal.SIGKILL)   # whatever is left of the group, grandchildren included
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""
