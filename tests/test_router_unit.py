"""Router logic against fake workers (tests/router_fakes.py): the P->D flow, conditional
disaggregation, retries and fallbacks, health, /status, /instances, api keys, aborts."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest

from pdserve.config import RouterConfig
from pdserve.router.app import make_app
from router_fakes import FakeWorker, serve, tokens

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def cluster(n_prefill=1, n_decode=1, health_interval=0.2, request_timeout=10, **cfg):
    ps = [await FakeWorker("prefill").start() for _ in range(n_prefill)]
    ds = [await FakeWorker("decode").start() for _ in range(n_decode)]
    app = make_app(RouterConfig(prefill=[p.url for p in ps], decode=[d.url for d in ds], **cfg),
                   health_interval=health_interval, request_timeout=request_timeout)
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as s:
            yield s, url, ps, ds
    finally:
        await runner.cleanup()
        for w in ps + ds:
            try:
                await w.stop()
            except RuntimeError:
                pass


def run(coro):
    return asyncio.run(coro)


async def until(pred, guard: float = 30.0):
    """Wait for a state the test caused (polling; `pred` may return an awaitable); the guard only
    turns a hang into a failure, it is no latency bound."""
    deadline = time.monotonic() + guard
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        assert time.monotonic() < deadline, "state never reached"
        await asyncio.sleep(0.02)


async def healthy(s, url, role) -> list[bool]:
    st = await (await s.get(url + "/status")).json()
    return [i["healthy"] for i in st[f"{role}_instances"]]


async def health_is(s, url, role, want: list[bool]) -> bool:
    return await healthy(s, url, role) == want


async def sse_events(resp) -> list:
    out = []
    async for line in resp.content:
        if line.startswith(b"data:"):
            d = line[5:].strip()
            out.append(None if d == b"[DONE]" else json.loads(d))
    return out


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
COMP_BODY = {"model": "m", "prompt": "once upon a time", "max_tokens": 5}


def test_remote_completion_not_streamed():
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            r = await s.post(url + "/v1/completions", json=COMP_BODY, headers={"X-Request-Id": "abc"})
            body = await r.json()
            assert r.status == 200, body
            assert r.headers["X-Request-Id"] == "abc"
            assert body["choices"][0]["text"] == "".join(tokens("completions", COMP_BODY, 5))
            assert body["id"] == "cmpl-abc" and "kv_transfer_params" not in body
            (pc,), (dc,) = p.calls, d.calls
            assert pc["body"]["max_tokens"] == 5 and pc["body"]["stream"] is False   # P checks the whole request
            assert pc["body"]["kv_transfer_params"]["do_remote_decode"] is True
            assert dc["body"]["kv_transfer_params"]["prefilled_by"] == p.url   # P's params handed on
            assert dc["body"]["max_tokens"] == 5
            assert pc["headers"]["X-Request-Id"] == dc["headers"]["X-Request-Id"] == "abc"
            st = await (await s.get(url + "/status")).json()
            assert st["requests"]["remote_prefill"] == 1 and st["requests"]["local_prefill"] == 0
    run(go())


def test_streamed_chat_first_token_early_and_once():
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            d.gate = asyncio.Event()   # the decode worker does not start until the first token is here
            body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
            r = await s.post(url + "/v1/chat/completions", json=body)
            assert r.status == 200
            events = []
            while not any(c and c["choices"] and c["choices"][0]["delta"].get("content") for c in events):
                # the guard fails a router that waits for the decode worker (held until we have the token)
                line = await asyncio.wait_for(r.content.readline(), 30)
                assert line, "stream ended before the first token"
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:].strip()))
            d.gate.set()
            async for line in r.content:
                if line.startswith(b"data:"):
                    d_ = line[5:].strip()
                    events.append(None if d_ == b"[DONE]" else json.loads(d_))
            assert events[-1] is None
            chunks = events[:-1]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            assert text == "".join(tokens("chat", CHAT_BODY, 5))      # the first token exactly once
            assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
            roles = [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]]
            assert roles.count("assistant") == 1
            assert chunks[-1]["usage"]["completion_tokens"] == 5
            assert p.calls[0]["body"]["stream"] is False and p.calls[0]["body"]["stream_options"] == {"include_usage": True}
    run(go())


def test_streamed_completion_text_exact():
    async def go():
        async with cluster() as (s, url, _, _):
            r = await s.post(url + "/v1/completions", json={**COMP_BODY, "stream": True})
            ev = await sse_events(r)
            assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == "".join(tokens("completions", COMP_BODY, 5))
    run(go())


def test_local_prefill_threshold():
    async def go():
        async with cluster(local_prefill_max_tokens=20) as (s, url, (p,), (d,)):
            short = {**COMP_BODY, "prompt": "short"}                 # ~2 tokens
            long = {**COMP_BODY, "prompt": "long prompt " * 20}      # ~60 tokens
            for b in (short, long, short):
                r = await s.post(url + "/v1/completions", json=b)
                assert r.status == 200
            assert len(p.calls) == 1
            assert [("kv_transfer_params" in c["body"]) for c in d.calls] == [False, True, False]
            st = await (await s.get(url + "/status")).json()
            assert st["requests"] == {"remote_prefill": 1, "local_prefill": 2,
                                      "local_prefill_reasons": {"short_prompt": 2}}
    run(go())


def test_threshold_learns_what_the_estimate_misses():
    """A chat template adds tokens the router cannot see; the workers' counts teach it."""
    async def go():
        async with cluster(local_prefill_max_tokens=20) as (s, url, (p,), (d,)):
            hi = {**CHAT_BODY, "messages": [{"role": "user", "content": "hi"}]}
            assert (await s.post(url + "/v1/chat/completions", json=hi)).status == 200
            assert len(p.calls) == 0                        # ~2 tokens by characters: local
            for _ in range(8):                              # local answers report 31 prompt tokens
                assert (await s.post(url + "/v1/chat/completions", json=hi)).status == 200
            assert len(p.calls) >= 1                        # now known to be over 20: remote
            short = {**COMP_BODY, "prompt": "short"}
            assert (await s.post(url + "/v1/completions", json=short)).status == 200
            assert "kv_transfer_params" not in d.calls[-1]["body"]   # completions learned nothing of it
    run(go())


