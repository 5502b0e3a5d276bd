"""Hostile requests over HTTP (issue 11, findings 1, 2, 4, 5, 8) against real processes: a
prefill worker, a decode worker and the router, on a tiny random model with the default
model's tokenizer (tests/tiny_model.py). The decode worker's context is shorter than the
prefill worker's, so a request can pass the prefill and still be refused by the decode side:
the one case where an error can only arrive after the stream's 200."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from pdserve import procs
from tiny_model import make_tiny_model

pytestmark = pytest.mark.slow
P_LEN, D_LEN = 512, 256


def start(args, log, env=None):
    return procs.start(procs.pdserve_command(*map(str, args)), log, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    model = make_tiny_model(tmp / "model", default_model_dir)
    common = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "16MiB", "--kv-transport", "tcp"]
    pp, dp, rp = procs.free_port(), procs.free_port(), procs.free_port()
    ps = []
    try:
        ps.append(start(["serve", model, "--role", "prefill", "--port", pp, "--max-model-len", P_LEN, *common],
                        tmp / "p.log"))
        ps.append(start(["serve", model, "--role", "decode", "--port", dp, "--max-model-len", D_LEN,
                         "--trust-request-chat-template", *common], tmp / "d.log"))
        urls = {"p": f"http://127.0.0.1:{pp}", "d": f"http://127.0.0.1:{dp}", "r": f"http://127.0.0.1:{rp}"}
        for p, u in zip(ps, (urls["p"], urls["d"])):
            procs.wait_healthy(u, p, timeout=240)
        ps.append(procs.start([*procs.pdserve_command("router")[:2], "pdserve.router.cli", "--port", str(rp),
                               "--prefill", urls["p"], "--decode", urls["d"], "--health-interval", "0.5"],
                              tmp / "r.log"))
        procs.wait_healthy(urls["r"], ps[-1], timeout=60)
        urls["model"] = model
        yield urls
    finally:
        for p in ps:
            procs.stop(p)


def is_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == r.status_code, err
    if status is not None:
        assert r.status_code == status, (r.status_code, err)
    assert r.status_code < 500 or status == 500, (r.status_code, err)
    return err


def post(url, path, body=None, content=None, headers=None, timeout=60):
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(url + path, json=body if content is None else None, content=content, headers=hdrs,
                      timeout=timeout)


def healthy(c) -> bool:
    return all(httpx.get(c[k] + "/health", timeout=30).status_code == 200 for k in ("p", "d", "r"))


def completion_ok(c, url_key="r") -> None:
    r = post(c[url_key], "/v1/completions", {"prompt": "hello there", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---- finding 1: one request must not kill the engines ------------------------------------------
def test_out_of_range_stop_token_is_refused_and_engines_live_on(cluster):
    bad = {"prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [1000000000]}
    for k in ("r", "d", "p"):
        assert is_openai_error(post(cluster[k], "/v1/completions", bad), 400)["param"] == "stop_token_ids"
    assert healthy(cluster)
    completion_ok(cluster)


# ---- finding 8: every error OpenAI-shaped, no plain-text 500 -----------------------------------
WORKER_CASES = [
    ("/v1/completions", b'{"prompt": "\\ud800 hi", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "stop": ["\\udfff"]}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": 5, "content": "hi"}]}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "min_tokens": 1000000000}',
     "min_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "chat_template": "{% for %}"}',
     "chat_template"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                             b'"chat_template": "{{ raise_exception(1) }}"}', "chat_template"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 2', None),
]


@pytest.mark.parametrize("path,raw,param", WORKER_CASES, ids=[f"{i}" for i in range(len(WORKER_CASES))])
def test_bad_requests_get_openai_errors_from_workers_and_router(cluster, path, raw, param):
    targets = ("d", "r") if path.startswith("/v1") else ("d",)
    for k in targets:
        err = is_openai_error(post(cluster[k], path, content=raw), 400)
        if param is not None:
            assert err["param"] == param, (k, err)


def test_framework_errors_are_openai_shaped(cluster):
    r, d = cluster["r"], cluster["d"]
    for u in (r, d):
        is_openai_error(httpx.get(u + "/no/such/path", timeout=30), 404)
        is_openai_error(httpx.put(u + "/v1/completions", content=b"{}", timeout=30), 405)
        is_openai_error(post(u, "/v1/completions", content=b'\x1f\x8b not gzip at all',
                             headers={"Content-Encoding": "gzip"}))
        for enc in ("bogus", "br", "deflate"):   # unknown ones may be ignored; never a 500 or plain text
            r_ = post(u, "/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers={"Content-Encoding": enc})
            assert r_.status_code == 200 or is_openai_error(r_), r_.text[:200]
    err = is_openai_error(post(r, "/instances", {"role": "decode", "url": 5}), 400)
    assert "url" in err["message"]
    is_openai_error(post(r, "/instances", content=b"[" * 100_000 + b"]" * 100_000), 400)
    assert healthy(cluster)


# ---- finding 4: limits, and CPU work off the event loop ----------------------------------------
def test_request_bodies_are_limited(cluster):
    big = json.dumps({"prompt": "a" * (9 << 20)}).encode()
    for k in ("r", "d"):
        assert "limit" in is_openai_error(post(cluster[k], "/v1/completions", content=big), 413)["message"]

    def chunked():   # no Content-Length: counted while read
        for _ in range(10):
            yield b"a" * (1 << 20)
    for k in ("r", "d"):
        r = httpx.post(cluster[k] + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"},
                       timeout=60)
        is_openai_error(r, 413)
    is_openai_error(post(cluster["d"], "/tokenize", content=big), 413)
    assert healthy(cluster)


def test_prompt_too_long_for_the_context_is_refused_before_tokenizing(cluster):
    r = post(cluster["d"], "/tokenize", {"prompt": "word " * 400_000})   # 2 MB: within the body limit
    assert "cannot fit" in is_openai_error(r, 400)["message"]
    r = post(cluster["r"], "/v1/completions", {"prompt": "word " * 400_000, "max_tokens": 2})
    is_openai_error(r, 400)


def test_health_answers_while_a_hostile_chat_template_renders(cluster):
    """Two nested loops of 100000: 10**10 template steps. On the event loop that freezes the
    worker; in the render thread it ends at the template's time budget with a 400."""
    hostile = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": hostile, "max_tokens": 2}
    result = {}

    def send():
        result["r"] = post(cluster["d"], "/v1/chat/completions", body, timeout=300)
    t = threading.Thread(target=send)
    t.start()
    try:
        time.sleep(0.5)   # let it start (if not, the test is merely weaker, never wrong)
        assert httpx.get(cluster["d"] + "/health", timeout=60).status_code == 200
        completion_ok(cluster, "d")   # and it serves other requests meanwhile
    finally:
        t.join(300)
    assert "budget" in is_openai_error(result["r"], 400)["message"] or "took more" in result["r"].text
    for template in ("{{ 'ab ' * 3000000 }}", "{{ 'a'|center(1000000000) }}"):
        r = post(cluster["d"], "/v1/chat/completions", {**body, "chat_template": template})
        assert is_openai_error(r, 400)["param"] == "chat_template"
    r = post(cluster["r"], "/v1/chat/completions", {**body, "chat_template": "{{ 'ab ' * 3000000 }}"})
    is_openai_error(r, 400)   # the prefill worker does not trust request templates at all
    assert healthy(cluster)


