"""Step trace: one JSON line per engine step, to see where served time goes.

`--step-trace PATH` (or `PDSERVE_STEP_TRACE`) makes the engine append, for every step that ran
the model: the worker's `pid` and `role`; when the step started (`t`, monotonic seconds); how
long `step()` took (`step_s`) and the model call inside it (`model_s`); the CPU time the
stepping thread got meanwhile (`cpu_s`: well below `step_s` when other work shares its core);
the time since the previous step ended (`idle_s`: applying commands or waiting for work); and
the batch in the simulator's terms (`batch_shape`): prefill tokens, their attention pairs and
KV read, decoding sequences, their total and longest context, and rows sampled.
"""
from __future__ import annotations

import json
import os
import time
from typing import IO


def batch_shape(seqs, num_new_tokens) -> dict:
    """The scheduled batch in the simulator's step-time terms (pdserve.sim.perf): a row of one
    new token takes the model runner's decode path, any other is a prefill chunk."""
    pt = pairs = pkv = nd = dctx = dmax = ns = 0
    for s, n in zip(seqs, num_new_tokens):
        c = s.num_computed_tokens
        if n == 1:
            nd += 1
            dctx += c + 1
            dmax = max(dmax, c + 1)
        else:
            pt += n
            pairs += n * c + n * (n + 1) // 2
            pkv += c + n
        ns += c + n >= s.num_tokens
    return {"prefill_tokens": pt, "pairs": pairs, "prefill_kv": pkv, "decode_seqs": nd, "decode_ctx": dctx,
            "decode_max_ctx": dmax, "sampled": ns}


class StepTrace:
    def __init__(self, path: str, role: str = "both"):
        self._f: IO[str] = open(path, "a", buffering=1)   # whole lines: workers may share a file
        self._last_end: float | None = None
        self._head = {"pid": os.getpid(), "role": role}

    def begin(self) -> None:
        self._cpu0 = time.thread_time()

    def record(self, start: float, model_s: float, shape: dict) -> None:
        end = time.monotonic()
        line = {**self._head, "t": round(start, 6), "step_s": round(end - start, 6), "model_s": round(model_s, 6),
                "cpu_s": round(time.thread_time() - self._cpu0, 6),
                "idle_s": None if self._last_end is None else round(start - self._last_end, 6), **shape}
        self._last_end = end
        self._f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._f.close()
