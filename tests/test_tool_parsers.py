"""Tool calling without a model: parsers on text, streamed deltas against the whole-text parse,
the tool_choice plan's refusals, the prompt a template without tool support gets, and the
`required` schema checked by the jsonschema package."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest

from pdserve.errors import RequestError
from pdserve.server import tools
from pdserve.server.structured import from_request

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


def req(**kw):
    base = dict(tools=None, tool_choice=None, parallel_tool_calls=None, response_format=None,
                structured_outputs=None, guided_json=None, guided_regex=None, guided_choice=None, guided_grammar=None)
    return SimpleNamespace(**{**base, **kw})


def accumulate(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What the openai SDK builds from streamed deltas: content joined, tool calls by index."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls") or []:
            c = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.get("id") or c["id"]
            fn = tc.get("function") or {}
            c["name"] += fn.get("name") or ""
            c["arguments"] += fn.get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


def stream(plan, text: str, step: int) -> tuple[str, list[dict], list[dict]]:
    ts = tools.ToolStream(plan)
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    deltas = [ts.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return (*accumulate(deltas), deltas)


HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
               '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')


def test_hermes_parse_calls_and_content():
    plan = tools.ToolPlan("auto", [WEATHER, TIME], parser=tools.make_parser("hermes"))
    content, calls = plan.parse(HERMES_TEXT)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "CET"}
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_parallel_tool_calls_false_keeps_the_first():
    plan = tools.plan(req(tools=[WEATHER, TIME], tool_choice="auto", parallel_tool_calls=False), None, True, "hermes")
    _, calls = plan.parse(HERMES_TEXT)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    _, s_calls, _ = stream(plan, HERMES_TEXT, 5)
    assert [c["name"] for c in s_calls] == ["get_weather"]


def test_hermes_no_call_and_broken_call_are_content():
    plan = tools.ToolPlan("auto", [WEATHER], parser=tools.make_parser("hermes"))
    assert plan.parse("Just text, <tool no tag") == ("Just text, <tool no tag", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert plan.parse(broken) == (broken, [])


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_hermes_stream_matches_whole_parse(step):
    plan = tools.ToolPlan("auto", [WEATHER, TIME], parser=tools.make_parser("hermes"))
    content, calls, deltas = stream(plan, HERMES_TEXT, step)
    want_content, want_calls = plan.parse(HERMES_TEXT)
    assert content.strip() == want_content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
           [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want_calls]
    # no part of a tag ever leaks into the content, however the text is cut
    assert "<" not in content and "tool_call" not in "".join(d.get("content", "") for d in deltas)


def test_llama3_json_parser():
    plan = tools.ToolPlan("auto", [WEATHER, TIME], parser=tools.make_parser("llama3_json"))
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {"tz": "UTC"}}'
    content, calls = plan.parse(text)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
           [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "UTC"})]
    _, calls2 = plan.parse('<|python_tag|>{"name": "get_time", "arguments": {"tz": "UTC"}}')
    assert calls2[0]["function"]["name"] == "get_time"
    assert plan.parse("The weather is fine.") == ("The weather is fine.", [])
    assert plan.parse('{"name": "get_time", "parameters": {"tz"') == ('{"name": "get_time", "parameters": {"tz"', [])
    s_content, s_calls, _ = stream(plan, text, 4)
    assert s_content == "" and [c["name"] for c in s_calls] == ["get_weather", "get_time"]
    s_content, s_calls, deltas = stream(plan, "Hello there", 2)
    assert s_content == "Hello there" and not s_calls and len([d for d in deltas if d]) > 1   # streamed as it came


def test_named_and_required_streams():
    named = tools.ToolPlan("named", [WEATHER], name="get_weather")
    args = '{"city": "Rome"}'
    content, calls, deltas = stream(named, args, 3)
    assert content == "" and calls == [{"id": calls[0]["id"], "name": "get_weather", "arguments": args}]
    assert sum(1 for d in deltas if d.get("tool_calls")) > 1   # arguments come as they are made
    req_plan = tools.ToolPlan("required", [WEATHER, TIME])
    text = '[{"name": "get_time", "parameters": {"tz": "PST"}}]'
    content, calls, _ = stream(req_plan, text, 5)
    assert content == "" and [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_time", {"tz": "PST"})]
    assert req_plan.parse('[{"name": "get_ti') == ('[{"name": "get_ti', [])   # cut short: content
    ts = tools.ToolStream(req_plan)
    ts.feed(text, True)
    assert ts.finish_reason("stop") == "tool_calls" and ts.finish_reason("length") == "length"


def test_required_schema_accepts_calls_only():
    plan = tools.plan(req(tools=[WEATHER, TIME], tool_choice="required"), None, False, None)
    schema = plan.structured.json
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}], schema)
    jsonschema.validate([{"name": "get_time", "parameters": {"tz": "UTC"}},
                         {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}], schema)
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {"unit": "c"}}],
                [{"name": "get_weather", "parameters": {"city": "x"}, "extra": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tools.plan(req(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False), None, False, None)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"city": "a"}}] * 2, single.structured.json)


def test_plan_refusals_name_the_field():
    cases = [
        (req(tool_choice="required"), "tool_choice"),                                   # no tools
        (req(tools=[WEATHER], tool_choice="auto"), "tool_choice"),                      # auto without the flags
        (req(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}), "tool_choice"),
        (req(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (req(tools=[{"type": "function", "function": {"description": "no name"}}], tool_choice="required"), "tools.0"),
    ]
    for r, param in cases:
        with pytest.raises(RequestError) as e:
            tools.plan(r, None, False, None)
        assert e.value.param == param, (r, e.value)
    r = req(tools=[WEATHER], tool_choice="required", guided_regex="a+")
    with pytest.raises(RequestError) as e:
        tools.plan(r, from_request(r), True, "hermes")
    assert e.value.param == "guided_regex"
    named = tools.plan(req(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                       None, False, None)
    assert named.mode == "named" and named.structured.json == WEATHER["function"]["parameters"]
    assert tools.plan(req(tools=[WEATHER], tool_choice="auto"), None, True, "hermes").mode == "auto"
    assert tools.plan(req(tools=[WEATHER], tool_choice="none"), None, False, None).mode == "none"


def test_prompt_without_template_support():
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    msgs, tool_defs = tools.prompt_messages(history, [WEATHER], False, "hermes")
    assert tool_defs is None
    assert msgs[0]["role"] == "system" and json.dumps(WEATHER) in msgs[0]["content"]
    assert "<tool_call>" in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert "tool_calls" not in msgs[2]
    assert msgs[3] == {"role": "tool", "content": "<tool_response>\n18 C\n</tool_response>"}
    msgs, _ = tools.prompt_messages([{"role": "system", "content": "Be brief."}, *history], [WEATHER], False,
                                    "llama3_json")
    assert msgs[0]["content"].startswith("Be brief.") and '"parameters"' in msgs[0]["content"]
    # a template that knows tools gets them as they are, arguments as objects
    msgs, tool_defs = tools.prompt_messages(history, [WEATHER], True, "hermes")
    assert tool_defs == [WEATHER] and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[1]["content"] == "" and msgs[2]["tool_call_id"] == "call_1"
