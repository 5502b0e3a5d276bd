"""Fuzzing the OpenAI surface: schema-driven cases (schemathesis, positive and negative) and
the hand-written hostile cases of issue 11, against a real router in front of a real prefill
and decode worker, and against the workers directly. Nothing may answer 5xx or hang, every
error is OpenAI-shaped, and afterwards every worker is healthy and holds no KV."""
from __future__ import annotations

import json
import sys
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis.generation import GenerationMode

from pdserve.procs import free_port, pdserve_command, start, stop, wait_healthy
from helpers import MODEL, metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = ["--kv-cache-memory", "64MiB", "--max-model-len", "256", "--max-num-batched-tokens", "256"]
OPS = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/tokenize", "POST"), ("/detokenize", "POST")]
TIMEOUT = 120.0     # a request slower than this is a hang: cases ask for at most a few tokens


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fuzz")
    pp, dp, rp = free_port(), free_port(), free_port()
    procs = [start(pdserve_command("serve", "--role", "prefill", "--port", pp, *ENGINE), logs / "p.log"),
             start(pdserve_command("serve", "--role", "decode", "--port", dp, *ENGINE), logs / "d.log")]
    urls = {"prefill": f"http://127.0.0.1:{pp}", "decode": f"http://127.0.0.1:{dp}",
            "router": f"http://127.0.0.1:{rp}"}
    try:
        for proc, name in zip(procs, ("prefill", "decode")):
            wait_healthy(urls[name], proc, timeout=300)
        procs.append(start([sys.executable, "-m", "pdserve.router.cli", "--port", str(rp),
                            "--prefill", f"127.0.0.1:{pp}", "--decode", f"127.0.0.1:{dp}",
                            "--health-interval", "1"], logs / "r.log"))
        wait_healthy(urls["router"], procs[-1], timeout=60)
        yield urls
    finally:
        for p in procs:
            stop(p)


@pytest.fixture(scope="module")
def schema(cluster):
    return schemathesis.openapi.from_dict(httpx.get(cluster["decode"] + "/openapi.json", timeout=30).json())


def _cheap(body):
    """Keep generation short (the point is the input, not a long decode): clamp sane-typed
    lengths; values of the wrong type or out of range stay as generated."""
    if isinstance(body, dict):
        body = dict(body)
        for k, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("min_tokens", 2), ("n", 2),
                       ("best_of", 2), ("logprobs", 2), ("top_logprobs", 2), ("prompt_logprobs", 2)):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                body[k] = cap
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 4
        if isinstance(body.get("model"), str):   # past the 404 for a random model name, into the engine
            body["model"] = MODEL
    return body


def assert_openai_error_or_ok(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json().get("error")
        assert isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err, \
            f"{what}: not an OpenAI error: {r.text[:300]}"


def _send(base: str, case, client: httpx.Client) -> httpx.Response:
    body = case.body
    if isinstance(body, (dict, list)):
        kw = {"json": _cheap(body)}
    elif isinstance(body, (bytes, str)):
        kw = {"content": body}
    elif body is None or isinstance(body, (int, float, bool)):
        kw = {"content": json.dumps(body)}
    else:   # no body at all
        kw = {}
    headers = {"Content-Type": "application/json",
               **{k: v for k, v in (case.headers or {}).items() if isinstance(v, str) and v.isascii()}}
    return client.request(case.method, base + case.formatted_path, headers=headers, params=case.query,
                          timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("target", ["router", "decode", "prefill"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schema_fuzz(cluster, schema, target, mode):
    strategies = [schema[path][method].as_strategy(generation_mode=mode) for path, method in OPS]
    statuses: dict[int, int] = {}
    with httpx.Client() as client:
        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def run(case):
            r = _send(cluster[target], case, client)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert_openai_error_or_ok(r, f"{target} {case.method} {case.formatted_path} {case.body!r:.300}")
        run()
    print(f"{target} {mode.value}: statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 60
    if mode == GenerationMode.POSITIVE:   # the cases reached the engine, not only the validation
        assert statuses.get(200, 0) > 0, statuses


def _raw(base: str, path: str, data: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(base + path, content=data, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=TIMEOUT)


HOSTILE = [
    # (name, path, raw body, extra headers)
    ("out-of-vocab stop_token_ids", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [10**9]}), {}),
    ("negative stop_token_ids", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [-5]}), {}),
    ("out-of-vocab prompt ids", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": [10**9, 3], "max_tokens": 2}), {}),
    ("lone surrogate", "/v1/completions", '{"model": "%s", "prompt": "\\ud800", "max_tokens": 2}' % MODEL, {}),
    ("NaN temperature", "/v1/completions",
     '{"model": "%s", "prompt": "hi", "max_tokens": 2, "temperature": NaN}' % MODEL, {}),
    ("Infinity top_p", "/v1/completions",
     '{"model": "%s", "prompt": "hi", "max_tokens": 2, "top_p": Infinity}' % MODEL, {}),
    ("int role", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": 5, "content": "hi"}], "max_tokens": 2}), {}),
    ("int text part", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                 "max_tokens": 2}), {}),
    ("huge min_tokens", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                 "min_tokens": 10**9}), {}),
    ("failing chat_template", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                 "chat_template": "{{ raise_exception('no') }}{% for %}"}), {}),
    ("exploding chat_template", "/v1/chat/completions",
     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                 "chat_template": "{{ 'ab ' * 3000000 }}"}), {}),
    ("deep JSON", "/v1/completions", "[" * 100000 + "]" * 100000, {}),
    ("bogus Content-Encoding", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi"}),
     {"Content-Encoding": "zstd-bogus"}),
    ("max_tokens past the context, streamed", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4095, "stream": True}), {}),
    ("bad stream_options", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True,
                 "stream_options": {"include_usage": "yes please"}}), {}),
    ("client kv_transfer_params", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1, "kv_transfer_params": {
         "do_remote_prefill": True, "remote_engine_id": "x", "remote_host": "127.0.0.1", "remote_port": 9,
         "remote_block_ids": [0], "remote_request_id": "r", "kv_token": "t", "first_token_id": 1,
         "prompt_token_ids": [1, 2]}}), {}),
]


@pytest.mark.parametrize("target", ["router", "decode"])
@pytest.mark.parametrize("name,path,body,headers", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_cases(cluster, target, name, path, body, headers):
    r = _raw(cluster[target], path, body.encode("utf-8", "surrogatepass"), headers)
    assert_openai_error_or_ok(r, f"{target}: {name}")
    if r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"{target}: {name}: stream not closed with [DONE]"


def test_router_instances_with_bad_url(cluster):
    r = httpx.post(cluster["router"] + "/instances", json={"url": 5, "role": "decode"}, timeout=30)
    assert_openai_error_or_ok(r, "router /instances url=5")
    assert r.status_code == 400


def test_after_the_fuzz_every_worker_is_healthy_and_holds_no_kv(cluster):
    """Runs last in this module (pytest keeps file order): whatever the cases above did."""
    for name in ("prefill", "decode", "router"):
        assert httpx.get(cluster[name] + "/health", timeout=30).status_code == 200, name
    r = httpx.post(cluster["router"] + "/v1/completions", timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    deadline = time.monotonic() + 60     # aborted pulls and releases settle on the workers' own threads
    while time.monotonic() < deadline and any(
            metric(cluster[n], "pdserve:kv_cache_usage_perc", required=False) for n in ("prefill", "decode")):
        time.sleep(0.5)
    for n in ("prefill", "decode"):
        assert metric(cluster[n], "pdserve:kv_cache_usage_perc", required=False) == 0.0, n