# ---- finding 5: validation before the first byte of a stream -----------------------------------
def oai(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_streams_are_refused_before_their_200(cluster):
    c = oai(cluster["r"])
    with pytest.raises(openai.BadRequestError) as e:
        list(c.completions.create(model=cluster["model"], prompt="hello", max_tokens=4095, stream=True))
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        list(c.completions.create(model=cluster["model"], prompt="hello", max_tokens=4, stream=True,
                                  stream_options={"include_usage": "x"}))
    with pytest.raises(openai.BadRequestError):
        list(c.chat.completions.create(model=cluster["model"], messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4095, stream=True))


def test_a_refusal_after_the_200_is_an_sse_error_then_done(cluster):
    """Prompt + max_tokens fits the prefill worker's context (512) but not the decode worker's
    (256): the client already has the first token when the decode worker says no."""
    body = {"prompt": "hello", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", cluster["r"] + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())   # a complete chunked body: httpx raises if it is not
    assert b"HTTP/1.1" not in raw
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 400 and err["param"] == "max_tokens", err
    c = oai(cluster["r"])
    with pytest.raises(openai.APIError) as e:   # the client reads it as an error, not a broken connection
        list(c.completions.create(model=cluster["model"], prompt="hello", max_tokens=400, stream=True))
    assert not isinstance(e.value, openai.APIConnectionError)
    assert healthy(cluster)


# ---- finding 2: a client's kv_transfer_params never reach a worker -----------------------------
def test_client_kv_transfer_params_never_make_a_worker_dial(cluster):
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.1)
    port = trap.getsockname()[1]
    kvp = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "evil",
           "remote_host": "127.0.0.1", "remote_port": port, "remote_block_ids": [0], "remote_request_id": "x",
           "kv_token": "t", "first_token_id": 5, "prompt_token_ids": [1, 2, 3], "transports": ["tcp"]}
    try:
        answers = [post(cluster["r"], "/v1/completions", {"prompt": "hello", "kv_transfer_params": kvp, **extra})
                   for extra in ({"max_tokens": 1}, {"max_tokens": 3}, {"max_tokens": 3, "stream": True},
                                 {"logprobs": 1})]
        with pytest.raises(socket.timeout):
            conn, _ = trap.accept()   # nobody dialled the host the client named
            conn.close()
    finally:
        trap.close()
    for r in answers:
        assert is_openai_error(r, 400)["param"] == "kv_transfer_params"
    completion_ok(cluster)
