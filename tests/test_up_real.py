"""`pdserve up` (1 prefill + 1 decode + router, the default model) run as a user runs it: each
worker on cores of its own with matching torch threads; a SIGKILLed decode worker restarted and
serving again through the router; a SIGKILLed router back on its port with the same workers;
on exit nothing left in the temp dir."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import httpx
import pytest

from pdserve.cpu_threads import parse_cpu_list
from pdserve.procs import pdserve_command
from helpers import MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = ["--kv-cache-memory", "128MiB", "--max-num-batched-tokens", "512"]


class Up:
    def __init__(self, tmpdir):
        self.tmpdir = tmpdir
        self.proc = subprocess.Popen(pdserve_command("up", "--port", "0", *ENGINE), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(tmpdir)})
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_line(self, pattern: str, timeout: float = 400.0, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not any(re.search(pattern, x) for x in self.lines[after:]):
                raise AssertionError(f"pdserve up exited ({self.proc.returncode}):\n" + "".join(self.lines))
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.lines))


def pid_of(up: Up, role: str) -> int:
    return int(up.wait_line(rf"^\s+{role}\s+\S+\s+pid (\d+)").group(1))


def current_pid(up: Up, role: str, name: str) -> int:
    restarted = re.findall(rf"restarted {name} \(pid (\d+)\)", "".join(up.lines))
    return int(restarted[-1]) if restarted else pid_of(up, role)


def allowed(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        return parse_cpu_list(f.read().split("Cpus_allowed_list:")[1].split()[0])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def complete(router: str, timeout: float = 300.0) -> str:
    """A completion through the router, retried while the deployment recovers."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            r = httpx.post(router + "/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                            "max_tokens": 4, "temperature": 0}, timeout=120)
            if r.status_code == 200:
                return r.json()["choices"][0]["text"]
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(1.0)
    raise AssertionError(f"no completion within {timeout:.0f}s: {last}")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("tmp")
    u = Up(tmpdir)
    try:
        u.wait_line(r"^Ctrl\+C")
        u.router = u.wait_line(r"pdserve is up: (\S+)/v1").group(1)
        u.log_dir = u.wait_line(r"logs in (\S+?)[,)]").group(1)
        yield u
    finally:
        if u.proc.poll() is None:
            os.killpg(u.proc.pid, signal.SIGTERM)
            u.proc.wait(60)


def test_each_worker_on_its_own_cores_with_matching_threads(up):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the workers share it")
    placement = up.wait_line(r"^pdserve up: cpus: prefill0 (\S+), decode1 (\S+), router all")
    p, d = parse_cpu_list(placement.group(1)), parse_cpu_list(placement.group(2))
    assert not set(p) & set(d)
    for role, name, cpus in (("prefill", "prefill0", p), ("decode", "decode1", d)):
        pid = pid_of(up, role)
        assert allowed(pid) == cpus                                  # what the kernel enforces
        with open(f"/proc/{pid}/environ", "rb") as f:   # the suite's own PASSIVE, marked, not passed on
            assert not [v for v in f.read().split(b"\0") if v.startswith(b"OMP_WAIT_POLICY=")]
        with open(os.path.join(up.log_dir, f"{name}.log")) as f:
            log = f.read()
        line = next(ln for ln in log.splitlines() if "INFO pdserve.cpu: " in ln)   # its placement, first
        assert f"INFO pdserve.cpu: {len(cpus)} torch thread(s) on cpus {placement.group(1 if role == 'prefill' else 2)} " in line
        assert "OpenMP threads spin a while at barriers" in line   # a count from its cores: no PASSIVE
        assert "INFO pdserve.server: pdserve worker: role" in log    # start-up lines at INFO, shown


def test_killed_decode_worker_is_restarted_and_serves(up):
    want = complete(up.router)
    old = pid_of(up, "decode")
    n = len(up.lines)
    os.kill(old, signal.SIGKILL)
    up.wait_line(r"pdserve up: decode1 exited \(-9\); restart 1 of 5", after=n)
    new = int(up.wait_line(r"pdserve up: restarted decode1 \(pid (\d+)\)", after=n).group(1))
    assert new != old and alive(new)
    assert complete(up.router) == want                # through the router, on the restarted worker
    st = httpx.get(up.router + "/status", timeout=10).json()
    assert all(i["healthy"] for i in st["decode_instances"])


def test_killed_router_comes_back_on_its_port_with_the_same_workers(up):
    workers = [current_pid(up, "prefill", "prefill0"), current_pid(up, "decode", "decode1")]
    router = int(up.wait_line(r"^\s+router\s+\S+\s+pid (\d+)").group(1))
    n = len(up.lines)
    os.kill(router, signal.SIGKILL)
    new = int(up.wait_line(r"pdserve up: restarted router \(pid (\d+)\)", after=n).group(1))
    assert new != router
    assert complete(up.router)                        # same URL: the same port
    assert all(alive(w) for w in workers)             # the workers were not touched
    assert "exited" not in "".join(x for x in up.lines[n:] if "router" not in x)


def test_stop_leaves_nothing_in_the_temp_dir(up):
    assert os.path.isdir(up.log_dir) and up.log_dir.startswith(str(up.tmpdir))
    os.killpg(up.proc.pid, signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert not list(up.tmpdir.iterdir())
