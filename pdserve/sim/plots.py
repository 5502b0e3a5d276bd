"""PNG plots of a simulation run (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(sim, summary: dict, path: str) -> None:
    """Left: KV + weights memory per instance over time (seed 003's npu_mem); right: latency CDFs."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if sim.mem_history:
        t = [h[0] for h in sim.mem_history]
        mem = np.array([h[1] for h in sim.mem_history]) / 1e9
        for j, inst in enumerate(sim.instances[:16]):
            ax1.plot(t, mem[:, j], label=f"{inst.name} ({inst.role})")
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no log lines (--log-interval 0)", ha="center", transform=ax1.transAxes)
    ax1.set(xlabel="simulated time (s)", ylabel="npu_mem used (GB)", title="memory per instance")
    col = sim.collector
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL")):
        a = np.sort(np.frombuffer(getattr(col, name), dtype=np.float64) * 1e3)
        if a.size:
            ax2.plot(a, np.arange(1, a.size + 1) / a.size, label=label)
    ax2.set(xscale="log", xlabel="ms", ylabel="fraction of requests (ITL: of gaps)", title="latency CDF")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
