"""End to end through the `openai` client: `pdserve up` (1 prefill + 1 decode + router) against
a single `both` worker as the reference. Disaggregated output must equal it token for token."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import httpx
import openai
import pytest

from pdserve.procs import free_port, log_tail, pdserve_command, start, stop, wait_healthy
from helpers import MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ENGINE = ["--kv-cache-memory", "128MiB", "--max-num-batched-tokens", "512"]
LONG = ("Prefill and decode are the two phases of serving a language model. Explain, in plain words, why "
        "a serving system might run them on different machines, and what it must send between them.")
SHORT = "Hi!"


def _pids(line: str) -> int:
    return int(re.search(r"pid (\d+)", line).group(1))


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """`pdserve up` as a user runs it, plus a reference `both` worker started beside it."""
    logs = tmp_path_factory.mktemp("up")
    ref_port = free_port()
    ref = start(pdserve_command("serve", "--role", "both", "--port", ref_port, *ENGINE), logs / "ref.log")
    proc = subprocess.Popen(pdserve_command("up", "--port", "0", "--prefill", "1", "--decode", "1",
                                            "--log-dir", str(logs), *ENGINE),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("pdserve up exited:\n" + "".join(lines))
            lines.append(line)
            if line.startswith("Ctrl+C"):
                break
        text = "".join(lines)
        info = {"router": re.search(r"pdserve is up: (\S+)/v1", text).group(1), "proc": proc, "text": text,
                "prefill": re.search(r"prefill\s+(\S+)", text.split("pdserve is up")[1]).group(1),
                "decode": re.search(r"decode\s+(\S+)", text.split("pdserve is up")[1]).group(1),
                "pids": [_pids(l) for l in lines if " pid " in l], "logs": logs,
                "ref": f"http://127.0.0.1:{ref_port}"}
        wait_healthy(info["ref"], ref, timeout=240)
        yield info
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        stop(ref)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def kv_bytes(worker_url: str) -> float:
    with urllib.request.urlopen(worker_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(r'^pdserve:kv_transfer_bytes_total\{[^}]*direction="pulled"[^}]*\} (\S+)$',
                                             text, re.M))


def status(router: str) -> dict:
    return httpx.get(router + "/status", timeout=10).json()


def ask(c: openai.OpenAI, kind: str, prompt: str, stream: bool, **sampling) -> tuple[str, int, int]:
    """(text, prompt_tokens, completion_tokens) of one request, streamed or not."""
    kw = dict(model=MODEL, max_tokens=12, **sampling)
    if kind == "chat":
        msgs = [{"role": "user", "content": prompt}]
        if not stream:
            r = c.chat.completions.create(messages=msgs, **kw)
            return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens
        chunks = list(c.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                                **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        if not stream:
            r = c.completions.create(prompt=prompt, **kw)
            return r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens
        chunks = list(c.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert len({ch.id for ch in chunks}) == 1, "one completion, one id"
    return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens


SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": 1234}}


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_disaggregated_equals_colocated(up, kind, sampling):
    before, remote0 = kv_bytes(up["decode"]), status(up["router"])["requests"]["remote_prefill"]
    want = ask(client(up["ref"]), kind, LONG, stream=False, **SAMPLING[sampling])
    assert want[2] == 12 or want[0], want
    for stream in (False, True):
        got = ask(client(up["router"]), kind, LONG, stream, **SAMPLING[sampling])
        assert got == want, f"stream={stream}: {got!r} != colocated {want!r}"
    assert kv_bytes(up["decode"]) > before, "the decode worker pulled no KV: the remote path was not taken"
    assert status(up["router"])["requests"]["remote_prefill"] == remote0 + 2


def test_request_id_passed_through_and_first_token_streamed(up):
    rid = "e2e-request-id-1"
    with httpx.stream("POST", up["router"] + "/v1/completions", timeout=60, headers={"X-Request-Id": rid},
                      json={"prompt": LONG, "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        assert r.headers["x-request-id"] == rid
        data = [l for l in r.iter_lines() if l.startswith("data:")]
    assert data[-1] == "data: [DONE]"
    assert all(f'"id":"cmpl-{rid}"' in d for d in data[:-1])
    assert '"model":"HuggingFaceTB' in data[0]   # the router's own first chunk names the model too


def test_local_prefill_for_short_or_cached_prompts(up, tmp_path):
    """A second router over the same workers, with a threshold: short prompts, and prompts the
    decode worker already holds in its prefix cache, are prefilled there (conditional
    disaggregation); a long new prompt goes to the prefill worker."""
    port = free_port()
    r = start([sys.executable, "-m", "pdserve.router.cli", "--port", str(port), "--prefill", up["prefill"],
               "--decode", up["decode"], "--local-prefill-max-tokens", "16", "--policy", "prefix_aware"],
              tmp_path / "router2.log")
    url = f"http://127.0.0.1:{port}"
    long2 = "A different long prompt, sent by no other test: " + LONG
    try:
        wait_healthy(url, r, timeout=60)
        c = client(url)
        before = kv_bytes(up["decode"])
        got = ask(c, "completions", SHORT, stream=True, temperature=0)
        assert kv_bytes(up["decode"]) == before, "a short prompt was prefilled remotely"
        assert got == ask(client(up["ref"]), "completions", SHORT, stream=False, temperature=0)
        want = ask(c, "completions", long2, stream=False, temperature=0)
        pulled = kv_bytes(up["decode"])
        assert pulled > before, "a long prompt was not prefilled remotely"
        hits = gauge(up["decode"], "prefix_cache_hits_total")
        assert ask(c, "completions", long2, stream=True, temperature=0) == want
        assert kv_bytes(up["decode"]) == pulled, "a prompt the decode worker holds was prefilled remotely"
        assert gauge(up["decode"], "prefix_cache_hits_total") > hits   # it used the pulled KV
        st = status(url)["requests"]
        assert (st["local_prefill"], st["remote_prefill"]) == (2, 1)
        assert st["local_prefill_reasons"] == {"short_prompt": 2}
    finally:
        stop(r)
        if r.returncode not in (0, -15, 143):
            print(log_tail(r))


def gauge(worker_url: str, name: str) -> float:
    with urllib.request.urlopen(worker_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^pdserve:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_client_disconnect_aborts_on_the_workers(up):
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", up["router"] + "/v1/completions", json=body, timeout=60) as r:
        seen = []
        for line in r.iter_lines():
            seen.append(line)
            if len(seen) >= 6:
                break
        running = gauge(up["decode"], "num_requests_running")
        assert running == 1, (running, seen, status(up["router"]))
    # the client hung up after a few tokens: the decode worker stops at once and nothing stays
    # held on the prefill worker (it would otherwise hold the blocks for its abort timeout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and gauge(up["decode"], "num_requests_running"):
        time.sleep(0.2)
    assert gauge(up["decode"], "num_requests_running") == 0
    assert gauge(up["prefill"], "num_requests_held") == 0
    assert gauge(up["decode"], "generation_tokens_total") > 6


def test_up_stops_every_child_on_sigterm(up):
    """Last: SIGTERM to `pdserve up` leaves no worker or router process behind."""
    import psutil
    proc, pids = up["proc"], up["pids"]
    assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 60   # a hang guard: the loop ends once all are gone
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "orphans left behind"


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
