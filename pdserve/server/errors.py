"""OpenAI error JSON: {"error": {"message", "type", "param", "code"}} with the HTTP status."""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pdserve.errors import RequestError, error_body

log = logging.getLogger("pdserve.server")

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def install(app) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, e: RequestError):
        return error_response(400, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RecursionError)
    async def _deep(request: Request, e: RecursionError):
        return error_response(400, "the request body nests too deeply")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):   # still OpenAI-shaped, never plain text
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}"[:500])
