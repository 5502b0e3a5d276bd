"""One `both` worker process with --api-key: the OpenAI API as vLLM serves it."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import AuthenticationError, OpenAI

import helpers
from helpers import MODEL

pytestmark = pytest.mark.slow
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def url(default_model_dir, tmp_path_factory):
    with helpers.serving(tmp_path_factory.mktemp("api"), "--api-key", KEY, "--kv-cache-memory", "128MiB",
                         "--max-model-len", "1024", env={"OMP_NUM_THREADS": "1"}, timeout=240) as u:
        yield u


@pytest.fixture(scope="module")
def oai(url):
    return OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(url) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def metric(url: str, name: str) -> float:
    return helpers.metric(url, name, headers={"Authorization": f"Bearer {KEY}"})


def wait_idle(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, "pdserve:num_requests_running") or metric(url, "pdserve:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "requests still running / KV still in use"
        time.sleep(0.1)


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:])
    return out


# ---- basics -----------------------------------------------------------------------------------
def test_health_needs_no_key_metrics_does(url):
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    text = http(url).get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total",
                 "prefix_cache_queries_total", "generation_tokens_total", "prompt_tokens_total"):
        assert f"pdserve:{name}" in text


def test_api_key_required(url):
    bad = OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError) as e:
        bad.models.list()
    err = e.value.response.json()["error"]
    assert e.value.status_code == 401 and err["type"] == "AuthenticationError" and err["code"] == 401


def test_models(oai):
    (m,) = oai.models.list().data
    assert m.id == MODEL and m.model_extra["max_model_len"] == 1024


def test_completion_usage_and_request_id(url, oai):
    prompt = "The capital of France is"
    n_prompt = http(url).post("/tokenize", json={"prompt": prompt}).json()["count"]
    raw = oai.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0,
                                                   extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "abc-123"})
    assert raw.headers["x-request-id"] == "abc-123"
    r = raw.parse()
    assert r.id == "cmpl-abc-123" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 7, n_prompt + 7)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text


def test_streamed_completion_equals_unstreamed(url, oai):
    kw = dict(model=MODEL, prompt="List three fruits:", max_tokens=10, temperature=0)
    whole = oai.completions.create(**kw)
    with http(url).stream("POST", "/v1/completions", json={**kw, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole.choices[0].text
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (whole.usage.prompt_tokens,
                                                                    whole.usage.completion_tokens)
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert all(c["id"] == chunks[0]["id"] for c in chunks)


def test_chat_streamed_and_not(oai):
    msgs = [{"role": "user", "content": "Say hello."}]
    whole = oai.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 8
    chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=8, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)   # no include_usage: no usage chunk


def test_n_and_seed(oai):
    kw = dict(model=MODEL, prompt="A random word:", max_tokens=6, temperature=1.0, seed=7, n=3)
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]   # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1                        # the n samples differ
    assert 3 <= a.usage.completion_tokens <= 18 and a.usage.prompt_tokens == b.usage.prompt_tokens
    single = oai.completions.create(model=MODEL, prompt="A random word:", max_tokens=6, temperature=1.0, seed=7)
    assert single.choices[0].text == a.choices[0].text   # the first of n uses the request's seed


def test_n_streamed(url, oai):
    kw = dict(model=MODEL, prompt="Pick a colour:", max_tokens=5, temperature=1.0, seed=3, n=2)
    whole = oai.completions.create(**kw)
    texts = {0: "", 1: ""}
    for chunk in oai.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]


def test_batch_prompts(oai):
    r = oai.completions.create(model=MODEL, prompt=["One,", "Two,"], max_tokens=3, temperature=0)
    solo = [oai.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0).choices[0].text
            for p in ("One,", "Two,")]
    assert [c.text for c in r.choices] == solo


def test_stop_and_min_tokens_and_ignore_eos(oai):
    r = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text and "6" in r.choices[0].text
    r = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=9, temperature=0,
                               extra_body={"ignore_eos": True, "min_tokens": 9})
    assert r.usage.completion_tokens == 9


def test_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) >= 1 and max(t.values()) <= 0 for t in lp.top_logprobs)
    c = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(x.top_logprobs) == 2 for x in content)


def test_tokenize_detokenize(url):
    h = http(url)
    toks = h.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert toks["count"] == len(toks["tokens"]) and toks["max_model_len"] == 1024
    assert h.post("/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"] == "Hello world"
    chat = h.post("/tokenize", json={"messages": [{"role": "user", "content": "Hello world"}]}).json()
    assert chat["count"] > toks["count"]


# ---- errors -----------------------------------------------------------------------------------
def _err(resp, status):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["code"] == status
    return e


def test_errors(url):
    h = http(url)
    e = _err(h.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert e["type"] == "NotFoundError" and "nope" in e["message"]
    assert _err(h.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400)["param"] == "temperature"
    assert _err(h.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400)["param"] == "max_tokens"
    assert _err(h.post("/v1/completions", json={"max_tokens": 3}), 400)["param"] == "prompt"
    e = _err(h.post("/v1/completions", json={"prompt": "word " * 1100, "max_tokens": 3}), 400)
    assert "maximum context length" in e["message"]
    assert _err(h.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    assert _err(h.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert _err(h.post("/v1/completions", json={"prompt": "x", "stream": True,
                                                "kv_transfer_params": {"do_remote_decode": True}}), 400)["param"] == "stream"
    # a prefill for remote decode with n > 1 prefills once (the decode worker forks): one choice
    r = h.post("/v1/completions", json={"prompt": "x", "n": 2, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    kvp = r.json()["kv_transfer_params"]
    assert h.post("/v1/kv/release", json={"request_id": kvp["remote_request_id"],
                                          "kv_token": kvp["kv_token"]}).json()["released"]
    assert _err(h.post("/v1/completions", json={"prompt": "x", "max_tokens": 0, "echo": True,
                                                "kv_transfer_params": {"do_remote_decode": True}}), 400)["param"] == "max_tokens"
    assert _err(h.get("/v1/nothing-here"), 404)
    assert _err(h.post("/v1/kv/release", json={"request_id": "x"}), 400)["param"] == "kv_token"


# ---- disconnects --------------------------------------------------------------------------------
def test_streaming_client_disconnect_aborts(url):
    body = {"prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True, "stream": True}
    gen0 = metric(url, "pdserve:generation_tokens_total")
    with http(url).stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(url, "pdserve:num_requests_running") == 1
    wait_idle(url, timeout=120)
    assert metric(url, "pdserve:generation_tokens_total") - gen0 < 900   # stopped, not finished


def test_unstreamed_client_disconnect_aborts(url):
    body = {"prompt": "Tell me another very long story.", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http(url).post("/v1/completions", json=body, timeout=1.5)
    wait_idle(url)
    gen = metric(url, "pdserve:generation_tokens_total")
    time.sleep(1.0)
    assert metric(url, "pdserve:generation_tokens_total") == gen   # nothing still generating


def test_latency_metrics_observed(url, oai):
    oai.completions.create(model=MODEL, prompt="Count: 1, 2,", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert metric(url, "pdserve:time_to_first_token_seconds_count") >= 1
    assert metric(url, "pdserve:inter_token_latency_seconds_count") >= 4
    assert metric(url, "pdserve:e2e_request_latency_seconds_count") >= 1
    assert metric(url, "pdserve:request_success_total") >= 1

