"""Structured output and tool calls through the `openai` client (and LangChain), against a
colocated worker and a P+D+router deployment started by the test. Outputs are checked by the
jsonschema package and Python's re; the disaggregated answer must equal the colocated one
(greedy), which holds only if the prefill worker's first token obeyed the grammar and the
decode worker's matcher continued from it."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from pdserve import procs

from json_schemas import SCHEMAS
from helpers import MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ENGINE = ["--kv-cache-memory", "64MiB", "--max-model-len", "1024"]
TOOLS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
ENV = {"OMP_NUM_THREADS": "1"}

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}},
               "required": ["timezone"], "additionalProperties": False}
TOOL_DEFS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                               "parameters": WEATHER_PARAMS}},
             {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                               "parameters": TIME_PARAMS}}]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def urls(default_model_dir, tmp_path_factory):
    """A colocated worker, and a prefill worker + decode worker behind a router."""
    logs = tmp_path_factory.mktemp("structured")
    ports = {k: procs.free_port() for k in ("both", "prefill", "decode", "router")}
    started = []
    try:
        for role in ("both", "prefill", "decode"):
            started.append(procs.start(procs.pdserve_command("serve", "--role", role, "--port", ports[role],
                                                             *ENGINE, *TOOLS), logs / f"{role}.log", env=ENV))
        for role, p in zip(("both", "prefill", "decode"), started):
            procs.wait_healthy(f"http://127.0.0.1:{ports[role]}", p, timeout=300)
        started.append(procs.start(procs.pdserve_command(
            "router", "--port", ports["router"], "--prefill", f"127.0.0.1:{ports['prefill']}",
            "--decode", f"127.0.0.1:{ports['decode']}"), logs / "router.log"))
        router = f"http://127.0.0.1:{ports['router']}"
        procs.wait_healthy(router, started[-1], timeout=60)
        yield {"colocated": f"http://127.0.0.1:{ports['both']}", "router": router}
    finally:
        for p in started:
            procs.stop(p)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def remote_count(router: str) -> int:
    return httpx.get(router + "/status", timeout=10).json()["requests"]["remote_prefill"]


def chat(url: str, stream: bool, **kw) -> tuple[str, str, list[dict]]:
    """(content, finish_reason, tool calls as dicts) through the openai client, streamed or not."""
    c = client(url)
    kw = {"model": MODEL, "temperature": 0, **kw}
    if not stream:
        ch = c.chat.completions.create(**kw).choices[0]
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                 for t in ch.message.tool_calls or []]
        return ch.message.content, ch.finish_reason, calls
    content, finish, calls = "", None, {}
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for t in ch.delta.tool_calls or []:
                d = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                d["id"] = t.id or d["id"]
                d["name"] += (t.function and t.function.name) or ""
                d["arguments"] += (t.function and t.function.arguments) or ""
            finish = ch.finish_reason or finish
    return content or None, finish, [calls[i] for i in sorted(calls)]


# ---- structured output ----------------------------------------------------------------------
def _json_body(name: str) -> dict:
    """A different spelling per schema: OpenAI's response_format, vLLM's guided_json and structured_outputs."""
    schema = SCHEMAS[name]
    if name in ("person", "nested"):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}
    if name == "enum":
        return {"extra_body": {"guided_json": schema}}
    return {"extra_body": {"structured_outputs": {"json": schema}}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_colocated_and_disaggregated(urls, name):
    msgs = [{"role": "user", "content": f"Give me a {name} as JSON."}]
    before = remote_count(urls["router"])
    answers = {}
    for where in ("colocated", "router"):
        for stream in (False, True):
            content, finish, _ = chat(urls[where], stream, messages=msgs, max_tokens=80, **_json_body(name))
            assert finish == "stop", content
            jsonschema.validate(json.loads(content), SCHEMAS[name])
            answers[where, stream] = content
    assert len(set(answers.values())) == 1, answers   # greedy: one answer wherever it is computed
    assert remote_count(urls["router"]) == before + 2   # both router requests were prefilled remotely


def test_regex_and_choice(urls):
    regex = r"[A-Z][a-z]{2,8}, [0-9]{4}"
    for where in ("colocated", "router"):
        c = client(urls[where])
        out = c.completions.create(model=MODEL, prompt="The city and year of the first Olympic games:",
                                   max_tokens=20, temperature=0, extra_body={"guided_regex": regex})
        assert re.fullmatch(regex, out.choices[0].text), out.choices[0].text
        content, finish, _ = chat(urls[where], True, messages=[{"role": "user", "content": "Is the sky green?"}],
                                  max_tokens=10, extra_body={"guided_choice": ["Yes, it is", "No, it is not"]})
        assert content in ("Yes, it is", "No, it is not") and finish == "stop"
        content, _, _ = chat(urls[where], False, messages=[{"role": "user", "content": "Say something."}],
                             max_tokens=20, extra_body={"structured_outputs": {"grammar": 'root ::= "ab" [0-9] [0-9]'}})
        assert re.fullmatch(r"ab[0-9][0-9]", content), content


@pytest.mark.parametrize("where", ["colocated", "router"])
def test_bad_grammar_is_a_400(urls, where):
    c = client(urls[where])
    for extra, param in (({"guided_regex": "(unclosed"}, "guided_regex"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                       "schema": {"type": "nope"}}}},
                          "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)
        assert param in str(e.value.body), e.value.body


def test_openai_parse_with_pydantic(urls):
    from pydantic import BaseModel, Field

    class Mood(BaseModel):
        mood: str = Field(max_length=10)
        score: int = Field(ge=0, le=10)

    out = client(urls["colocated"]).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "How do you feel, and how much (0-10)?"}],
        response_format=Mood, max_tokens=40, temperature=0)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Mood) and 0 <= parsed.score <= 10


# ---- tool calls -----------------------------------------------------------------------------
def _check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for c in calls:
        assert c["name"] in names and c["id"]
        jsonschema.validate(json.loads(c["arguments"]), PARAMS[c["name"]])


@pytest.mark.parametrize("where", ["colocated", "router"])
def test_forced_tool_calls(urls, where):
    named = {"type": "function", "function": {"name": "get_weather"}}
    results = {}
    for stream in (False, True):
        content, finish, calls = chat(urls[where], stream, messages=ASK, tools=TOOL_DEFS, tool_choice="required",
                                      max_tokens=80)
        assert finish == "tool_calls" and content is None, (content, finish)
        _check_calls(calls, {"get_weather", "get_time"})
        content, finish, ncalls = chat(urls[where], stream, messages=ASK, tools=TOOL_DEFS, tool_choice=named,
                                       max_tokens=60)
        assert finish == "stop" and not content, content   # OpenAI and vLLM say "stop" for a named function
        assert [c["name"] for c in ncalls] == ["get_weather"]
        _check_calls(ncalls, {"get_weather"})
        results[stream] = ([(c["name"], c["arguments"]) for c in calls], ncalls[0]["arguments"])
    assert results[False] == results[True]


@pytest.mark.parametrize("where", ["colocated", "router"])
def test_auto_tool_choice_hermes(urls, where):
    """tool_choice auto: the server parses what the model wrote. A small model does not choose a
    tool by itself, so the request also constrains the output to the Hermes format (a regex),
    and the server's own parser must find the call in it."""
    fmt = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}", '
           r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')
    for stream in (False, True):
        content, finish, calls = chat(urls[where], stream, messages=ASK, tools=TOOL_DEFS, tool_choice="auto",
                                      max_tokens=60, extra_body={"guided_regex": fmt})
        assert finish == "tool_calls" and not content, (content, finish, calls)
        _check_calls(calls, {"get_weather"})
        assert [c["name"] for c in calls] == ["get_weather"]
    # left alone, the model answers in words: that is content, and finish_reason stays stop/length
    content, finish, calls = chat(urls[where], False, messages=ASK, tools=TOOL_DEFS, max_tokens=12)
    assert content and not calls and finish in ("stop", "length")


