"""OpenAI-shaped errors, shared by the router and the workers; no torch, no web framework.

Body: {"error": {"message", "type", "param", "code"}} sent with the HTTP status `code`."""
from __future__ import annotations

TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
         405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
         500: "InternalServerError", 503: "ServiceUnavailableError"}


class RequestError(ValueError):
    """Bad input: the server answers 400 with this message and `param`."""
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    # a message may quote the client's own text: lone surrogates in it must not break the JSON
    message = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}