def test_prefix_aware_counts_cached_prefix():
    """Once a decode worker has a long prompt, the same prompt again is short 'less what it caches'."""
    async def go():
        async with cluster(n_decode=2, policy="prefix_aware", local_prefill_max_tokens=8) as (s, url, (p,), ds):
            long = {**COMP_BODY, "prompt": "a shared system prompt that is long. " * 6}
            for _ in range(3):
                assert (await s.post(url + "/v1/completions", json=long)).status == 200
            assert len(p.calls) == 1                           # only the first went remote
            assert sorted(len(d.calls) for d in ds) == [0, 3]  # and all went where the prefix is
    run(go())


def test_what_goes_remote_and_what_stays_local():
    """The hand-off carries n > 1, prompt lists, echo and logprobs (issue 12): they go remote;
    only a request that is all prefill (max_tokens 0 or 1) stays on the decode worker."""
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            for extra in ({"n": 2}, {"echo": True}, {"logprobs": 2}, {"prompt": ["one prompt", "and another"]},
                          {"prompt": [[1, 2, 3]]}):
                r = await s.post(url + "/v1/completions", json={**COMP_BODY, **extra})
                assert r.status == 200
            assert len(p.calls) == 5
            for extra in ({"max_tokens": 1}, {"max_tokens": 0, "echo": True}):
                r = await s.post(url + "/v1/completions", json={**COMP_BODY, **extra})
                assert r.status == 200
            assert len(p.calls) == 5
            st = await (await s.get(url + "/status")).json()
            assert st["requests"]["local_prefill_reasons"] == {"max_tokens=1": 2}
    run(go())


def test_first_token_streamed_early_only_for_one_plain_choice():
    from pdserve.router.openai_io import early_first_token
    assert early_first_token("completions", {"prompt": "x"})
    assert early_first_token("chat", {"messages": []})
    for extra in ({"n": 2}, {"echo": True}, {"logprobs": 0}, {"prompt_logprobs": 1}, {"prompt": ["a", "b"]},
                  {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}):
        assert not early_first_token("completions", {"prompt": "x", **extra}), extra
    assert not early_first_token("chat", {"messages": [], "logprobs": True})