def test_tool_history_and_prompt(urls):
    """Assistant tool calls and tool results in the history are accepted and reach the prompt,
    and the tools are in the prompt (SmolLM2's template knows no tools: a Hermes system prompt)."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    r = httpx.post(urls["colocated"] + "/v1/chat/completions", timeout=300, json={
        "model": MODEL, "messages": history, "tools": TOOL_DEFS, "max_tokens": 8, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["prompt_token_ids"]
    prompt = httpx.post(urls["colocated"] + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert "<tools>" in prompt and '"name": "get_time"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n21 degrees and sunny\n</tool_response>" in prompt


def test_tool_refusals(urls):
    c = client(urls["colocated"])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOL_DEFS, max_tokens=5,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body.get("param") == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOL_DEFS, tool_choice="required", max_tokens=5,
                                  response_format={"type": "json_object"})
    assert e.value.body.get("param") == "response_format"


def test_langchain_bind_tools_and_structured_output(urls):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    for where in ("colocated", "router"):
        llm = ChatOpenAI(model=MODEL, base_url=urls[where] + "/v1", api_key="none", temperature=0, max_tokens=60,
                         max_retries=0, timeout=300)
        msg = llm.bind_tools(TOOL_DEFS, tool_choice="get_weather").invoke("Weather in Rome?")
        assert [t["name"] for t in msg.tool_calls] == ["get_weather"], msg
        jsonschema.validate(msg.tool_calls[0]["args"], WEATHER_PARAMS)
        msg = llm.bind_tools(TOOL_DEFS, tool_choice="any",   # any: "required"; one call: the array's maxItems
                             parallel_tool_calls=False).invoke("What time is it in London?")
        assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] in PARAMS, msg
        jsonschema.validate(msg.tool_calls[0]["args"], PARAMS[msg.tool_calls[0]["name"]])

    class City(BaseModel):
        name: str = Field(max_length=12)
        country: str = Field(max_length=12)

    llm = ChatOpenAI(model=MODEL, base_url=urls["colocated"] + "/v1", api_key="none", temperature=0, max_tokens=60,
                     max_retries=0, timeout=300)
    city = llm.with_structured_output(City, method="json_schema").invoke("Name a big city.")
    assert isinstance(city, City)
