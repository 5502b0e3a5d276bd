"""OpenAI wire format as the router needs it: errors, SSE framing, the prefill body, the first
token, and what to match prompts on. No routing decisions here."""
from __future__ import annotations

import json

from pdserve.router.placement import CHARS_PER_TOKEN

COMPLETIONS, CHAT = "completions", "chat"


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def prompt_key(kind: str, body: dict) -> tuple[list | str | None, int]:
    """(key for the prefix policy, estimated prompt tokens). key None: cannot tell (batch)."""
    if kind == CHAT:
        parts = []
        for m in body.get("messages") or []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):  # content parts: only text counts
                c = "".join(t for p in c if isinstance(p, dict) and isinstance(t := p.get("text"), str))
            if not isinstance(c, str):   # the worker says what is wrong with it; here it only has no size
                c = ""
            parts.append(f"<{m.get('role', '') if isinstance(m, dict) else ''}>{c or ''}\n")
        text = "".join(parts)
        return text, -(-len(text) // CHARS_PER_TOKEN)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p, -(-len(p) // CHARS_PER_TOKEN)
    if isinstance(p, list) and all(isinstance(t, int) for t in p):
        return p, len(p)   # token ids: exact
    return None, 0


def early_first_token(kind: str, body: dict) -> bool:
    """Whether the router may stream the prefill worker's first token itself, before the
    decode worker answers: only for one plain choice. With logprobs, an echo, prompt logprobs,
    usage in every chunk or several choices, the decode worker's stream is the whole answer;
    so it is when tools are in play (tool_choice not "none"): the decode worker parses the
    whole output into tool calls, and the first token's text may not be content at all."""
    if (body.get("n") or 1) != 1 or body.get("prompt_logprobs") is not None:
        return False
    if kind == CHAT and body.get("tools") and body.get("tool_choice") != "none":
        return False
    p = body.get("prompt")
    if kind == COMPLETIONS and isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > 1:
        return False
    if body.get("logprobs") or (kind == COMPLETIONS and (body.get("echo") or body.get("logprobs") is not None)):
        return False
    opts = body.get("stream_options")
    return not (isinstance(opts, dict) and opts.get("continuous_usage_stats"))


def max_tokens(kind: str, body: dict) -> int | None:
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        return body["max_completion_tokens"]
    return body.get("max_tokens")


def prefill_body(kind: str, body: dict) -> dict:
    """The same request, not streamed, asking the worker to hold the KV for a puller. The
    client's max_tokens, min_tokens and stream_options stay: a pdserve prefill worker stops a
    do_remote_decode request after its first token whatever max_tokens says, and so checks the
    whole request (prompt + max_tokens within the context, stream_options well formed) before
    the router has sent the client anything; a request the decode worker would refuse is
    refused with a plain HTTP status, not in the middle of a stream."""
    pb = dict(body)
    pb["stream"] = False
    pb["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    return pb


def first_text(kind: str, resp: dict) -> str:
    """The first token's text in a prefill worker's answer."""
    choice = (resp.get("choices") or [{}])[0]
    if kind == CHAT:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def first_chunk(kind: str, id_: str, created: int, model: str, text: str) -> dict:
    if kind == CHAT:
        return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": None}]}
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