def test_no_prefill_worker_all_local():
    async def go():
        async with cluster(n_prefill=0) as (s, url, _, (d,)):
            for _ in range(3):
                r = await s.post(url + "/v1/chat/completions", json=CHAT_BODY)
                assert r.status == 200
            assert all("kv_transfer_params" not in c["body"] for c in d.calls)
            st = await (await s.get(url + "/status")).json()
            assert st["requests"]["local_prefill_reasons"] == {"no_prefill_worker": 3}
    run(go())


def test_prefill_failure_retried_then_local():
    async def go():
        async with cluster(n_prefill=2) as (s, url, ps, (d,)):
            ps[0].fail_status = 500
            await ps[1].stop()                               # one errors, one is gone
            for _ in range(2):
                r = await s.post(url + "/v1/completions", json=COMP_BODY)
                assert r.status == 200
                assert (await r.json())["choices"][0]["text"] == "".join(tokens("completions", COMP_BODY, 5))
            assert all("kv_transfer_params" not in c["body"] for c in d.calls)
            st = await (await s.get(url + "/status")).json()
            by_url = {i["url"]: i for i in st["prefill_instances"]}
            assert by_url[ps[1].url]["healthy"] is False and by_url[ps[1].url]["last_error"]
            assert "500" in by_url[ps[0].url]["last_error"]
            assert st["requests"]["local_prefill"] == 2
    run(go())


def test_hung_prefill_worker_given_up_when_marked_down():
    """A prefill worker that stops answering (not crashed): its health check fails within the
    check's timeout, and its pending calls go local instead of waiting for the call's timeout."""
    async def go():
        # the call's own timeout is longer than the test: only the health check can end the wait
        async with cluster(health_interval=0.2, request_timeout=600) as (s, url, (p,), (d,)):
            p.first_delay = 1e6                  # hangs on the prefill call...
            task = asyncio.create_task(s.post(url + "/v1/completions", json=COMP_BODY))
            await until(lambda: len(p.calls) == 1)
            p.unhealthy = True                   # ...and its health check starts failing
            r = await asyncio.wait_for(task, 30)
            assert r.status == 200
            assert (await r.json())["choices"][0]["text"] == "".join(tokens("completions", COMP_BODY, 5))
            st = await (await s.get(url + "/status")).json()
            assert st["requests"]["local_prefill_reasons"] == {"prefill_failed": 1}
            assert st["prefill_instances"][0]["in_flight"] == 0
    run(go())


def test_hung_decode_worker_given_up_when_marked_down():
    async def go():
        async with cluster(n_decode=2, health_interval=0.2, request_timeout=600) as (s, url, _, ds):
            ds[0].first_delay = 1e6
            task = asyncio.create_task(s.post(url + "/v1/completions", json=COMP_BODY))   # round robin: ds[0]
            await until(lambda: len(ds[0].calls) == 1)
            ds[0].unhealthy = True
            r = await asyncio.wait_for(task, 30)
            assert r.status == 200 and len(ds[1].calls) == 1
            ds[0].unhealthy = False
            await until(lambda: health_is(s, url, "decode", [True, True]))   # back up; streamed this time
            task = asyncio.create_task(s.post(url + "/v1/completions", json={**COMP_BODY, "stream": True}))
            await until(lambda: len(ds[0].calls) == 2)               # it is waiting on the hung one
            ds[0].unhealthy = True
            r = await asyncio.wait_for(task, 30)
            ev = await sse_events(r)
            assert len(ds[1].calls) == 2
            assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == "".join(tokens("completions", COMP_BODY, 5))
    run(go())


def test_decode_failure_retried_on_other_decode():
    async def go():
        async with cluster(n_decode=2) as (s, url, (p,), ds):
            await ds[0].stop()
            for stream in (False, True, False, True):
                r = await s.post(url + "/v1/completions", json={**COMP_BODY, "stream": stream})
                assert r.status == 200
                text = ((await r.json())["choices"][0]["text"] if not stream else
                        "".join(c["choices"][0]["text"] for c in (await sse_events(r))[:-1]))
                assert text == "".join(tokens("completions", COMP_BODY, 5))
            assert len(ds[1].calls) == 4
            st = await (await s.get(url + "/status")).json()
            assert [i["healthy"] for i in st["decode_instances"]] == [False, True]
    run(go())


