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

from pdserve.engine.core import StepShape


def batch_shape(seqs, num_new_tokens) -> dict:
    """The scheduled batch in the simulator's step-time terms (engine.core.StepShape)."""
    return StepShape.of(seqs, num_new_tokens).to_dict()


class StepTrace:
    def __init__(self, path: str, role: str = "both"):
        self._f: IO[str] = open(path, "a", buffering=1)   # whole lines: workers may share a file
        self._last_end: float | None = None
        self._head = {"pid": os.getpid(), "role": role}

    def begin(self) -> None:
        self._cpu0 = time.thread_time()

    def record(self, start: float, model_s: float, shape: StepShape) -> None:
        end = time.monotonic()
        line = {**self._head, "t": round(start, 6), "step_s": round(end - start, 6), "model_s": round(model_s, 6),
                "cpu_s": round(time.thread_time() - self._cpu0, 6),
                "idle_s": None if self._last_end is None else round(start - self._last_end, 6), **shape.to_dict()}
        self._last_end = end
        self._f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._f.close()
