"""--api-key covers every endpoint but /health (and /metrics with --metrics-no-auth), on a
worker and on the router, and the key need not be on the command line (issue 11, finding 10):
the worker reads $PDSERVE_API_KEY, the router --api-key-file; neither shows it in `ps`."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pdserve import procs
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow
KEY = "sk-hardening-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def servers(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    model = make_tiny_model(tmp / "model", default_model_dir)
    (tmp / "key").write_text(KEY + "\n")
    wp, rp = procs.free_port(), procs.free_port()
    w = procs.start(procs.pdserve_command("serve", model, "--port", wp, "--device", "cpu", "--kv-cache-memory",
                                          "16MiB", "--max-model-len", "256", "--metrics-no-auth"),
                    tmp / "w.log", env={"PDSERVE_API_KEY": KEY, "OMP_NUM_THREADS": "1"})
    r = None
    try:
        procs.wait_healthy(f"http://127.0.0.1:{wp}", w, timeout=240)
        r = procs.start([*procs.pdserve_command("router")[:2], "pdserve.router.cli", "--port", str(rp),
                         "--decode", f"127.0.0.1:{wp}", "--api-key-file", str(tmp / "key")], tmp / "r.log")
        procs.wait_healthy(f"http://127.0.0.1:{rp}", r, timeout=60)
        yield {"w": f"http://127.0.0.1:{wp}", "r": f"http://127.0.0.1:{rp}", "pids": [w.pid, r.pid]}
    finally:
        for p in (r, w):
            if p is not None:
                procs.stop(p)


WORKER = [("GET", "/info", None), ("GET", "/docs", None), ("GET", "/openapi.json", None), ("GET", "/redoc", None),
          ("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "hi"}),
          ("POST", "/detokenize", {"tokens": [1, 2]}), ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
          ("POST", "/v1/kv/release", {"request_id": "x", "kv_token": "y"})]
ROUTER = [("GET", "/metrics", None), ("GET", "/status", None), ("GET", "/instances", None),
          ("POST", "/instances", {"role": "decode", "url": "127.0.0.1:1"}),
          ("DELETE", "/instances", {"url": "127.0.0.1:1"}), ("GET", "/v1/models", None),
          ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})]


def call(base, method, path, body, headers=None):
    return httpx.request(method, base + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("where,method,path,body", [("w", *c) for c in WORKER] + [("r", *c) for c in ROUTER],
                         ids=[f"worker{c[1]}-{c[0]}" for c in WORKER] + [f"router{c[1]}-{c[0]}" for c in ROUTER])
def test_every_endpoint_needs_the_key(servers, where, method, path, body):
    r = call(servers[where], method, path, body)
    assert r.status_code == 401, (r.status_code, r.text[:200])
    assert r.json()["error"]["type"] == "AuthenticationError"
    assert call(servers[where], method, path, body, {"Authorization": "Bearer wrong"}).status_code == 401
    ok = call(servers[where], method, path, body, AUTH)
    assert ok.status_code != 401, ok.text[:200]
    assert ok.status_code < 500, ok.text[:200]


def test_health_is_open_and_metrics_only_where_asked(servers):
    for base in (servers["w"], servers["r"]):
        assert httpx.get(base + "/health", timeout=30).status_code == 200
    assert httpx.get(servers["w"] + "/metrics", timeout=30).status_code == 200      # --metrics-no-auth
    assert httpx.get(servers["r"] + "/metrics", timeout=30).status_code == 401      # not given


def test_the_key_is_not_on_any_command_line(servers):
    for pid in servers["pids"]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert KEY.encode() not in cmdline and b"--api-key\0" not in cmdline
