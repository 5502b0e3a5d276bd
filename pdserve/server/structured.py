"""Request fields that constrain the output -> StructuredOutputsParams, as vLLM reads them:
OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` object
and its older `guided_json | guided_regex | guided_choice | guided_grammar` fields. At most
one of them per request; anything not understood is a 400 naming the field."""
from __future__ import annotations

from pdserve.errors import RequestError
from pdserve.engine.request import StructuredOutputsParams

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


def _make(param: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(param=param, **kw)
    except ValueError as e:
        raise RequestError(str(e), param) from e


def from_response_format(rf: dict) -> StructuredOutputsParams | None:
    if not isinstance(rf, dict) or "type" not in rf:
        raise RequestError("response_format must be an object with a type", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _make("response_format", json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), (dict, bool)):
            raise RequestError("response_format of type json_schema needs json_schema.schema (a JSON schema)",
                               "response_format.json_schema.schema")
        return _make("response_format", json=js["schema"])
    raise RequestError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       "response_format.type")


def from_structured_outputs(so: dict) -> StructuredOutputsParams:
    if not isinstance(so, dict):
        raise RequestError("structured_outputs must be an object", "structured_outputs")
    for k in so:
        if k not in STRUCTURED_KEYS:
            raise RequestError(f"structured_outputs.{k} is not supported ({', '.join(STRUCTURED_KEYS)})",
                               f"structured_outputs.{k}")
    return _make("structured_outputs", **{k: v for k, v in so.items() if v is not None})


def from_request(req) -> StructuredOutputsParams | None:
    """The one constraint a request asks for, or None. Several at once is a 400."""
    found: list[tuple[str, StructuredOutputsParams | None]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        found.append(("response_format", from_response_format(rf)))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", from_structured_outputs(req.structured_outputs)))
    for field, kind in GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, _make(field, **{kind: value})))
    if len(found) > 1:
        raise RequestError(f"only one of {', '.join(f for f, _ in found)} may be given", found[1][0])
    return found[0][1] if found else None
