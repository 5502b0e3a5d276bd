"""Workloads: lists of BenchRequest built from random text, ShareGPT, shared prefixes or a trace."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from pdserve.bench.text import PromptText


@dataclass
class BenchRequest:
    messages: list[dict]        # the turn's messages; a later turn is appended to its conversation
    prompt_len: int             # tokens the workload meant (the server's `usage` is what is reported)
    output_len: int             # max_tokens
    arrival: float | None = None  # seconds from the start, when a trace gives it
    conv: int | None = None     # multi-turn: turn k waits for turn k-1 and carries its reply
    turn: int = 0


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _spread(rng: random.Random, mean: int, ratio: float) -> int:
    """Uniform in [mean*(1-ratio), mean*(1+ratio)] as vLLM's --random-range-ratio."""
    lo, hi = int(mean * (1 - ratio)), int(mean * (1 + ratio))
    return max(1, rng.randint(max(1, lo), max(1, hi)))


def random_workload(n: int, input_len: int, output_len: int, range_ratio: float,
                    text: PromptText, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i, o = _spread(rng, input_len, range_ratio), _spread(rng, output_len, range_ratio)
        out.append(BenchRequest(_user(text.make(i)), i, o))
    return out


def sharegpt_workload(path: str, n: int, text: PromptText, seed: int,
                      output_len: int | None = None) -> list[BenchRequest]:
    """First human turn as the prompt, the first reply's length as max_tokens (as vLLM does)."""
    with open(path) as f:
        data = json.load(f)
    convs = [d.get("conversations") or d.get("conversation") or [] for d in data]
    convs = [c for c in convs if len(c) >= 2]
    random.Random(seed).shuffle(convs)
    out = []
    for c in convs:
        prompt, reply = c[0].get("value", ""), c[1].get("value", "")
        p_len, o_len = text.count(prompt), output_len or text.count(reply)
        # vLLM's filter: drop tiny and oversized conversations
        if p_len < 4 or o_len < 4 or p_len > 1024 or p_len + o_len > 2048:
            continue
        out.append(BenchRequest(_user(prompt), p_len, o_len))
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"{path}: no usable ShareGPT conversations")
    return out


def prefix_workload(n: int, prefix_len: int, num_prefixes: int, suffix_len: int, turns: int,
                    output_len: int, text: PromptText, seed: int) -> list[BenchRequest]:
    """Conversations that share long system prompts, each `turns` turns deep.

    Requests are ordered turn by turn across conversations so a conversation's next turn
    tends to arrive while others run; the runner holds it until the previous reply exists.
    """
    prefixes = [text.make(prefix_len) for _ in range(max(1, num_prefixes))]
    n_conv = max(1, -(-n // max(1, turns)))
    out = []
    for turn in range(turns):
        for c in range(n_conv):
            if len(out) == n:
                return out
            user = _user(text.make(suffix_len))
            msgs = [{"role": "system", "content": prefixes[c % len(prefixes)]}] + user if turn == 0 else user
            plen = prefix_len + suffix_len if turn == 0 else suffix_len
            out.append(BenchRequest(msgs, plen, output_len, conv=c, turn=turn))
    return out


def _first(d: dict, *keys):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def trace_workload(path: str, n: int | None, text: PromptText, default_output_len: int = 128,
                   time_scale: float = 1.0) -> list[BenchRequest]:
    """JSONL, one request a line: text (`prompt` or `messages`) or a length (`input_toks`, ...),
    `output_toks`/`output_len`/`max_tokens`, and an arrival time (`arrival_time_ns`, as
    LLMServingSim and `pdserve sim gen` write, or `arrival_time`/`timestamp` in seconds)."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            if "sub_requests" in d:
                raise ValueError(f"{path}:{lineno}: agentic sessions (sub_requests) are not supported by bench")
            out.append(_trace_request(d, text, default_output_len, time_scale, f"{path}:{lineno}"))
            if n and len(out) == n:
                break
    if not out:
        raise ValueError(f"{path}: empty trace")
    return out


def _trace_request(d: dict, text: PromptText, default_out: int, scale: float, where: str) -> BenchRequest:
    out_len = int(_first(d, "output_toks", "output_len", "output_length", "max_tokens") or default_out)
    ns = d.get("arrival_time_ns")
    arrival = ns / 1e9 if ns is not None else _first(d, "arrival_time", "timestamp")
    arrival = None if arrival is None else float(arrival) * scale
    if d.get("messages"):
        return BenchRequest(d["messages"], int(_first(d, "input_toks", "input_len") or 0), out_len, arrival)
    prompt = d.get("prompt")
    if prompt is None and d.get("input_tok_ids") and text.tokenizer is not None:
        prompt = text.decode(d["input_tok_ids"])  # keeps the trace's shared prefixes shared
    n_in = _first(d, "input_toks", "input_len", "input_length", "prompt_len")
    if prompt is None:
        if n_in is None:
            raise ValueError(f"{where}: needs `prompt`, `messages` or `input_toks`")
        prompt = text.make(int(n_in))
    return BenchRequest(_user(prompt), int(n_in if n_in is not None else text.count(prompt)), out_len, arrival)
