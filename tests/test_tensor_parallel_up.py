"""`pdserve up --colocated 1 -tp 2` (a tiny random model): the worker's tensor-parallel rank 1
SIGKILLed; `up` reports the worker's exit, restarts it with its ranks, and the router answers
as before the fault; no rank of the old worker is left, nor any process once `up` stops."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from pdserve.procs import pdserve_command
from tiny_model import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PROMPTS = ["Once upon a time", "The weather today is", "1, 2, 3,"]


class Up:
    """`pdserve up` run as a user runs it; its output lines as they come."""

    def __init__(self, *args, tmpdir):
        self.proc = subprocess.Popen(pdserve_command("up", *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, env={**os.environ, "TMPDIR": str(tmpdir)})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_line(self, pattern: str, timeout: float = 400.0, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, f"pdserve up exited ({self.proc.returncode}):\n" + "".join(self.lines)
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.lines))


def ranks_of(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if "pdserve.engine.tp_ranks" in " ".join(c.cmdline())]


def answers(router: str, timeout: float = 300.0) -> list[str]:
    """Greedy completions of PROMPTS through the router, retried while the deployment recovers."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(router + "/v1/models", timeout=30)
            r.raise_for_status()
            out, model = [], r.json()["data"][0]["id"]
            for prompt in PROMPTS:
                r = httpx.post(router + "/v1/completions", timeout=120, json={
                    "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                out.append(r.json()["choices"][0]["text"])
            return out
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"no answers within {timeout:.0f} s: {last}")


def test_a_killed_rank_under_up_restarts_its_worker_with_its_ranks(default_model_dir, tmp_path):
    model = make_tiny_model(tmp_path / "model", default_model_dir)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    up = Up(model, "--colocated", "1", "-tp", "2", "--device", "cpu", "--kv-cache-memory", "16MiB",
            "--max-model-len", "256", "--port", "0", tmpdir=tmpdir)
    seen: list[psutil.Process] = []   # every worker and rank started
    try:
        up.wait_line(r"^Ctrl\+C")
        router = up.wait_line(r"pdserve is up: (\S+)/v1").group(1)
        worker = psutil.Process(int(up.wait_line(r"^\s+both\s+\S+\s+pid (\d+)").group(1)))
        ranks = ranks_of(worker.pid)
        assert len(ranks) == 1
        seen += [worker, *ranks]
        want = answers(router)
        n = len(up.lines)
        killed = time.monotonic()
        ranks[0].send_signal(signal.SIGKILL)
        rc = int(up.wait_line(r"pdserve up: both0 exited \((-?\d+)\); restart 1 of", after=n).group(1))
        exited = time.monotonic() - killed
        new = psutil.Process(int(up.wait_line(r"pdserve up: restarted both0 \(pid (\d+)\)", after=n).group(1)))
        assert rc != 0 and new.pid != worker.pid
        got = answers(router)
        serving = time.monotonic() - killed
        new_ranks = ranks_of(new.pid)
        seen += [new, *new_ranks]
        print(f"\nSIGKILL of TP rank 1 under `up`: worker exited ({rc}) {exited:.1f} s after, "
              f"the router answered again {serving:.1f} s after")
        assert got == want
        assert len(new_ranks) == 1
        gone, alive = psutil.wait_procs([worker, *ranks], timeout=30)   # nothing left of the old worker
        assert not alive, alive
    finally:
        if up.proc.poll() is None:
            os.killpg(up.proc.pid, signal.SIGTERM)
        rc = up.proc.wait(60)
    assert rc == 0, "".join(up.lines)
    gone, alive = psutil.wait_procs(seen, timeout=30)
    assert not alive, alive
