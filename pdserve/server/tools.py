"""Tool calling, as vLLM serves it: `tools` into the prompt, `tool_choice` into a grammar or a
parser, the output back into `tool_calls`.

- `none`: tools are shown to the model (as vLLM does by default); the output is plain content.
- `auto`: the model decides; its output is parsed by the parser named with
  `--tool-call-parser` (`hermes`: `<tool_call>{...}</tool_call>`; `llama3_json`: the output is
  `{"name": ..., "parameters": ...}` objects separated by `;`). Needs `--enable-auto-tool-choice`.
- `required`: the output is constrained to a JSON array of calls (vLLM's schema), so it parses.
- `{"type": "function", "function": {"name": N}}`: the output is constrained to N's parameter
  schema, and is N's arguments. finish_reason stays "stop", as OpenAI and vLLM answer.

Prompt: a chat template that knows tools (it mentions `tools`) gets them through
`apply_chat_template(tools=...)`. One that does not (SmolLM2's, the default model's) gets a
Hermes-style system prompt listing them, in the format of the configured parser; earlier
assistant tool calls and tool results in the history are written in that format too.
"""
from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass

from pdserve.errors import RequestError
from pdserve.engine.request import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json")


def call_id() -> str:
    return f"chatcmpl-tool-{secrets.token_hex(12)}"


def tool_call(name: str, arguments: str, index: int | None = None) -> dict:
    d = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return d if index is None else {"index": index, **d}


# ---- parsers: text -> segments ("content", text) | ("call", name, arguments JSON) ------------
def _call_from(obj, args_keys=("arguments", "parameters")) -> tuple[str, str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for k in args_keys:
        if k in obj:
            a = obj[k]
            return ("call", obj["name"], a if isinstance(a, str) else json.dumps(a, ensure_ascii=False))
    return ("call", obj["name"], "{}")


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around them."""
    START, END = "<tool_call>", "</tool_call>"
    prompt_format = ('For each function call, return a JSON object with the function name and arguments '
                     'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
                     '"arguments": <args-json-object>}\n</tool_call>')

    def segments(self, text: str, final: bool) -> list[tuple]:
        """The text cut into content and calls. With final=False the last content segment may
        still grow and an unclosed call is left out; earlier segments are settled."""
        segs, pos = [], 0
        while True:
            i = text.find(self.START, pos)
            if i < 0:
                tail = text[pos:]
                if not final:   # hold back what may be the start of a tag
                    for k in range(min(len(self.START) - 1, len(tail)), 0, -1):
                        if self.START.startswith(tail[-k:]):
                            tail = tail[:-k]
                            break
                if tail:
                    segs.append(("content", tail))
                return segs
            if i > pos:
                segs.append(("content", text[pos:i]))
            j = text.find(self.END, i)
            if j < 0 and not final:
                return segs
            body = text[i + len(self.START):j if j >= 0 else len(text)]
            try:
                call = _call_from(json.loads(body))
            except json.JSONDecodeError:
                call = None
            raw = text[i:j + len(self.END) if j >= 0 else len(text)]
            segs.append(call or ("content", raw))   # not a call after all: it is text
            if j < 0:
                return segs
            pos = j + len(self.END)


class Llama3JsonParser:
    """Llama 3.x JSON tool calls: the whole output is `{"name": N, "parameters": {...}}`, several
    separated by `;`, optionally after `<|python_tag|>`. Anything else is content."""
    TAG = "<|python_tag|>"
    prompt_format = ('To call a function, respond with only a JSON object of the form {"name": function name, '
                     '"parameters": dictionary of argument name and its value}; several calls are separated by "; ".')

    def segments(self, text: str, final: bool) -> list[tuple]:
        s = text.lstrip()
        if s.startswith(self.TAG):
            s = s[len(self.TAG):].lstrip()
        elif not final and (not s or self.TAG.startswith(s)):
            return []
        if not s.startswith("{"):
            return [("content", text)] if text else []
        if not final:
            return []   # a call: nothing is settled until the end
        calls, dec, pos = [], json.JSONDecoder(), 0
        try:
            while pos < len(s):
                obj, pos = dec.raw_decode(s, pos)
                call = _call_from(obj, ("parameters", "arguments"))
                if call is None:
                    return [("content", text)]
                calls.append(call)
                rest = s[pos:].lstrip()
                if rest.startswith(";"):
                    rest = rest[1:].lstrip()
                elif rest:
                    return [("content", text)]
                pos = len(s) - len(rest)
        except json.JSONDecodeError:
            return [("content", text)]
        return calls


def make_parser(name: str):
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"unknown tool call parser {name!r} (choose from {', '.join(PARSERS)})")


# ---- the plan for one request ---------------------------------------------------------------
@dataclass
class ToolPlan:
    mode: str                       # none | auto | required | named
    tools: list[dict] | None        # the request's tools, for the prompt
    name: str | None = None         # named: the function
    parser: object | None = None    # auto: a parser
    structured: StructuredOutputsParams | None = None   # required / named: the grammar
    parallel: bool = True           # parallel_tool_calls: false keeps the first call only (auto)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a finished output."""
        if self.mode == "named":
            return None, [tool_call(self.name, text)]
        if self.mode == "required":
            try:
                arr = json.loads(text)
                calls = [_call_from(c) for c in arr] if isinstance(arr, list) else [None]
            except json.JSONDecodeError:
                calls = [None]
            if not calls or None in calls:   # cut short (max_tokens): what came is the content
                return text, []
            return None, [tool_call(n, a) for _, n, a in calls]
        if self.mode == "auto":
            segs = self.parser.segments(text, True)
            content = "".join(s[1] for s in segs if s[0] == "content")
            calls = [tool_call(s[1], s[2]) for s in segs if s[0] == "call"][:None if self.parallel else 1]
            if calls:
                return (content.strip() or None), calls
        return text, []


def _function(t, i: int) -> dict:
    fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                           "'parameters': {...}}}}", f"tools.{i}")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object", f"tools.{i}")
    return fn


