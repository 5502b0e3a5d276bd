"""pdserve.procs: start a command in its own group, wait for /health, stop it with its children."""
from __future__ import annotations

import os
import sys
import time

import pytest

from pdserve import procs

pytestmark = pytest.mark.slow  # starts processes

SERVER = """
import http.server, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])   # a child to clean up
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie waiting to be reaped counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


def test_start_wait_stop_takes_the_children_too(tmp_path):
    port = procs.free_port()
    p = procs.start([sys.executable, "-c", SERVER, str(port)], tmp_path / "log")
    try:
        procs.wait_healthy(f"http://127.0.0.1:{port}", p, timeout=30)
        group = [int(x) for x in os.popen(f"pgrep -g {p.pid}").read().split()]
        assert p.pid in group and len(group) == 2
    finally:
        procs.stop(p, timeout=5)
    time.sleep(0.2)
    assert p.returncode is not None and not any(_alive(pid) for pid in group)


def test_wait_healthy_reports_an_early_exit(tmp_path):
    p = procs.start([sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"], tmp_path / "log")
    with pytest.raises(RuntimeError, match="boom: bad flag"):
        procs.wait_healthy(f"http://127.0.0.1:{procs.free_port()}", p, timeout=30)
    procs.stop(p)
