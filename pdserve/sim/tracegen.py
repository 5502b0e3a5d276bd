"""`pdserve sim gen`: synthetic traces with Poisson or bursty arrivals, length distributions,
shared prefixes and agentic sessions, written in LLMServingSim's JSONL."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from pdserve.sim.trace import Session, TraceRequest


def _f(default, help: str):
    """A field whose help text is also its `pdserve sim gen` flag's."""
    return field(default=default, metadata={"help": help})


@dataclass
class GenConfig:
    num_requests: int = _f(1000, "flat requests, or sessions when --session-len > 1")
    rate: float = _f(10.0, "arrivals per second (requests or sessions)")
    burstiness: float = _f(1.0, "gamma shape of the gaps between arrivals: 1 Poisson, < 1 bursty, > 1 even")
    input_len: int = _f(512, "mean prompt tokens (of a session's first call)")
    output_len: int = _f(128, "mean output tokens")
    len_dist: str = _f("lognormal", "fixed | uniform | lognormal (heavy-tailed as chat traces)")
    spread: float = _f(0.5, "uniform: lengths in mean x (1 +- spread); lognormal: sigma")
    max_len: int = _f(8192, "cap on any prompt or output length")
    prefix_groups: int = _f(0, "> 0: each request starts with one of this many shared prefixes")
    prefix_len: int = _f(0, "tokens of each shared prefix")
    session_len: int = _f(1, "> 1: agentic sessions with this many calls each, each resending the conversation")
    tool_ms: float = _f(500.0, "mean tool time between a session's calls, in ms (exponential)")
    token_ids: bool = _f(False, "write input_tok_ids (implied by --prefix-groups and sessions)")
    vocab: int = _f(32000, "token ids are drawn below this")
    seed: int = _f(0, "random seed")


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