def test_decode_dying_after_only_the_repeated_first_token_is_retried_cleanly():
    """The first decode worker sends just the (skipped) first token, then crashes: the retry on
    the other one must not lose or repeat text."""
    async def go():
        async with cluster(n_decode=2) as (s, url, _, ds):
            ds[0].die_after = 1
            want = "".join(tokens("chat", CHAT_BODY, 5))
            for _ in range(2):   # round robin: one of the two starts on the dying worker
                r = await s.post(url + "/v1/chat/completions", json={**CHAT_BODY, "stream": True})
                ev = await sse_events(r)
                assert "".join(c["choices"][0]["delta"].get("content") or "" for c in ev[:-1] if c["choices"]) == want
            assert len(ds[0].calls) >= 1 and len(ds[1].calls) == 2
    run(go())


def test_decode_dying_mid_stream_ends_with_an_error_event():
    async def go():
        async with cluster() as (s, url, _, (d,)):
            d.die_after = 3
            r = await s.post(url + "/v1/completions", json={**COMP_BODY, "stream": True})
            ev = await sse_events(r)
            assert ev[-1] is None and "error" in ev[-2] and "mid-stream" in ev[-2]["error"]["message"]
            assert "".join(c["choices"][0]["text"] for c in ev[:-2]) == "".join(tokens("completions", COMP_BODY, 3))
    run(go())


def test_all_decode_down_is_a_clear_error_and_releases_prefill():
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            d.fail_status = 500
            r = await s.post(url + "/v1/completions", json=COMP_BODY)
            assert r.status == 503
            assert "decode" in (await r.json())["error"]["message"]
            await until(lambda: p.released)
            assert p.released[0]["kv_token"] == "t"                  # P's held blocks given back
            await d.stop()
            await until(lambda: health_is(s, url, "decode", [False]))   # the health check marks it down
            r = await s.post(url + "/v1/completions", json=COMP_BODY)
            assert r.status == 503 and (await s.get(url + "/health")).status == 503
    run(go())


def test_health_marks_down_and_up():
    async def go():
        async with cluster(n_decode=2) as (s, url, _, ds):
            ds[0].unhealthy = True
            await until(lambda: health_is(s, url, "decode", [False, True]))
            for _ in range(4):
                assert (await s.post(url + "/v1/completions", json=COMP_BODY)).status == 200
            assert len(ds[0].calls) == 0 and len(ds[1].calls) == 4
            ds[0].unhealthy = False
            await until(lambda: health_is(s, url, "decode", [True, True]))
            for _ in range(4):
                assert (await s.post(url + "/v1/completions", json=COMP_BODY)).status == 200
            assert len(ds[0].calls) == 2
    run(go())


def test_instances_added_and_removed_at_run_time():
    async def go():
        async with cluster(n_prefill=0, n_decode=1) as (s, url, _, (d,)):
            p = await FakeWorker("prefill").start()
            r = await s.post(url + "/instances", json={"role": "prefill", "url": p.url.removeprefix("http://")})
            assert r.status == 200
            assert (await s.post(url + "/v1/completions", json=COMP_BODY)).status == 200
            assert len(p.calls) == 1
            r = await s.delete(url + "/instances", json={"url": p.url})
            assert r.status == 200
            assert (await s.post(url + "/v1/completions", json=COMP_BODY)).status == 200
            assert len(p.calls) == 1
            assert (await s.delete(url + "/instances", json={"url": p.url})).status == 404
            assert (await s.post(url + "/instances", json={"role": "judge", "url": "x:1"})).status == 400
            await p.stop()
    run(go())


def test_api_key_checked_and_passed_on():
    async def go():
        async with cluster(api_key="sekret") as (s, url, (p,), (d,)):
            r = await s.post(url + "/v1/completions", json=COMP_BODY)
            assert r.status == 401 and "error" in await r.json()
            r = await s.post(url + "/v1/completions", json=COMP_BODY, headers={"Authorization": "Bearer sekret"})
            assert r.status == 200
            assert p.calls[0]["headers"]["Authorization"] == d.calls[0]["headers"]["Authorization"] == "Bearer sekret"
            assert (await s.post(url + "/instances", json={"role": "decode", "url": "x:1"})).status == 401
            assert (await s.get(url + "/health")).status == 200
    run(go())


