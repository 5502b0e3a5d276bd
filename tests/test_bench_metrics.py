"""Bench metrics against a real HTTP server that streams with scripted delays.

Expected values are computed here from the scripted delays (tests/bench_fake_server.py),
not from the code under test. The delays are virtual time: the server moves a LockstepClock that
the client under test reads as its clock, so every measurement is exact and a busy machine
cannot change it (requests go one at a time for that; the workload tests cover concurrency).
"""
from __future__ import annotations


import numpy as np
import pytest

from pdserve.bench.metrics import parse_slo, summarize
from pdserve.bench.runner import RunConfig, run
from pdserve.bench.workloads import BenchRequest
from bench_fake_server import SCRIPTS, LockstepClock
from helpers import free_port


@pytest.fixture
def clock(bench_server):
    srv, _ = bench_server
    srv.clock = LockstepClock()
    yield srv.clock
    srv.clock = None


def req(key: str, max_tokens: int = 16) -> BenchRequest:
    return BenchRequest([{"role": "user", "content": key}], 1, max_tokens)


def bench(url, requests, clock, endpoint="/v1/completions", **kw):
    cfg = RunConfig(base_url=url, endpoint=endpoint, progress=False, num_warmups=0, max_concurrency=1,
                    clock=clock, **kw)
    return run(requests, cfg)


def expected(name: str) -> dict:
    """TTFT, ITL gaps, E2E and TPOT as the definitions give them for a script."""
    delays, usage = SCRIPTS[name]
    n_out = usage if usage is not None else len(delays)  # no usage: one token per chunk
    ttft, e2e = delays[0], sum(delays)
    return {"ttft": ttft, "itl": delays[1:], "e2e": e2e, "tpot": (e2e - ttft) / (n_out - 1), "n_out": n_out}


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_per_request_metrics_match_the_script(bench_server, clock, endpoint):
    srv, url = bench_server
    names = list(SCRIPTS)
    records, _, model = bench(url, [req(n) for n in names], clock, endpoint=endpoint)
    assert model == "fake-model"
    for name, r in zip(names, records):
        e = expected(name)
        assert r.success, (name, r.error)
        assert r.output_tokens == e["n_out"], name
        # approx: float rounding of the virtual clock's sums only
        assert r.ttft == pytest.approx(e["ttft"]), name
        assert r.itl == pytest.approx(e["itl"]), name  # the chat role-only chunk is not a token
        assert r.e2el == pytest.approx(e["e2e"]), name
        assert r.tpot == pytest.approx(e["tpot"]), name
        assert r.prompt_len == (7 if SCRIPTS[name][1] else 1)  # server usage where given, else the estimate
    body = srv.received[-1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert ("messages" in body) == endpoint.endswith("chat/completions")


def test_summary_percentiles_and_throughput(bench_server, clock):
    _, url = bench_server
    names = list(SCRIPTS)
    records, duration, _ = bench(url, [req(n) for n in names], clock)
    s = summarize(records, duration, percentiles=(50, 90, 99))
    exp = [expected(n) for n in names]
    gaps = [g for e in exp for g in e["itl"]]
    assert s["completed"] == len(names) and s["failed"] == 0
    assert s["mean_ttft_ms"] == pytest.approx(1e3 * np.mean([e["ttft"] for e in exp]))
    assert s["median_itl_ms"] == pytest.approx(1e3 * np.median(gaps))
    assert s["p99_itl_ms"] == pytest.approx(1e3 * np.percentile(gaps, 99))
    assert s["p90_e2el_ms"] == pytest.approx(1e3 * np.percentile([e["e2e"] for e in exp], 90))
    # one after another: the run lasts as long as all requests together
    assert duration == pytest.approx(sum(e["e2e"] for e in exp))
    assert s["total_output_tokens"] == sum(e["n_out"] for e in exp)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / duration)
    assert s["request_throughput"] == pytest.approx(len(names) / duration)


def test_goodput_counts_only_requests_meeting_every_slo(bench_server, clock):
    _, url = bench_server
    names = list(SCRIPTS) + ["http500"]
    records, duration, _ = bench(url, [req(n) for n in names], clock)
    # by hand from the scripts: slow_first breaks TTFT (300 > 200 ms), stall breaks TPOT
    # ((0.25+0.02+0.02)/3 = 97 > 50 ms); fast, no_usage, multi_token_chunks meet both; a failure never counts
    s = summarize(records, duration, parse_slo(["ttft_ms=200", "tpot_ms=50"]))
    assert s["good_requests"] == 3
    assert s["request_goodput"] == pytest.approx(3 / duration)
    assert s["slo_attainment"] == pytest.approx(3 / len(names))
    # one SLO at a time: each alone rejects exactly its violator
    assert summarize(records, duration, parse_slo(["ttft_ms=200"]))["good_requests"] == 4
    assert summarize(records, duration, parse_slo(["tpot:50"]))["good_requests"] == 4
    # ITL applies to every gap: stall's 250 ms gap breaks 150 ms; others' gaps are <= 40 ms
    assert summarize(records, duration, parse_slo(["itl_ms=150"]))["good_requests"] == 4
    # E2E: slow_first 340 ms and stall 340 ms exceed 300; fast 190, no_usage 90, multi 130 do not
    assert summarize(records, duration, parse_slo(["e2e_ms=300"]))["good_requests"] == 3


def test_bad_slo_is_refused():
    with pytest.raises(ValueError):
        parse_slo(["ttfx_ms=3"])
    with pytest.raises(ValueError):
        parse_slo(["ttft_ms=-1"])


def test_failures_are_counted_with_their_messages(bench_server, clock):
    _, url = bench_server
    names = ["http500", "http400", "drop", "fast"]
    records, duration, _ = bench(url, [req(n) for n in names], clock)
    by = dict(zip(names, records))
    assert by["http500"].status == 500 and "engine exploded" in by["http500"].error
    assert by["http400"].status == 400 and "max_tokens too large" in by["http400"].error
    assert not by["drop"].success and by["drop"].error  # mid-stream drop after two tokens
    assert by["fast"].success
    s = summarize(records, duration)
    assert s["failed"] == 3 and s["completed"] == 1
    assert sum(s["error_counts"].values()) == 3
    assert any("engine exploded" in m for m in s["error_counts"])
    # failed requests stay out of the latency statistics
    assert s["mean_ttft_ms"] == pytest.approx(1e3 * expected("fast")["ttft"])


def test_connection_refused_is_a_counted_failure():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    records, duration, _ = bench(url, [req("fast"), req("fast")], LockstepClock(), model="m")
    s = summarize(records, duration, parse_slo(["ttft_ms=1000"]))
    assert s["failed"] == 2 and s["good_requests"] == 0
    assert all("connect" in r.error.lower() for r in records)
