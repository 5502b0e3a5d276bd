"""--step-trace: one line per step, batch shapes as the simulator counts them, times that add up."""
import json

import pytest

from pdserve import SamplingParams
from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.step_trace import batch_shape


class _Seq:
    def __init__(self, computed, total):
        self.num_computed_tokens, self.num_tokens = computed, total


def test_batch_shape_counts_like_the_simulator():
    # a whole 10-token prompt, the middle chunk of a 100-token one, two decodes at 20 and 31 tokens
    seqs = [_Seq(0, 10), _Seq(32, 100), _Seq(19, 20), _Seq(30, 31)]
    shape = batch_shape(seqs, [10, 32, 1, 1])
    assert shape == {"prefill_tokens": 42, "pairs": 10 * 11 // 2 + 32 * 32 + 32 * 33 // 2,
                     "prefill_kv": 10 + 64, "decode_seqs": 2, "decode_ctx": 20 + 31, "decode_max_ctx": 31,
                     "sampled": 3}


@pytest.mark.slow  # loads the default model
def test_engine_writes_one_line_per_step(default_model_dir, tmp_path):
    path = tmp_path / "steps.jsonl"
    eng = LLMEngine(EngineConfig(model=default_model_dir, kv_cache_memory="64MiB", step_trace=str(path),
                                 max_num_batched_tokens=32))
    eng.add_request([1] * 40, SamplingParams(max_tokens=3, ignore_eos=True), "a")
    eng.add_request([2] * 5, SamplingParams(max_tokens=3, ignore_eos=True), "b")
    while eng.has_unfinished():
        eng.step()
    eng.step_trace.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    # step 1: 32 of a's 40 prompt tokens; 2: a's last 8 + b's 5 (both sample); then decodes of both
    assert [(x["prefill_tokens"], x["decode_seqs"], x["sampled"]) for x in lines] == \
        [(32, 0, 0), (13, 0, 2), (0, 2, 2), (0, 2, 2)]
    assert [x["decode_ctx"] for x in lines[2:]] == [41 + 6, 42 + 7]
    assert lines[0]["idle_s"] is None and all(x["idle_s"] >= 0 for x in lines[1:])
    assert all(0 < x["model_s"] <= x["step_s"] for x in lines)
    assert all(0 < x["cpu_s"] <= x["step_s"] * 4 for x in lines)   # torch may use several threads
    assert all(b["t"] >= a["t"] + a["step_s"] for a, b in zip(lines, lines[1:]))
    assert {x["role"] for x in lines} == {"both"}