def test_client_disconnect_aborts_decode_and_releases_prefill():
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            d.token_delay = 0.2
            body = {**COMP_BODY, "max_tokens": 50, "stream": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                n = 0
                async for line in r.content:
                    n += line.startswith(b"data:")
                    if n >= 3:
                        break
            # leaving the block dropped the connection mid-stream
            await until(lambda: d.aborted)
            assert d.aborted == 1
            assert not p.released          # the decode worker had answered: it holds the KV
            # gone while waiting for the decode worker to start: P's blocks are released
            d.first_delay, d.token_delay = 1e6, 0.0
            task = asyncio.create_task(s.post(url + "/v1/completions", json={**body, "stream": False}))
            await until(lambda: len(d.calls) == 2)   # P has answered; D has not started
            task.cancel()
            await until(lambda: p.released)
            assert len(p.released) == 1
            st = await (await s.get(url + "/status")).json()
            assert [i["in_flight"] for i in st["prefill_instances"] + st["decode_instances"]] == [0, 0]
    run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_mid_prefill_still_releases_what_the_prefill_worker_holds(stream):
    """Issue 11, finding 6: the client leaves while the prefill runs; the prefill worker does
    not notice in time and holds the KV for a decode worker. The router must still release it,
    not leave it to the prefill worker's lease."""
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            p.first_delay, p.finish_abandoned = 0.5, True
            task = asyncio.create_task(s.post(url + "/v1/completions", json={**COMP_BODY, "stream": stream}))
            for _ in range(200):
                if p.calls:
                    break
                await asyncio.sleep(0.01)
            task.cancel()   # gone while the prefill worker computes
            for _ in range(200):
                if p.issued and p.released:
                    break
                await asyncio.sleep(0.05)
            assert len(p.issued) == 1
            assert [r["kv_token"] for r in p.released] == p.issued
            assert not d.calls   # nobody decoded for a client that is gone
    run(go())


def test_client_gone_while_streamed_decode_has_not_started():
    async def go():
        async with cluster() as (s, url, (p,), (d,)):
            d.first_delay = 1e6
            async with s.post(url + "/v1/completions", json={**COMP_BODY, "stream": True}) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        break          # the prefill worker's first token; then hang up
            await until(lambda: d.aborted)
            assert d.aborted == 1
            st = await (await s.get(url + "/status")).json()
            assert [i["in_flight"] for i in st["prefill_instances"] + st["decode_instances"]] == [0, 0]
    run(go())


def test_bad_json_and_worker_4xx_pass_through():
    async def go():
        async with cluster() as (s, url, (p,), _):
            r = await s.post(url + "/v1/completions", data=b"{nope", headers={"Content-Type": "application/json"})
            assert r.status == 400 and (await r.json())["error"]["code"] == 400
            p.fail_status = 400
            r = await s.post(url + "/v1/completions", json=COMP_BODY)
            assert r.status == 400 and (await r.json())["error"]["message"] == "boom"
    run(go())


def test_metrics_and_models():
    async def go():
        async with cluster() as (s, url, _, _):
            await s.post(url + "/v1/completions", json={**COMP_BODY, "stream": True})
            text = await (await s.get(url + "/metrics")).text()
            assert 'pdserve:router_requests_total{prefill="remote"} 1.0' in text
            assert "pdserve:time_to_first_token_seconds_count 1.0" in text
            assert "pdserve:router_instance_healthy" in text
            models = await (await s.get(url + "/v1/models")).json()
            assert models["data"][0]["id"] == "fake"
    run(go())


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("modules", ["pdserve.router.app, pdserve.router.cli, pdserve.launch.cluster",
                                     "pdserve.bench", "pdserve.kv.params"])
def test_router_does_not_import_torch(modules):
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cli_flags_repeatable_and_comma_separated():
    import argparse
    from pdserve.router.cli import add_arguments, config_from_args
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--prefill", "a:1,b:2", "--prefill", "http://c:3/", "--decode", "d:4",
                                         "--policy", "prefix_aware", "--local-prefill-max-tokens", "32"]))
    assert cfg.prefill == ["http://a:1", "http://b:2", "http://c:3"] and cfg.decode == ["http://d:4"]
    assert (cfg.policy, cfg.local_prefill_max_tokens) == ("prefix_aware", 32)
    with pytest.raises(SystemExit):
        p.parse_args(["--policy", "random"])
