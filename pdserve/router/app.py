"""The router's HTTP face (aiohttp): OpenAI endpoints, /health, /metrics, /status, /instances.

aiohttp rather than FastAPI: the router only moves bytes and JSON, and aiohttp's server and
client share one event loop with little per-request cost. No torch anywhere below here.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from pdserve.config import RouterConfig
from pdserve.router.instances import ROLES, normalize_url
from pdserve.errors import error_body
from pdserve.router.openai_io import CHAT, COMPLETIONS
from pdserve.router.proxy import Router
from pdserve.router.upstream import ClientError

ROUTER = web.AppKey("router", Router)
log = logging.getLogger("pdserve.router")


def _err(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


@web.middleware
async def errors(request: web.Request, handler):
    """Every answer that is not a success is OpenAI's error JSON, aiohttp's own (404, 405,
    413, a body it cannot decode) and our bugs (500) included."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _err(e.status, e.reason if e.text is None or e.text.startswith(f"{e.status}:") else e.text)
    except RecursionError:
        return _err(400, "the request body nests too deeply")
    except (RequestPayloadError, HttpProcessingError) as e:
        return _err(400, f"cannot read the request body: {e}")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("unhandled error on %s", request.path)
        return _err(500, f"internal error: {type(e).__name__}: {e}"[:500])


@web.middleware
async def auth(request: web.Request, handler):
    cfg = request.app[ROUTER].cfg
    # every path but /health (and /metrics if asked): the pools, /status and the metrics say
    # who the workers are and what they do
    open_paths = ("/health", "/metrics") if cfg.metrics_no_auth else ("/health",)
    if cfg.api_key and request.path not in open_paths:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {cfg.api_key}".encode()):
            return _err(401, "Unauthorized: a valid API key is needed (Authorization: Bearer ...)")
    length = request.content_length
    if length is not None and length > cfg.max_request_bytes:
        return _err(413, f"the request body is larger than this router's limit of {cfg.max_request_bytes} bytes "
                         "(--max-request-bytes)")
    return await handler(request)


async def _read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise ClientError.of(413, f"the request body is larger than this router's limit of "
                                  f"{request.app[ROUTER].cfg.max_request_bytes} bytes (--max-request-bytes)")
    except (ValueError, UnicodeDecodeError) as e:
        raise ClientError.of(400, f"request body is not valid JSON: {e}")
    except RecursionError:
        raise ClientError.of(400, "the request body nests too deeply")
    except (RequestPayloadError, HttpProcessingError) as e:   # e.g. a Content-Encoding that does not decode
        raise ClientError.of(400, f"cannot read the request body: {e}")
    if not isinstance(body, dict):
        raise ClientError.of(400, "request body must be a JSON object")
    return body


