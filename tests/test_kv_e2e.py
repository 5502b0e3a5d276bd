"""Disaggregated serving end to end: real worker processes on loopback with the default model.

A prefill worker and a decode worker driven by two `openai` client calls (seed 002's "vLLM
Proxy") must give exactly what one colocated `both` worker gives, over tcp and over shm; then
the faults: a pull that never comes, a dead prefill worker, a mismatched block size. After
each, every worker's KV usage (read from /metrics) returns to zero.
"""
from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import APIStatusError, OpenAI

from pdserve import procs
import helpers
from helpers import MODEL

pytestmark = pytest.mark.slow

LEASE = 3.0
BASE = ["--kv-cache-memory", "128MiB", "--max-num-batched-tokens", "512"]
WORKERS = {  # name -> (serve flags, extra environment)
    "ref": (["--role", "both"], {}),
    "prefill": (["--role", "prefill"], {}),
    "dec_tcp": (["--role", "decode", "--kv-transport", "tcp"], {}),
    "dec_shm": (["--role", "decode", "--kv-transport", "shm"], {}),
    "victim": (["--role", "prefill"], {"PDSERVE_KV_LEASE": str(LEASE)}),
    "dec_bs32_fail": (["--role", "decode", "--block-size", "32", "--kv-load-failure-policy", "fail"], {}),
}


