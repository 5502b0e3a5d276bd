"""Request traces in LLMServingSim's JSONL: flat requests and agentic sessions.

Flat:    {"input_toks", "output_toks", "arrival_time_ns", ["input_tok_ids"]}
Session: {"session_id", "arrival_time_ns", "sub_requests": [{"input_toks", "output_toks",
          "tool_duration_ns", ["input_tok_ids"]}, ...]}: each sub-request is sent when the
          previous one has finished and its tool has run for tool_duration_ns.
A flat request is held as a session of one, so the simulator has a single path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class TraceRequest:
    input_toks: int
    output_toks: int
    input_tok_ids: list[int] | None = None
    tool_duration: float = 0.0     # seconds the tool runs after this call, before the next


@dataclass(slots=True)
class Session:
    arrival: float                 # seconds
    requests: list[TraceRequest]
    session_id: str | None = None  # None: a flat request
    extra: dict = field(default_factory=dict)


def _request(d: dict, where: str) -> TraceRequest:
    for k in ("input_toks", "output_toks"):
        if k not in d:
            raise ValueError(f"{where}: missing required field {k!r}")
    ids = d.get("input_tok_ids")
    n_in, n_out = int(d["input_toks"]), int(d["output_toks"])
    if n_in < 1 or n_out < 1:
        raise ValueError(f"{where}: input_toks and output_toks must be at least 1")
    if ids is not None and len(ids) != n_in:
        raise ValueError(f"{where}: input_tok_ids has {len(ids)} ids but input_toks is {n_in}")
    return TraceRequest(n_in, n_out, ids, float(d.get("tool_duration_ns", 0)) * 1e-9)


def parse_line(d: dict, where: str) -> Session:
    if "arrival_time_ns" not in d:
        raise ValueError(f"{where}: missing required field 'arrival_time_ns'")
    arrival = float(d["arrival_time_ns"]) * 1e-9
    if "sub_requests" in d:
        subs = [_request(s, f"{where}.sub_requests[{i}]") for i, s in enumerate(d["sub_requests"])]
        if not subs:
            raise ValueError(f"{where}: a session needs at least one sub-request")
        return Session(arrival, subs, str(d.get("session_id", where)))
    return Session(arrival, [_request(d, where)])


def read_trace(path: str | Path, limit: int | None = None) -> list[Session]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
                out.append(parse_line(d, f"{path}:{n}"))
    out.sort(key=lambda s: s.arrival)
    return out


def _request_json(r: TraceRequest, in_session: bool) -> dict:
    d = {"input_toks": r.input_toks, "output_toks": r.output_toks}
    if in_session:
        d["tool_duration_ns"] = int(round(r.tool_duration * 1e9))
    if r.input_tok_ids is not None:
        d["input_tok_ids"] = r.input_tok_ids
    return d


def write_trace(path: str | Path, sessions: list[Session]) -> None:
    with open(path, "w") as f:
        for s in sessions:
            ns = int(round(s.arrival * 1e9))
            if s.session_id is None:
                d = {**_request_json(s.requests[0], False), "arrival_time_ns": ns}
            else:
                d = {"session_id": s.session_id, "arrival_time_ns": ns,
                     "sub_requests": [_request_json(r, True) for r in s.requests]}
            f.write(json.dumps(d) + "\n")


def time_scaled(sessions: list[Session], factor: float) -> list[Session]:
    """The same requests arriving `factor` times as fast (the planner's rate search)."""
    return [Session(s.arrival / factor, s.requests, s.session_id) for s in sessions]
