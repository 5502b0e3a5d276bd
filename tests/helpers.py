"""Helpers shared by the test files: the default model's served name, free ports, reading
Prometheus samples, waiting for a condition, and one worker process for a module."""
from __future__ import annotations

import contextlib
import re
import time
import urllib.request

from pdserve import procs
from pdserve.procs import free_port  # noqa: F401  (re-exported: one definition for the tests)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"   # the default model's served name


def metric_value(text: str, name: str, labels: str = "", required: bool = True) -> float:
    """The sum of the samples of `name` in a /metrics text whose labels contain `labels`."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total, found = total + float(m.group(2)), True
    assert found or not required, f"{name} missing from /metrics"
    return total


def metric(url: str, name: str, labels: str = "", required: bool = True, headers: dict | None = None) -> float:
    """metric_value() of a server's /metrics now."""
    req = urllib.request.Request(url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return metric_value(r.read().decode(), name, labels, required)


def wait_for(pred, timeout: float = 60.0, what: str = "condition", interval: float = 0.02):
    """Poll pred() until it is true; the timeout is a hang guard, never a measurement."""
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return v


@contextlib.contextmanager
def serving(log_dir, *args, env: dict | None = None, timeout: float = 240, name: str = "worker"):
    """`pdserve serve ARGS` on 127.0.0.1 and a free port while the block runs: yields its URL,
    stops it (and its children) afterwards."""
    port = free_port()
    p = procs.start(procs.pdserve_command("serve", "--port", port, *args), log_dir / f"{name}.log", env=env)
    try:
        procs.wait_healthy(f"http://127.0.0.1:{port}", p, timeout=timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop(p)


def complete_counted(client, stream: bool, on_first_chunk=lambda: None, **kw) -> tuple[str, str | None, int | None]:
    """One completion through the openai client, streamed (usage included) or not: (text,
    finish_reason, completion tokens); on_first_chunk() runs once when a streamed choice arrives."""
    if not stream:
        r = client.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    text, finish, used, started = "", None, None, False
    for ch in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            if not started:
                started = True
                on_first_chunk()
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            used = ch.usage.completion_tokens
    return text, finish, used
