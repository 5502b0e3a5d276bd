"""PNG plots of one run or of several runs overlaid (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import os

import numpy as np

from pdserve.bench.metrics import RequestRecord, throughput_series


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _cdf(ax, values_s: list[float], label: str):
    if not values_s:
        return
    x = np.sort(np.asarray(values_s)) * 1e3
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=f"{label} (n={len(x)})")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _slo_line(ax, slo_ms: float | None, name: str, vertical: bool = True):
    """The SLO the run was judged by, as a labelled dashed line."""
    if slo_ms is None:
        return
    line = ax.axvline if vertical else ax.axhline
    line(slo_ms, color="crimson", linestyle="--", linewidth=1.2, label=f"SLO {name} {slo_ms:g} ms")


def cdf_plot(runs: dict[str, list[RequestRecord]], metric: str, path: str, title: str = "",
             slo: dict[str, float] | None = None) -> str:
    """Overlaid CDFs of `ttft`, `itl`, `tpot` or `e2el` (ms) for each labelled run; the metric's
    SLO (`slo["ttft_ms"]` etc., as parse_slo gives them) marked where one was given."""
    fig, ax = _plt().subplots(figsize=(6.4, 4.2))
    draw_cdf(ax, runs, metric, title, slo)
    return _save(fig, path)


def draw_cdf(ax, runs: dict[str, list[RequestRecord]], metric: str, title: str = "",
             slo: dict[str, float] | None = None) -> None:
    for label, recs in runs.items():
        ok = [r for r in recs if r.success]
        if metric == "itl":
            vals = [g for r in ok for g in r.itl]
        else:
            vals = [v for v in (getattr(r, metric) for r in ok) if v is not None]
        _cdf(ax, vals, label)
    _slo_line(ax, (slo or {}).get(f"{metric}_ms"), metric.upper())
    ax.set_xlabel(f"{metric.upper()} (ms)")
    ax.set_ylabel("fraction of " + ("gaps" if metric == "itl" else "requests"))
    ax.set_title(title or f"{metric.upper()} CDF")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def itl_over_time(runs: dict[str, list[RequestRecord]], path: str, slo: dict[str, float] | None = None) -> str:
    """Every gap at the time it ended: spikes show decodes stalled behind prefills."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, recs in runs.items():
        t = [ct for r in recs if r.success for ct in r.chunk_times[1:]]
        g = [gap * 1e3 for r in recs if r.success for gap in r.itl]
        ax.scatter(t, g, s=4, alpha=0.5, label=label)
    _slo_line(ax, (slo or {}).get("itl_ms"), "ITL", vertical=False)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("inter-token gap (ms)")
    ax.set_yscale("log")
    ax.set_title("ITL over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=3)
    return _save(fig, path)


def throughput_over_time(runs: dict[str, list[RequestRecord]], path: str) -> str:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
    for label, recs in runs.items():
        t, tok, req = throughput_series(recs)
        a1.step(t, tok, where="post", label=label)
        a2.step(t, req, where="post", label=label)
    a1.set_ylabel("output tokens/s")
    a2.set_ylabel("completed requests/s")
    a2.set_xlabel("time since start (s)")
    a1.set_title("Throughput over time (1 s bins)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_runs(runs: dict[str, list[RequestRecord]], out_dir: str, prefix: str = "",
              slo: dict[str, float] | None = None) -> list[str]:
    """TTFT, ITL and TPOT CDFs (each with its SLO where given), ITL and throughput over time."""
    os.makedirs(out_dir, exist_ok=True)
    p = lambda name: os.path.join(out_dir, prefix + name)  # noqa: E731
    return [cdf_plot(runs, "ttft", p("ttft_cdf.png"), slo=slo), cdf_plot(runs, "itl", p("itl_cdf.png"), slo=slo),
            cdf_plot(runs, "tpot", p("tpot_cdf.png"), slo=slo), itl_over_time(runs, p("itl_over_time.png"), slo),
            throughput_over_time(runs, p("throughput_over_time.png"))]


def metric_vs_rate(series: dict[str, dict[float, float]], ylabel: str, path: str, title: str) -> str:
    """One line per deployment: `series[label][rate] = value`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, by_rate in series.items():
        rates = sorted(by_rate)
        ax.plot(rates, [by_rate[r] for r in rates], marker="o", label=label)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
