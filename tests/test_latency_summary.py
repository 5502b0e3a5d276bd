"""`pdserve bench` and `pdserve sim` summarise requests with one module: the same requests give
the same summary under the same keys (vLLM's `bench serve` names), and one parse_slo (issue 13)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

import pdserve
from pdserve.bench.metrics import RequestRecord as Measured, parse_slo, summarize
from pdserve.sim.metrics import Collector, format_summary
from pdserve.sim.simulator import SimRecord as Simulated
from pdserve.sim.trace import Session, TraceRequest

# (arrival, token times) in seconds; the third's gaps are even, the first has one long gap
REQUESTS = [(0.0, [0.20, 0.25, 0.60, 0.65]), (0.1, [0.22, 0.27, 0.32]), (0.3, [0.9, 0.94, 0.98, 1.02, 1.06]),
            (0.4, [0.5])]
FAILED_AT = 0.45


def measured() -> list[Measured]:
    out = []
    for i, (a, t) in enumerate(REQUESTS):
        out.append(Measured(i, 10 + i, len(t), start=a, ttft=t[0] - a, itl=list(np.diff(t)),
                            chunk_times=list(t), e2el=t[-1] - a, output_tokens=len(t), success=True))
    out.append(Measured(len(out), 5, 4, start=FAILED_AT, error="boom", success=False))
    return out


def simulated(slo) -> dict:
    col = Collector(slo=slo)
    for i, (a, t) in enumerate(REQUESTS):
        s = Session(a, [TraceRequest(10 + i, len(t))])
        rec = Simulated(f"r{i}", s, 0, 10 + i, len(t), a, first_scheduled=a, token_times=list(t), end=t[-1])
        col.add(rec)
    failed = Simulated("rf", Session(FAILED_AT, [TraceRequest(5, 4)]), 0, 5, 4, FAILED_AT, end=FAILED_AT,
                       error="boom")
    col.add(failed)
    return col.summary()


@pytest.mark.parametrize("slo_args", [None, ["ttft_ms=150", "itl_ms=100"], ["tpot:60"], ["e2e_ms=700"]])
def test_bench_and_sim_summaries_agree(slo_args):
    slo = parse_slo(slo_args)
    sim = simulated(slo)
    duration = max(t[-1] for _, t in REQUESTS) - REQUESTS[0][0]
    bench = summarize(measured(), duration, slo)
    shared = set(bench) - {"max_output_tokens_per_s"}   # a wall-clock measure: bench only
    assert shared <= set(sim), shared - set(sim)
    for k in shared:
        assert sim[k] == (pytest.approx(bench[k]) if isinstance(bench[k], float) else bench[k]), k
    if slo_args and slo_args[0] == "ttft_ms=150":
        assert sim["good_requests"] == 2   # r0 has a 350 ms gap; r2's first token took 600 ms
    assert "Simulation Result" in format_summary(sim) and "queueing delay" in format_summary(sim)


def test_parse_slo_defined_once():
    pkg = pathlib.Path(pdserve.__file__).parent
    defs = [p for p in pkg.rglob("*.py") if "def parse_slo(" in p.read_text()]
    assert [p.relative_to(pkg).as_posix() for p in defs] == ["bench/metrics.py"]
