"""One streamed OpenAI request, timed chunk by chunk. Every failure becomes a record, never an exception."""
from __future__ import annotations

import json
import time

import aiohttp

from pdserve.bench.metrics import RequestRecord


def render_prompt(messages: list[dict]) -> str:
    """Messages as plain text for /v1/completions; a lone user message is sent as is."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [m["content"] if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}"
             for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"


def build_body(endpoint: str, model: str, messages: list[dict], max_tokens: int,
               ignore_eos: bool, temperature: float, extra: dict | None = None) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint.endswith("chat/completions"):
        body["messages"] = messages
    else:
        body["prompt"] = render_prompt(messages)
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def _chunk_text(data: dict) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        return c["delta"].get("content") or ""
    return c.get("text") or ""


def _error_message(raw: bytes | str) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return err.get("message") or text
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return text.strip()[:300]


async def send_request(session: aiohttp.ClientSession, url: str, body: dict, rec: RequestRecord,
                       t0: float, headers: dict | None = None, clock=time.perf_counter) -> RequestRecord:
    """Stream `body` to `url`, filling `rec`; times are `clock()` seconds, `t0` the run's start.
    The clock is read once before the request and once per `data:` line as it arrives."""
    st = clock()
    rec.start = st - t0
    last, chunks, text, done = st, 0, [], False
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {_error_message(await resp.read())}"
                return rec
            async for raw in resp.content:  # aiohttp yields the body line by line
                line = raw.strip()
                if not line or not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                now = clock()
                data = json.loads(payload)
                if "error" in data:
                    rec.error = f"stream error: {_error_message(payload)}"
                    return rec
                piece = _chunk_text(data)
                if piece:
                    if chunks == 0:
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last)
                    rec.chunk_times.append(now - t0)
                    last, chunks = now, chunks + 1
                    text.append(piece)
                usage = data.get("usage")
                if usage:
                    rec.output_tokens = usage.get("completion_tokens") or 0
                    rec.prompt_len = usage.get("prompt_tokens") or rec.prompt_len
        rec.e2el = clock() - st
        rec.text = "".join(text)
        if not done:
            rec.error = "stream ended before data: [DONE]"
        elif chunks == 0:
            rec.error = "no tokens streamed"
        else:
            rec.output_tokens = rec.output_tokens or chunks
            rec.success = True
    except Exception as e:  # refused, reset, mid-stream drop, timeout, bad JSON: all count as failures
        rec.e2el = clock() - st
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return rec
