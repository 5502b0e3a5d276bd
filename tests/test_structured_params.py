"""Request fields -> StructuredOutputsParams: every spelling vLLM accepts, and a 400 naming the
field for everything else. No model needed."""
from __future__ import annotations

import pytest

from pdserve.errors import RequestError
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def chat(**kw):
    return ChatCompletionRequest(messages=MSG, **kw).sampling_params().structured_outputs


def test_each_spelling():
    so = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert (so.kind, so.json, so.param) == ("json", SCHEMA, "response_format")
    assert chat(response_format={"type": "json_object"}).kind == "json_object"
    assert chat(response_format={"type": "text"}) is None
    assert chat() is None
    assert (chat(guided_json=SCHEMA).json, chat(guided_json=SCHEMA).param) == (SCHEMA, "guided_json")
    assert chat(guided_regex="[a-z]+").regex == "[a-z]+"
    assert chat(guided_choice=["x", "y"]).choice == ["x", "y"]
    assert chat(guided_grammar='root ::= "a"').grammar == 'root ::= "a"'
    so = chat(structured_outputs={"regex": "a|b", "disable_any_whitespace": True})
    assert (so.kind, so.disable_any_whitespace) == ("regex", True)
    so = CompletionRequest(prompt="x", guided_choice=["a"]).sampling_params().structured_outputs
    assert so.choice == ["a"]


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "structural_tag"}), "response_format.type"),
    (dict(response_format={"schema": {}}), "response_format"),
    (dict(structured_outputs={"json": SCHEMA, "regex": "a"}), "structured_outputs"),
    (dict(structured_outputs={}), "structured_outputs"),
    (dict(structured_outputs={"whitespace_pattern": " "}), "structured_outputs.whitespace_pattern"),
    (dict(guided_json=SCHEMA, guided_regex="a"), "guided_regex"),
    (dict(response_format={"type": "json_object"}, guided_choice=["a"]), "guided_choice"),
    (dict(guided_choice=[]), "guided_choice"),
])
def test_refusals_name_the_field(kw, param):
    with pytest.raises(RequestError) as e:
        chat(**kw)
    assert e.value.param == param, e.value