def _params_schema(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def required_schema(fns: list[dict], parallel: bool) -> dict:
    """vLLM's schema for tool_choice=required: an array of {name, parameters}, one item kind per
    function; `$defs` of the parameter schemas are lifted to the top, where `$ref`s find them."""
    defs, items = {}, []
    for fn in fns:
        p = copy.deepcopy(_params_schema(fn))
        for k, v in p.pop("$defs", {}).items():
            if k in defs and defs[k] != v:
                raise RequestError(f"tools define $defs.{k} differently", "tools")
            defs[k] = v
        items.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": p},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def plan(req, params_structured, enable_auto: bool, parser_name: str | None) -> ToolPlan:
    """What a chat request's tools and tool_choice ask for; every misuse is a 400 naming its field."""
    tools, choice = req.tools, req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return ToolPlan("none", None)
    fns = [_function(t, i) for i, t in enumerate(tools)]
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise RequestError("tool_choice must be none, auto, required or "
                               "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        fn = next((f for f in fns if f["name"] == name), None)
        if fn is None:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        mode, schema = "named", _params_schema(fn)
    elif choice == "required":
        mode, schema, name = "required", required_schema(fns, req.parallel_tool_calls is not False), None
    elif choice == "auto":
        if not enable_auto or not parser_name:
            raise RequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                               "to be set", "tool_choice")
        return ToolPlan("auto", tools, parser=make_parser(parser_name), parallel=req.parallel_tool_calls is not False)
    elif choice == "none":
        return ToolPlan("none", tools)
    else:
        raise RequestError(f"tool_choice {choice!r} is not none, auto, required or a function", "tool_choice")
    if params_structured is not None:
        raise RequestError(f"tool_choice {mode} constrains the output itself; drop {params_structured.param}",
                           params_structured.param)
    return ToolPlan(mode, tools, name, structured=StructuredOutputsParams(json=schema, param="tools"))


# ---- the prompt -----------------------------------------------------------------------------
def template_knows_tools(template) -> bool:
    return isinstance(template, str) and "tools" in template


def _arguments(a):
    if isinstance(a, str):
        try:
            return json.loads(a)
        except json.JSONDecodeError:
            return a
    return a


def system_prompt(tools: list[dict], parser_name: str | None) -> str:
    fmt = (make_parser(parser_name) if parser_name else HermesParser()).prompt_format
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
            "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
            f"about what values to plug into functions. Here are the available tools:\n<tools>\n{listed}\n</tools>\n"
            + fmt)


