"""The bench plots mark the SLOs they were given (Agg backend, no display)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from pdserve.bench import plots  # noqa: E402
from pdserve.bench.metrics import RequestRecord, parse_slo  # noqa: E402


def records() -> list[RequestRecord]:
    """Five requests with known latencies: TTFT 100..500 ms, gaps 20 ms, 5 tokens each."""
    out = []
    for i in range(5):
        ttft = 0.1 * (i + 1)
        out.append(RequestRecord(i, 10, 5, start=i, ttft=ttft, itl=[0.02] * 4, e2el=ttft + 0.08,
                                 chunk_times=[i + ttft + 0.02 * k for k in range(5)], output_tokens=5, success=True))
    return out


def slo_lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_label().startswith("SLO")]


@pytest.mark.parametrize("metric,key,want", [("ttft", "ttft_ms", 250.0), ("tpot", "tpot_ms", 30.0),
                                             ("itl", "itl_ms", 25.0)])
def test_cdf_marks_its_slo(metric, key, want):
    slo = parse_slo(["ttft_ms=250", "tpot_ms=30", "itl_ms=25"])
    fig, ax = plt.subplots()
    plots.draw_cdf(ax, {"run": records()}, metric, slo=slo)
    (line,) = slo_lines(ax)
    assert list(line.get_xdata()) == [want, want]                 # vertical, at the SLO
    assert line.get_label() == f"SLO {metric.upper()} {want:g} ms"
    assert line.get_label() in [t.get_text() for t in ax.get_legend().get_texts()]
    lo, hi = ax.get_xlim()
    assert lo <= want <= hi
    plt.close(fig)


def test_an_slo_beyond_the_data_is_still_in_view():
    fig, ax = plt.subplots()
    plots.draw_cdf(ax, {"run": records()}, "ttft", slo={"ttft_ms": 2000.0})   # data end at 500 ms
    assert ax.get_xlim()[1] >= 2000.0
    plt.close(fig)


def test_no_slo_no_line():
    fig, ax = plt.subplots()
    plots.draw_cdf(ax, {"run": records()}, "ttft", slo=parse_slo(["tpot_ms=30"]))   # only another metric's
    assert slo_lines(ax) == []
    plt.close(fig)


def test_plot_runs_writes_the_slo_plots(tmp_path):
    paths = plots.plot_runs({"a": records()}, str(tmp_path), slo=parse_slo(["ttft_ms=250", "tpot_ms=30"]))
    names = [p.rsplit("/", 1)[1] for p in paths]
    assert names[:3] == ["ttft_cdf.png", "itl_cdf.png", "tpot_cdf.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
