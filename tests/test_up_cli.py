"""`pdserve up` as a user runs it, on the paths that end before serving: a taken port fails in
one line before any worker starts; a failed start leaves no directory in the temp dir unless
--log-dir asked to keep the logs there. Also `bench compare`'s deployments keep their logs
beside the report, not in /tmp."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from pdserve.bench.deploy import UpProcess
from pdserve.procs import pdserve_command


def run_up(*args, tmpdir, timeout=300):
    env = {**os.environ, "TMPDIR": str(tmpdir)}    # where tempfile puts `up`'s own log dir
    return subprocess.run(pdserve_command("up", *args), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow  # starts processes
def test_taken_port_fails_in_one_line_before_any_worker(tmp_path):
    tmpdir, logs = tmp_path / "tmp", tmp_path / "logs"
    tmpdir.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_up("--port", str(port), "--log-dir", str(logs), "--kv-cache-memory", "128MiB", tmpdir=tmpdir)
        r2 = run_up("--port", str(port), tmpdir=tmpdir)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr == f"pdserve up: error: port {port} on 127.0.0.1 is already in use\n"
    assert r.stdout == ""                       # not even "starting"
    assert not logs.exists()                    # no worker was spawned: each would have its log there
    assert r2.returncode == 2 and "Traceback" not in r2.stderr and not list(tmpdir.iterdir())


@pytest.mark.slow  # starts processes
def test_failed_start_leaves_no_temp_dir_and_keeps_asked_logs(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    missing = str(tmp_path / "no-such-model")      # each worker exits at once: model not found
    r = run_up(missing, "--port", "0", tmpdir=tmpdir)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pdserve up: error:" in r.stderr and "not found" in r.stderr and "Traceback (most recent" not in r.stderr
    assert "logs in " + str(tmpdir) in r.stdout    # it did make one there...
    assert not list(tmpdir.iterdir())               # ...and removed it
    logs = tmp_path / "kept"
    r = run_up(missing, "--port", "0", "--log-dir", str(logs), tmpdir=tmpdir)
    assert r.returncode == 1 and not list(tmpdir.iterdir())
    assert "not found" in (logs / "prefill0.log").read_text()   # kept where asked


def test_bench_deployments_keep_up_logs_beside_their_own(tmp_path):
    d = UpProcess("up --prefill 1 --decode 1", str(tmp_path / "A.log"))
    cmd = d.command()
    assert cmd[cmd.index("--log-dir") + 1] == str(tmp_path / "A-logs")
    mine = UpProcess("up --log-dir /x", str(tmp_path / "B.log")).command()
    assert mine.count("--log-dir") == 1 and "/x" in mine              # the spec's own wins
    assert "--log-dir" not in UpProcess("--spawn-child", str(tmp_path / "C.log")).command()   # not `up`