@pytest.fixture(scope="module")
def workers(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    urls, ps = {}, {}
    try:
        for name, (flags, env) in WORKERS.items():
            port = procs.free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            ps[name] = procs.start(procs.pdserve_command("serve", "--port", port, *BASE, *flags),
                                   logs / f"{name}.log", env={"OMP_NUM_THREADS": "1", **env})
        for name in WORKERS:
            procs.wait_healthy(urls[name], ps[name], timeout=240)
        yield {"urls": urls, "procs": ps}
    finally:
        for p in ps.values():
            procs.stop(p)


def client(w, name) -> OpenAI:
    return OpenAI(base_url=w["urls"][name] + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def metric(url: str, name: str, labels: str = "") -> float:
    return helpers.metric(url, name, labels, required=not name.endswith("_total"))   # a counter may have no samples yet


def wait_zero_usage(w, names, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        url = w["urls"][name]
        while metric(url, "pdserve:kv_cache_usage_perc") != 0.0:
            assert time.monotonic() < deadline, f"KV usage on {name} stays above zero"
            time.sleep(0.1)


def prefill(w, name, prompt, **kw):
    c = client(w, name)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                             extra_body={"kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}},
                             **kw)
    return r


def decode(w, name, kvp, max_tokens, **kw):
    return client(w, name).completions.create(model=MODEL, prompt="ignored", max_tokens=max_tokens,
                                              extra_body={"kv_transfer_params": kvp}, **kw)


PROMPT = ("Prefill and decode run on different workers. The prefill worker reads the prompt and "
          "hands its KV cache to the decode worker, which then writes the answer one token at a time. ")
SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": 1234}}


def test_model_listed(workers):
    assert [m.id for m in client(workers, "prefill").models.list().data] == [MODEL]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_two_calls_equal_colocated(workers, transport, mode):
    kw, dec = SAMPLING[mode], f"dec_{transport}"
    prompt = f"[{transport} {mode}] " + PROMPT
    ref = client(workers, "ref").completions.create(model=MODEL, prompt=prompt, max_tokens=12, **kw,
                                                    extra_body={"return_token_ids": True})
    pulled_before = metric(workers["urls"][dec], "pdserve:kv_transfer_blocks_total")
    pre = prefill(workers, "prefill", prompt, **kw)
    kvp = pre.model_extra["kv_transfer_params"]
    assert kvp["do_remote_prefill"] and kvp["remote_block_ids"] and kvp["remote_host"] == "127.0.0.1"
    assert transport in kvp["transports"]
    assert pre.usage.completion_tokens == 1 and pre.choices[0].finish_reason == "length"
    out = client(workers, dec).completions.create(model=MODEL, prompt="ignored", max_tokens=12, **kw, extra_body={
        "kv_transfer_params": kvp, "return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == ref.choices[0].model_extra["token_ids"]
    assert out.choices[0].model_extra["prompt_token_ids"] == ref.choices[0].model_extra["prompt_token_ids"]
    assert out.choices[0].text == ref.choices[0].text
    assert pre.choices[0].text and ref.choices[0].text.startswith(pre.choices[0].text)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    assert out.choices[0].finish_reason == ref.choices[0].finish_reason
    # the KV really came over this transport (not recomputed): all the prompt's blocks
    pulled = metric(workers["urls"][dec], "pdserve:kv_transfer_blocks_total") - pulled_before
    assert pulled == len(kvp["remote_block_ids"])
    assert metric(workers["urls"][dec], "pdserve:kv_transfer_bytes_total", f'transport="{transport}"') > 0
    assert metric(workers["urls"]["prefill"], "pdserve:kv_transfer_bytes_total",
                  f'direction="served",transport="{transport}"') > 0
    wait_zero_usage(workers, ["ref", "prefill", dec])


def test_chat_streamed_equal_colocated(workers):
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ref = client(workers, "ref").chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    pre = client(workers, "prefill").chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=1, temperature=0,
        extra_body={"kv_transfer_params": {"do_remote_decode": True}})
    kvp = pre.model_extra["kv_transfer_params"]
    stream = client(workers, "dec_shm").chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_transfer_params": kvp})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    wait_zero_usage(workers, ["prefill", "dec_shm"])


def test_warm_prefix_cache_pulls_fewer_blocks(workers):
    prompt = "A long shared system prompt about caching. " * 12
    url = workers["urls"]["dec_tcp"]
    ref = client(workers, "ref").completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    pulls = []
    for _ in range(2):
        before = metric(url, "pdserve:kv_transfer_blocks_total")
        kvp = prefill(workers, "prefill", prompt, temperature=0).model_extra["kv_transfer_params"]
        out = decode(workers, "dec_tcp", kvp, 6, temperature=0)
        assert out.choices[0].text == ref.choices[0].text
        pulls.append(metric(url, "pdserve:kv_transfer_blocks_total") - before)
    n_blocks = len(kvp["remote_block_ids"])
    assert pulls[0] == n_blocks
    assert 0 < pulls[1] < pulls[0]   # only the blocks its prefix cache lacks (the partial last one)
    assert out.usage.prompt_tokens_details.cached_tokens > 0
    wait_zero_usage(workers, ["prefill", "dec_tcp"])


def test_decode_worker_asked_to_prefill_is_400(workers):
    with pytest.raises(APIStatusError) as e:
        prefill(workers, "dec_tcp", "hello")
    assert e.value.status_code == 400
    err = e.value.response.json()["error"]
    assert err["param"] == "kv_transfer_params" and "role decode" in err["message"]
    assert err["type"] == "BadRequestError" and err["code"] == 400


def test_prefill_worker_asked_to_decode_is_400(workers):
    kvp = prefill(workers, "prefill", "hello there", temperature=0).model_extra["kv_transfer_params"]
    with pytest.raises(APIStatusError) as e:
        decode(workers, "prefill", kvp, 4)
    assert e.value.status_code == 400 and "role prefill" in e.value.response.json()["error"]["message"]
    _release(workers, "prefill", kvp)


def test_malformed_kv_params_is_400(workers):
    with pytest.raises(APIStatusError) as e:
        decode(workers, "dec_tcp", {"do_remote_prefill": True, "remote_host": "127.0.0.1"}, 4)
    assert e.value.status_code == 400 and e.value.response.json()["error"]["param"] == "kv_transfer_params"


def _release(w, name, kvp, token=None) -> bool:
    body = json.dumps({"request_id": kvp["remote_request_id"], "kv_token": token or kvp["kv_token"]}).encode()
    req = urllib.request.Request(w["urls"][name] + "/v1/kv/release", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())["released"]


def test_release_needs_the_one_time_token(workers):
    url = workers["urls"]["prefill"]
    kvp = prefill(workers, "prefill", "Held blocks wait for their puller.", temperature=0).model_extra["kv_transfer_params"]
    assert metric(url, "pdserve:num_requests_held") == 1 and metric(url, "pdserve:kv_cache_usage_perc") > 0
    assert not _release(workers, "prefill", kvp, token="not-the-token")
    assert metric(url, "pdserve:num_requests_held") == 1
    assert _release(workers, "prefill", kvp)
    assert not _release(workers, "prefill", kvp)   # spent
    wait_zero_usage(workers, ["prefill"])
    # a decode worker presenting the spent token is refused, and recomputes the right answer
    out = decode(workers, "dec_tcp", kvp, 1, temperature=0)
    ref = client(workers, "ref").completions.create(model=MODEL, prompt="Held blocks wait for their puller.",
                                                    max_tokens=1, temperature=0)
    assert out.choices[0].text == ref.choices[0].text
    assert metric(workers["urls"]["dec_tcp"], "pdserve:kv_transfer_failures_total") >= 1
    wait_zero_usage(workers, ["dec_tcp"])


# ---- faults ---------------------------------------------------------------------------------
def test_block_size_mismatch_refused_at_handshake(workers):
    kvp = prefill(workers, "prefill", PROMPT, temperature=0).model_extra["kv_transfer_params"]
    with pytest.raises(APIStatusError) as e:
        decode(workers, "dec_bs32_fail", kvp, 8, temperature=0)
    msg = e.value.response.json()["error"]["message"]
    assert e.value.status_code == 503 and "handshake" in msg and "block_size" in msg
    assert "prefill worker: 16" in msg and "decode worker: 32" in msg
    wait_zero_usage(workers, ["prefill", "dec_bs32_fail"])   # the refused decoder still released them


def test_pull_that_never_comes_is_freed_after_timeout(workers):
    url = workers["urls"]["victim"]
    prompt = "Nobody will pull this KV. " * 4
    kvp = prefill(workers, "victim", prompt, temperature=0).model_extra["kv_transfer_params"]
    assert metric(url, "pdserve:kv_cache_usage_perc") > 0
    t0 = time.monotonic()
    wait_zero_usage(workers, ["victim"], timeout=LEASE + 10)
    assert time.monotonic() - t0 > LEASE / 2
    assert metric(url, "pdserve:num_requests_held") == 0
    # a late pull is refused; with the default policy the decode worker recomputes
    ref = client(workers, "ref").completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    out = decode(workers, "dec_shm", kvp, 6, temperature=0)
    assert out.choices[0].text == ref.choices[0].text
    wait_zero_usage(workers, ["dec_shm"])


def test_prefill_worker_killed_before_pull(workers):
    prompts = ["The prefill worker dies right after it answers. " * 3, "Then the decode worker must cope. " * 3]
    with ThreadPoolExecutor(2) as ex:
        pres = list(ex.map(lambda p: prefill(workers, "victim", p, temperature=0), prompts))
    procs.kill(workers["procs"]["victim"])
    # recompute (default policy): the right tokens anyway
    ref = client(workers, "ref").completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0)
    failures = metric(workers["urls"]["dec_shm"], "pdserve:kv_transfer_failures_total")
    out = decode(workers, "dec_shm", pres[0].model_extra["kv_transfer_params"], 8, temperature=0)
    assert out.choices[0].text == ref.choices[0].text
    assert metric(workers["urls"]["dec_shm"], "pdserve:kv_transfer_failures_total") == failures + 1
    # fail policy: a clear error naming the unreachable prefill worker
    with pytest.raises(APIStatusError) as e:
        decode(workers, "dec_bs32_fail", pres[1].model_extra["kv_transfer_params"], 8, temperature=0)
    msg = e.value.response.json()["error"]["message"]
    assert e.value.status_code == 503 and "KV transfer" in msg and "cannot reach" in msg
    wait_zero_usage(workers, ["ref", "prefill", "dec_tcp", "dec_shm", "dec_bs32_fail"])
