"""What the router's stream merging relies on from the engine: each streamed output keeps its
own delta. Outputs cross from the engine thread to the event loop, so one produced after it
must not change one already handed out (it did: every output shared one CompletionOutput, and
a decode worker's stream repeated the second token instead of the loaded first one)."""
import pytest

from pdserve import SamplingParams
from pdserve.llm import LLM

pytestmark = pytest.mark.slow


def test_outputs_are_snapshots(default_model_dir):
    eng = LLM(default_model_dir, kv_cache_memory="64MiB", dtype="float32", device="cpu").engine
    eng.add_request("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0), "r")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()   # nobody reads them until the end, as a slow consumer would
    final = outs[-1].outputs[0]
    assert len(outs) == 8
    assert "".join(o.outputs[0].new_text for o in outs) == final.text
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == final.token_ids
