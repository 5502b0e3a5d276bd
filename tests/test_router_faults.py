"""Faults against a real deployment (1 prefill + 2 decode workers and the router, started by
pdserve.launch.cluster.Cluster, the code behind `pdserve up`): a decode worker killed and restarted, the
prefill worker killed under load. Every request must end with its answer or a clear error."""
from __future__ import annotations

import argparse
import signal
import threading
import time

import httpx
import openai
import pytest

from pdserve.launch.cluster import Cluster, add_arguments
from pdserve.launch.config import load_deployment
from helpers import MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ENGINE = {"kv_cache_memory": "128MiB", "max_num_batched_tokens": 512}
PROMPT = "Write two sentences about rivers and the sea, and why rivers end in the sea."


KEY = "fault-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = f"""
port: 0
api_key: {KEY}
health_interval: 0.5
engine: {{kv_cache_memory: 128MiB}}
prefill: {{count: 1, engine: {{max_num_batched_tokens: 512}}}}
decode: {{count: 2, engine: {{max_model_len: 1024}}}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Described by a `pdserve up --config` file, per-role engine options and an API key
    included: the router checks it and hands it on to the workers, which check it too."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "deploy.yaml").write_text(CONFIG)
    p = argparse.ArgumentParser()
    add_arguments(p)
    dep = load_deployment(p.parse_args(["--config", str(tmp / "deploy.yaml")]))
    c = Cluster(dep, str(tmp)).start(timeout=240)
    yield c
    c.stop()
    assert not [w for w in c.workers if w.proc.alive()] and not c.router.alive()


def status(c: Cluster) -> dict:
    return httpx.get(c.router_url + "/status", headers=AUTH, timeout=10).json()


def by_url(c: Cluster) -> dict:
    st = status(c)
    return {i["url"]: i for i in st["prefill_instances"] + st["decode_instances"]}


def ask(c: Cluster, stream: bool = False, max_tokens: int = 6) -> str:
    cl = openai.OpenAI(base_url=c.router_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    if not stream:
        r = cl.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        return r.choices[0].text
    chunks = list(cl.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                        stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(ch.choices[0].text for ch in chunks)


def wait_for(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_per_role_engine_options_reach_the_workers(cluster):
    info = {w.spec.role + str(i): httpx.get(w.url + "/info", headers=AUTH, timeout=10).json() for i, w in enumerate(cluster.workers)}
    assert info["decode1"]["max_model_len"] == info["decode2"]["max_model_len"] == 1024
    assert info["prefill0"]["max_model_len"] != 1024 and info["prefill0"]["role"] == "prefill"


def test_api_key_everywhere(cluster):
    w = cluster.workers[1].url
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(cluster.router_url + "/v1/completions", json=body, timeout=30).status_code == 401
    assert httpx.post(w + "/v1/completions", json=body, timeout=30).status_code == 401   # workers need it too
    assert isinstance(ask(cluster, max_tokens=2), str)                                    # the router has it


def test_decode_worker_killed_then_restarted(cluster):
    c = cluster
    d0, d1 = [w for w in c.workers if w.spec.role == "decode"]
    want = ask(c)
    c.kill(d0)                                          # SIGKILL: no goodbye
    texts = [ask(c, stream=i % 2 == 1) for i in range(4)]
    assert texts == [want] * 4                          # all went to (or were retried on) the other one
    inst = by_url(c)[d0.url]
    assert inst["healthy"] is False and inst["last_error"]
    served = by_url(c)[d1.url]["requests"]
    c.restart(d0)
    assert wait_for(lambda: by_url(c)[d0.url]["healthy"]), "restarted decode worker not marked up"
    before = by_url(c)[d0.url]["requests"]
    assert [ask(c) for _ in range(4)] == [want] * 4
    assert by_url(c)[d0.url]["requests"] > before, "no request reached the restarted worker"
    assert by_url(c)[d1.url]["requests"] > served


def test_prefill_worker_killed_under_load(cluster):
    c = cluster
    (p,) = [w for w in c.workers if w.spec.role == "prefill"]
    want, want_short = ask(c, max_tokens=24), ask(c)
    results, errors = [], []

    def one(i):
        try:
            results.append(ask(c, stream=i % 2 == 0, max_tokens=24))
        except Exception as e:    # a clear error would be acceptable; a hang is not (timeouts above)
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for i, t in enumerate(threads):
        t.start()
        if i == 3:
            time.sleep(0.3)
            c.kill(p, signal.SIGKILL)                   # mid-load: some prefills in flight, some to come
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not errors, errors
    assert results == [want] * 8                        # completed remotely, after a failed pull, or locally
    assert wait_for(lambda: not by_url(c)[p.url]["healthy"], 10)
    # no prefill worker left: everything is prefilled on the decode workers
    local0 = status(c)["requests"]["local_prefill_reasons"].get("no_prefill_worker", 0)
    assert [ask(c) for _ in range(3)] == [want_short] * 3
    assert status(c)["requests"]["local_prefill_reasons"]["no_prefill_worker"] >= local0 + 3


def test_worker_registers_itself_and_leaves(cluster, tmp_path):
    """After the prefill worker died: a new one started with --register brings remote prefill back."""
    from pdserve.launch.cluster import engine_flags
    from pdserve.procs import free_port, pdserve_command, start, stop
    c = cluster
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = start(pdserve_command("serve", "--role", "prefill", "--port", port, "--register", c.router_url, "--api-key", KEY,
                              *engine_flags(ENGINE)), tmp_path / "registered.log")
    try:
        assert wait_for(lambda: url in by_url(c) and by_url(c)[url]["healthy"], 120), "worker did not register"
        assert by_url(c)[url]["role"] == "prefill"
        remote0 = status(c)["requests"]["remote_prefill"]
        ask(c)
        assert status(c)["requests"]["remote_prefill"] == remote0 + 1
        assert by_url(c)[url]["requests"] >= 1
    finally:
        stop(p)                                          # SIGTERM: it asks the router to drop it
    assert wait_for(lambda: url not in by_url(c), 10), "worker did not leave the router's pools"