def _openai(kind: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            body = await _read_json(request)
        except ClientError as e:
            return web.json_response(e.body, status=e.status)
        return await request.app[ROUTER].handle(request, kind, body)
    return handler


async def models(request: web.Request) -> web.Response:
    r = request.app[ROUTER]
    for inst in r.pools.healthy("decode") + r.pools.healthy("prefill"):
        try:
            async with r.session.get(inst.url + "/v1/models", headers=r.headers("models"),
                                     timeout=r.timeout) as resp:
                if resp.status == 200:
                    return web.json_response(await resp.json(content_type=None))
        except Exception as e:  # try the next instance
            inst.last_error = f"/v1/models: {e!r}"[:300]
    return _err(503, "no healthy instance to list models from")


def _forward(method: str, path: str):
    """/tokenize, /detokenize, /tokenizer_info: every worker serves the same model and
    tokenizer, so any healthy one answers (decode workers first); its status and body pass
    through as they are (a 400 stays the client's)."""
    async def handler(request: web.Request) -> web.Response:
        r = request.app[ROUTER]
        data = await request.read() if method == "POST" else None
        headers = {**r.headers(request.headers.get("X-Request-Id") or "tokenizer"), "Content-Type": "application/json"}
        for inst in r.pools.healthy("decode") + r.pools.healthy("prefill"):
            try:
                async with r.session.request(method, inst.url + path, data=data, headers=headers,
                                             timeout=r.timeout) as resp:
                    body = await resp.read()
                    if resp.status < 500:
                        return web.Response(body=body, status=resp.status, content_type="application/json")
                    inst.last_error = f"{path}: {resp.status}"
            except Exception as e:  # try the next instance
                inst.last_error = f"{path}: {e!r}"[:300]
        return _err(503, f"no healthy instance to answer {path}")
    return handler


async def health(request: web.Request) -> web.Response:
    ok = bool(request.app[ROUTER].pools.healthy("decode"))
    return web.json_response({"status": "ok" if ok else "no healthy decode instance"}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    r = request.app[ROUTER]
    return web.Response(body=r.metrics.render(r.pools.instances.values()),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def status(request: web.Request) -> web.Response:
    r = request.app[ROUTER]
    insts = [i.status() for i in r.pools.instances.values()]
    return web.json_response({
        "policy": r.cfg.policy, "local_prefill_max_tokens": r.cfg.local_prefill_max_tokens,
        "prefill_instances": [i for i in insts if i["role"] == "prefill"],
        "decode_instances": [i for i in insts if i["role"] == "decode"],
        "requests": {"remote_prefill": r.counts["remote"], "local_prefill": r.counts["local"],
                     "local_prefill_reasons": dict(r.local_reasons)},
        "learned_prompt_token_offset": {k: round(v, 1) for k, v in r.token_offset.items()},
        "time": time.time()})


async def _instance_arg(request: web.Request) -> tuple[str | None, str | None]:
    """Accept {"role"|"type": ..., "url"|"instance": ...} in the body or the query string."""
    body = {}
    if request.can_read_body:
        body = await _read_json(request)
    q = {**request.query, **body}
    url, role, meta = q.get("url") or q.get("instance"), q.get("role") or q.get("type"), q.get("meta")
    for name, v in (("url", url), ("role", role)):
        if v is not None and not isinstance(v, str):
            raise ClientError.of(400, f"{name} must be a string")
    return url, role, meta


async def add_instance(request: web.Request) -> web.Response:
    try:
        url, role, meta = await _instance_arg(request)
        if not url or role not in ROLES:
            raise ClientError.of(400, f'give {{"role": one of {list(ROLES)}, "url": "host:port"}}')
        if meta is not None and not (isinstance(meta, dict) and all(
                isinstance(v, (str, int, float, bool, type(None))) for v in meta.values())):
            return _err(400, '"meta" must be an object of plain values', param="meta")
        inst = request.app[ROUTER].pools.add(url, role, meta)
    except ClientError as e:
        return web.json_response(e.body, status=e.status)
    except ValueError as e:
        return _err(400, str(e))
    return web.json_response(inst.status())


async def drain_instance(request: web.Request) -> web.Response:
    """Send the instance no new requests; those it has finish. Poll /instances for its
    `assigned` and `in_flight` to reach 0, then DELETE it."""
    try:
        url, _, _ = await _instance_arg(request)
    except ClientError as e:
        return web.json_response(e.body, status=e.status)
    inst = request.app[ROUTER].pools.instances.get(normalize_url(url)) if url else None
    if inst is None:
        return _err(404 if url else 400, f"no instance {url}" if url else 'give {"url": "host:port"}')
    inst.draining = True
    return web.json_response(inst.status())


async def remove_instance(request: web.Request) -> web.Response:
    try:
        url, _, _ = await _instance_arg(request)
    except ClientError as e:
        return web.json_response(e.body, status=e.status)
    if not url:
        return _err(400, 'give {"url": "host:port"}')
    inst = request.app[ROUTER].pools.remove(url)
    if inst is None:
        return _err(404, f"no instance {url}")
    return web.json_response(inst.status())


async def list_instances(request: web.Request) -> web.Response:
    return web.json_response([i.status() for i in request.app[ROUTER].pools.instances.values()])


def _json_protocol_errors() -> None:
    """aiohttp answers what it cannot even parse (a Content-Encoding it cannot decode, a bad
    request line or header) itself, before any middleware, in plain text: make that OpenAI's
    error JSON too. aiohttp has no hook for it, so its one method is wrapped, once."""
    from aiohttp.web_protocol import RequestHandler
    orig = RequestHandler.handle_error
    if getattr(orig, "pdserve_json", False):
        return

    def handle_error(self, request, status=500, exc=None, message=None):
        plain = orig(self, request, status, exc, message)
        text = (message if status != 500 else None) or "internal error"
        resp = web.json_response(error_body(status, str(text).strip()[:500]), status=status)
        if plain.keep_alive is False:
            resp.force_close()
        return resp
    handle_error.pdserve_json = True
    RequestHandler.handle_error = handle_error


def make_app(cfg: RouterConfig, **router_kwargs) -> web.Application:
    _json_protocol_errors()
    app = web.Application(middlewares=[errors, auth], client_max_size=cfg.max_request_bytes)
    router = app[ROUTER] = Router(cfg, **router_kwargs)
    app.router.add_post("/v1/completions", _openai(COMPLETIONS))
    app.router.add_post("/v1/chat/completions", _openai(CHAT))
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", _forward("POST", "/tokenize"))
    app.router.add_post("/detokenize", _forward("POST", "/detokenize"))
    app.router.add_get("/tokenizer_info", _forward("GET", "/tokenizer_info"))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_get("/instances", list_instances)
    app.router.add_post("/instances", add_instance)
    app.router.add_delete("/instances", remove_instance)
    app.router.add_post("/instances/drain", drain_instance)

    async def startup(_):
        await router.start()

    async def cleanup(_):
        await router.close()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app

