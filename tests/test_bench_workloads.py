"""Workloads, arrival schedules, concurrency and multi-turn conversations against a real HTTP server."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pdserve.bench.runner import RunConfig, arrival_times, run
from pdserve.bench.text import PromptText, load_tokenizer
from pdserve.bench import workloads
from bench_fake_server import SteppedClock


def echo(n: int, out: int = 2, **kw) -> list[workloads.BenchRequest]:
    return [workloads.BenchRequest([{"role": "user", "content": "echo"}], 1, out, **kw) for _ in range(n)]


@pytest.mark.slow  # starts a process
def test_bench_imports_no_torch():
    import subprocess
    code = ("import sys, pdserve.bench.cli, pdserve.bench.compare, pdserve.bench.plots;"
            "assert 'torch' not in sys.modules, 'bench pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_lengths_spread():
    text = PromptText(None, seed=1)
    reqs = workloads.random_workload(200, 100, 20, 0.5, text, seed=1)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() >= 50 and ins.max() <= 150 and ins.std() > 15  # uniform on [50, 150]
    assert outs.min() >= 10 and outs.max() <= 30
    assert len({r.messages[0]["content"] for r in reqs}) == 200  # no two prompts alike


@pytest.mark.slow  # the default model's tokenizer
def test_random_prompts_have_their_token_counts():
    reqs = workloads.random_workload(20, 100, 20, 0.5, PromptText(None, seed=1), seed=1)
    tok = load_tokenizer(None, None)
    if tok is None:
        pytest.skip("default model's tokenizer not in the cache")
    for r in reqs:  # the prompts really are about that many tokens
        n = len(tok.encode(r.messages[0]["content"], add_special_tokens=False).ids)
        assert abs(n - r.prompt_len) <= 2


def test_poisson_and_burstiness_arrivals():
    reqs = echo(4000)
    t = np.array(arrival_times(reqs, 20.0, 1.0, seed=3))
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    bursty = np.diff(arrival_times(reqs, 20.0, 0.25, seed=3))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.15)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)  # gamma(k): CV 1/sqrt(k)
    assert arrival_times(reqs[:3], None, 1.0, 0) == [0.0, 0.0, 0.0]
    assert arrival_times(reqs[:3], float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_request_rate_paces_the_sends(bench_server):
    _, url = bench_server
    reqs = echo(12)
    clock = SteppedClock()  # virtual time: each start is exactly when the runner chose to send
    records, duration, _ = run(reqs, RunConfig(url, request_rate=8.0, seed=5, progress=False, num_warmups=0,
                                               clock=clock, sleep=clock.sleep))
    planned = arrival_times(reqs, 8.0, 1.0, 5)
    assert planned[-1] > 0.5  # a schedule, not all at once
    for r, t in zip(records, planned):
        assert r.success and r.start == pytest.approx(t)


def test_max_concurrency_is_respected(bench_server):
    srv, url = bench_server
    srv.max_in_flight = 0
    srv.hold_until_in_flight = 3  # the first streams wait for the third: overlap does not rest on timing
    try:
        records, _, _ = run(echo(12, out=5), RunConfig(url, max_concurrency=3, progress=False, num_warmups=0))
    finally:
        srv.hold_until_in_flight = 0
    assert all(r.success for r in records)
    assert srv.max_in_flight == 3


def test_trace_with_llmservingsim_fields(bench_server, tmp_path):
    srv, url = bench_server
    path = tmp_path / "trace.jsonl"
    rows = [{"input_toks": 30, "output_toks": 3, "arrival_time_ns": 2_000_000_000},
            {"input_toks": 60, "output_toks": 4, "arrival_time_ns": 2_300_000_000},
            {"prompt": "echo hello", "max_tokens": 2, "arrival_time": 2.6}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = workloads.trace_workload(str(path), None, PromptText(None, 0))
    assert [r.output_len for r in reqs] == [3, 4, 2]
    assert [r.prompt_len for r in reqs[:2]] == [30, 60]
    n0 = len(srv.received)
    clock = SteppedClock()
    records, _, _ = run(reqs, RunConfig(url, progress=False, num_warmups=0, clock=clock, sleep=clock.sleep))
    starts = [r.start for r in records]
    assert starts[1] - starts[0] == pytest.approx(0.3)  # the trace's own gaps
    assert starts[2] - starts[0] == pytest.approx(0.6)
    assert sorted(b["max_tokens"] for b in srv.received[n0:]) == [2, 3, 4]


def test_prefix_multiturn_carries_history(bench_server):
    srv, url = bench_server
    reqs = workloads.prefix_workload(6, prefix_len=40, num_prefixes=2, suffix_len=5, turns=3,
                                     output_len=2, text=PromptText(None, 0), seed=0)
    assert [(r.conv, r.turn) for r in reqs] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    # the fake server streams a default script for any prompt not naming one
    n0 = len(srv.received)
    records, _, _ = run(reqs, RunConfig(url, endpoint="/v1/chat/completions", progress=False, num_warmups=0))
    assert all(r.success for r in records)
    sent = srv.received[n0:]
    by_conv = {}
    for body in sent:
        by_conv.setdefault(body["messages"][0]["content"], []).append(body["messages"])
    assert len(by_conv) == 2  # two conversations, each opened by its own shared prefix
    for convs in by_conv.values():
        convs.sort(key=len)
        assert [len(m) for m in convs] == [2, 4, 6]  # system+user, +assistant+user, ...
        for earlier, later in zip(convs, convs[1:]):
            assert later[: len(earlier)] == earlier
            assert later[len(earlier)]["role"] == "assistant"
            assert later[len(earlier)]["content"] == " t0 t1 t2 t3"  # the real reply to the earlier turn


def test_sharegpt_first_turns(tmp_path):
    data = [{"id": str(i), "conversations": [{"from": "human", "value": "question " * (10 + i)},
                                             {"from": "gpt", "value": "answer " * (20 + i)}]} for i in range(5)]
    data.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}]})
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = workloads.sharegpt_workload(str(path), 10, PromptText(None, 0), seed=0)
    assert len(reqs) == 5
    assert all(r.messages[0]["content"].startswith("question") for r in reqs)
    assert all(r.output_len >= 20 for r in reqs)  # the reply's length sets max_tokens
    assert workloads.sharegpt_workload(str(path), 10, PromptText(None, 0), 0, output_len=7)[0].output_len == 7


def test_warmup_is_untimed_and_cannot_prime_the_prefix_cache(bench_server):
    srv, url = bench_server
    n0 = len(srv.received)
    records, _, _ = run(echo(2), RunConfig(url, progress=False, num_warmups=1))
    sent = [b["prompt"] for b in srv.received[n0:]]
    assert len(sent) == 3 and len(records) == 2
    assert sent[0].startswith("warm-up 0:")  # a different first token: no cached blocks to share
    assert not any(p.startswith("warm-up") for p in sent[1:])
