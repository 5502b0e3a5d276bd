"""Structured output in the engine with the default model: outputs validate against their JSON
schemas (the jsonschema package), match their regex / choice (Python's re), and unconstrained
requests batched beside constrained ones get exactly the tokens they get alone (greedy)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from pdserve.errors import RequestError
from pdserve.engine.request import SamplingParams, StructuredOutputsParams as SO
from pdserve.llm import LLM

from json_schemas import SCHEMAS

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def llm(default_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # two shared cores: one BLAS thread each is much faster than contention
    try:
        yield LLM(default_model_dir, kv_cache_memory="64MiB", max_model_len=1024)
    finally:
        torch.set_num_threads(threads)


def chat(llm, text: str) -> dict:
    return {"prompt_token_ids": llm.engine.chat_prompt_ids([{"role": "user", "content": text}])}


def test_json_schemas_validate(llm):
    prompts = [chat(llm, f"Give me a {name} as JSON.") for name in SCHEMAS]
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=SO(json=s, disable_any_whitespace=True))
              for s in SCHEMAS.values()]
    for out, schema in zip(llm.generate(prompts, params, use_tqdm=False), SCHEMAS.values()):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)


def test_sampled_json_validates(llm):
    """Temperature sampling explores tokens greedy never picks: the mask must hold for them too."""
    schema = SCHEMAS["person"]
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=60, structured_outputs=SO(json=schema))
    (out,) = llm.generate([chat(llm, "A person as JSON, please.")], params, use_tqdm=False)
    for o in out.outputs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)


def test_batched_beside_unconstrained(llm):
    free = [chat(llm, "Write a short poem about the sea."), chat(llm, "What is the capital of France?")]
    p_free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate(p, p_free, use_tqdm=False)[0].outputs[0].token_ids for p in free]
    regex = r"[0-9]{3}-[0-9]{4}"
    constrained = [(chat(llm, "A phone number:"), SamplingParams(temperature=0.0, max_tokens=20,
                                                                  structured_outputs=SO(regex=regex))),
                   (chat(llm, "Yes or no?"), SamplingParams(temperature=0.0, max_tokens=8,
                                                             structured_outputs=SO(choice=["yes", "no"]))),
                   (chat(llm, "A mood as JSON."), SamplingParams(temperature=0.0, max_tokens=30,
                                                                 structured_outputs=SO(json=SCHEMAS["enum"])))]
    prompts = [free[0], constrained[0][0], free[1], constrained[1][0], constrained[2][0]]
    params = [p_free, constrained[0][1], p_free, constrained[1][1], constrained[2][1]]
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert re.fullmatch(regex, outs[1].text), outs[1].text
    assert outs[3].text in ("yes", "no")
    jsonschema.validate(json.loads(outs[4].text), SCHEMAS["enum"])
    # and the constraint did something: unconstrained, these prompts do not answer so
    plain = llm.generate(constrained[0][0], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert not re.fullmatch(regex, plain[0].outputs[0].text)


def test_bad_grammar_refused_before_anything_runs(llm):
    with pytest.raises(RequestError) as e:
        llm.generate("x", SamplingParams(structured_outputs=SO(regex="(unclosed", param="guided_regex")),
                     use_tqdm=False)
    assert e.value.param == "guided_regex"
    assert not llm.engine.has_unfinished()
