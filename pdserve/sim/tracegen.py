"""`pdserve sim gen`: synthetic traces with Poisson or bursty arrivals, length distributions,
shared prefixes and agentic sessions, written in LLMServingSim's JSONL."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pdserve.sim.trace import Session, TraceRequest


@dataclass
class GenConfig:
    num_requests: int = 1000          # flat requests, or sessions when session_len > 1
    rate: float = 10.0                # arrivals per second (requests or sessions)
    burstiness: float = 1.0           # gamma shape of inter-arrival times: 1 Poisson, < 1 bursty
    input_len: int = 512
    output_len: int = 128
    len_dist: str = "lognormal"       # fixed | uniform | lognormal (heavy-tailed as chat traces)
    spread: float = 0.5               # uniform: +-spread; lognormal: sigma
    max_len: int = 8192
    prefix_groups: int = 0            # > 0: requests draw one of this many shared prefixes
    prefix_len: int = 0
    session_len: int = 1              # > 1: agentic sessions with this many calls each
    tool_ms: float = 500.0            # mean tool time between calls (exponential)
    token_ids: bool = False           # write input_tok_ids (implied by prefix_groups, sessions)
    vocab: int = 32000
    seed: int = 0


def _length(rng: random.Random, mean: int, cfg: GenConfig) -> int:
    if cfg.len_dist == "fixed":
        n = mean
    elif cfg.len_dist == "uniform":
        n = rng.uniform(mean * (1 - cfg.spread), mean * (1 + cfg.spread))
    elif cfg.len_dist == "lognormal":
        s = cfg.spread
        n = rng.lognormvariate(math.log(mean) - s * s / 2, s)  # mean-preserving
    else:
        raise ValueError(f"len_dist must be fixed, uniform or lognormal, got {cfg.len_dist!r}")
    return max(1, min(cfg.max_len, int(round(n))))


def _gap(rng: random.Random, cfg: GenConfig) -> float:
    if cfg.rate == math.inf:
        return 0.0
    # gamma with shape k and mean 1/rate: k = 1 is Poisson, smaller k bunches arrivals
    k = cfg.burstiness
    return rng.gammavariate(k, 1.0 / (cfg.rate * k))


def generate(cfg: GenConfig) -> list[Session]:
    if cfg.rate <= 0 or cfg.burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    rng = random.Random(cfg.seed)
    ids = cfg.token_ids or cfg.prefix_groups > 0 or cfg.session_len > 1
    prefixes = [[rng.randrange(cfg.vocab) for _ in range(cfg.prefix_len)] for _ in range(cfg.prefix_groups)]
    out, t = [], 0.0
    for i in range(cfg.num_requests):
        t += _gap(rng, cfg)
        context = list(rng.choice(prefixes)) if prefixes else []
        reqs = []
        for k in range(cfg.session_len):
            # each call of a session sends the whole conversation so far plus something new
            new = _length(rng, cfg.input_len if k == 0 else max(1, cfg.input_len // 4), cfg)
            context += [rng.randrange(cfg.vocab) for _ in range(new)] if ids else [0] * new
            context = context[-cfg.max_len:]
            n_out = _length(rng, cfg.output_len, cfg)
            tool = rng.expovariate(1000.0 / cfg.tool_ms) if k < cfg.session_len - 1 and cfg.tool_ms > 0 else 0.0
            reqs.append(TraceRequest(len(context), n_out, list(context) if ids else None, tool))
            if ids:  # the model's answer becomes part of the next call's prompt
                context += [rng.randrange(cfg.vocab) for _ in range(n_out)]
        sid = f"session-{i}" if cfg.session_len > 1 else None
        out.append(Session(t, reqs, sid))
    return out
