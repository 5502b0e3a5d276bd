"""Calls from the router to one worker: a JSON call and an SSE stream, with failures sorted
into 'try another instance' (UpstreamError) and 'the client's own fault' (ClientError)."""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import aiohttp

from pdserve.router.instances import Instance
from pdserve.errors import error_body


class UpstreamError(Exception):
    """The instance could not serve the call (down, 5xx, broken stream): another one may.
    `down` says whether the instance itself looks gone, not just this request."""

    def __init__(self, message: str, down: bool):
        super().__init__(message)
        self.down = down


class ClientError(Exception):
    """An answer to hand to the client as it is (a worker's 4xx, or no instance at all)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"{status}: {body}")
        self.status, self.body = status, body

    @classmethod
    def of(cls, status: int, message: str) -> "ClientError":
        return cls(status, error_body(status, message))


# No byte within --request-timeout on one call: this request is too slow (a long answer that
# is not streamed, a busy worker), which says nothing of the instance; a wedged one fails its
# health check long before, and the health loop takes it out (Instance.went_down).
SLOW_ERRORS = (aiohttp.SocketTimeoutError,)
# Errors that mean the instance is gone or wedged, not that this request was bad.
CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError, asyncio.TimeoutError,
                  ConnectionError, OSError)


async def _raise_for_status(r: aiohttp.ClientResponse, inst: Instance) -> None:
    if r.status < 400:
        return
    raw = await r.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = error_body(r.status, raw.decode(errors="replace")[:500] or r.reason or "error")
    if r.status >= 500:
        msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        raise UpstreamError(f"{inst.url} answered {r.status}: {msg or body}"[:500], down=False)
    raise ClientError(r.status, body)


async def post_json(session: aiohttp.ClientSession, inst: Instance, path: str, body: dict,
                    headers: dict, timeout: aiohttp.ClientTimeout) -> dict:
    inst.in_flight += 1
    inst.requests += 1
    try:
        async with session.post(inst.url + path, json=body, headers=headers, timeout=timeout) as r:
            await _raise_for_status(r, inst)
            return await r.json(content_type=None)
    except SLOW_ERRORS as e:
        raise UpstreamError(f"{inst.url}: no answer within the router's --request-timeout ({e})"[:500],
                            down=False) from e
    except CONNECT_ERRORS as e:
        raise UpstreamError(f"{inst.url}: {e!r}"[:500], down=True) from e
    except (aiohttp.ClientPayloadError, ValueError) as e:
        raise UpstreamError(f"{inst.url}: bad answer: {e!r}"[:500], down=False) from e
    finally:
        inst.in_flight -= 1


async def stream_sse(session: aiohttp.ClientSession, inst: Instance, path: str, body: dict,
                     headers: dict, timeout: aiohttp.ClientTimeout) -> AsyncIterator[list[bytes | None]]:
    """Yield, per read from the worker, the `data:` payloads it completed: JSON as bytes (the
    caller parses only what it must edit), None for [DONE]. Batches, not single events, so a
    busy router answers several tokens with one write. Leaving early (client gone) closes the
    connection: the worker aborts the request."""
    inst.in_flight += 1
    inst.requests += 1
    try:
        async with session.post(inst.url + path, json=body, headers=headers, timeout=timeout) as r:
            await _raise_for_status(r, inst)
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
                *events, buf = buf.split(b"\n\n")
                batch = []
                for ev in events:
                    for line in ev.split(b"\n"):
                        if line.startswith(b"data:"):
                            data = line[5:].strip()
                            batch.append(None if data == b"[DONE]" else data)
                if batch:
                    yield batch
                    if batch[-1] is None:
                        return
        raise UpstreamError(f"{inst.url}: stream ended without [DONE]", down=False)
    except SLOW_ERRORS as e:
        raise UpstreamError(f"{inst.url}: no answer within the router's --request-timeout ({e})"[:500],
                            down=False) from e
    except CONNECT_ERRORS as e:
        raise UpstreamError(f"{inst.url}: {e!r}"[:500], down=True) from e
    except (aiohttp.ClientPayloadError, ValueError) as e:
        raise UpstreamError(f"{inst.url}: broken stream: {e!r}"[:500], down=False) from e
    finally:
        inst.in_flight -= 1