def prompt_messages(messages: list, tools: list[dict] | None, native: bool,
                    parser_name: str | None) -> tuple[list, list[dict] | None]:
    """(messages, tools for apply_chat_template) for a template with (native) or without tool support."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)   # apply_chat_template's own check answers this
            continue
        m = dict(m)
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      and isinstance(c["function"].get("name"), str) for c in calls):
                raise RequestError(f"messages[{i}].tool_calls must be a list of "
                                   "{'id', 'type': 'function', 'function': {'name', 'arguments'}}", f"messages.{i}")
            fns = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments", {}))}
                   for c in calls]
            if native:   # templates want arguments as objects, not the JSON text the API carries
                m["tool_calls"] = [{**c, "type": "function", "function": f} for c, f in zip(calls, fns)]
                m["content"] = m.get("content") or ""
            else:
                written = "\n".join(f"<tool_call>\n{json.dumps(f, ensure_ascii=False)}\n</tool_call>" for f in fns)
                m.pop("tool_calls")
                m["content"] = ((m.get("content") or "") + "\n" + written).lstrip("\n")
        elif m.get("role") == "tool" and not native:
            m.pop("tool_call_id", None)
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        out.append(m)
    if native or not tools:
        return out, tools
    text = system_prompt(tools, parser_name)
    if out and isinstance(out[0], dict) and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, None


# ---- streaming ------------------------------------------------------------------------------
class ToolStream:
    """One choice's streamed text turned into deltas: content while it is content, `tool_calls`
    entries once a call is complete (named: the arguments as they come)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text = plan, ""
        self.done = self.partial = self.calls = 0
        self.id = call_id()

    def feed(self, new: str, final: bool) -> dict:
        """The delta fields ({'content': ..., 'tool_calls': [...]}) for new text; {} if none yet."""
        self.text += new
        p = self.plan
        if p.mode == "named":
            if not new:
                return {}
            fn = {"arguments": new}
            if self.calls == 0:
                self.calls = 1
                return {"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                        "function": {"name": p.name, **fn}}]}
            return {"tool_calls": [{"index": 0, "function": fn}]}
        if p.mode == "required":
            if not final:
                return {}
            content, calls = p.parse(self.text)
            return self._out(content or "", [{"index": i, **c} for i, c in enumerate(calls)], len(calls))
        if p.mode != "auto":
            return {"content": new} if new else {}
        content, calls = "", []
        segs = p.parser.segments(self.text, final)
        for k in range(self.done, len(segs)):
            seg = segs[k]
            if seg[0] == "content":
                content += seg[1][self.partial:]
                if k == len(segs) - 1 and not final:
                    self.partial = len(seg[1])
                    break
                self.partial = 0
            elif p.parallel or self.calls + len(calls) == 0:
                calls.append(tool_call(seg[1], seg[2], self.calls + len(calls)))
            self.done = k + 1
        return self._out(content, calls, self.calls + len(calls))

    def _out(self, content: str, calls: list, total: int) -> dict:
        self.calls = total
        d = {}
        if content:
            d["content"] = content
        if calls:
            d["tool_calls"] = calls
        return d

    def finish_reason(self, reason: str | None) -> str | None:
        called = self.calls > 0 and self.plan.mode in ("auto", "required")
        return "tool_calls" if called and reason == "stop" else reason
