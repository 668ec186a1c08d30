"""Every error leaves the server in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so
the ``openai`` client, LangChain and LlamaIndex raise their usual exceptions with our message in them.

Status codes: 400 a request that cannot be answered as sent (malformed JSON, an empty conversation, a
``max_tokens`` over the limit), 401 a missing or wrong API key, 404 an unknown model or context, 409 a
context id already taken or a conversation another replica saved since this one loaded it, 413 a body
over the size limit, 422 a body whose fields have the wrong type or are missing (FastAPI's validation,
reshaped here to name the field), 429 too many model calls queued, 503 the server is starting or
closing, or the store a request needs is unreachable (``store_unavailable``, from any route).  Errors
raised by hcmemory itself (``ValueError``/``TypeError`` at its boundary, with messages that say what to
change) become 400s naming the request field they concern.

What a store says about itself (its file path, database host, schema, the stored versions' layout) goes
to the server log, never into a response: a caller learns what happened to its request and what to do,
not where the server keeps its data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint import CheckpointError
from ..stores import CheckpointNotFoundError, StaleCheckpointError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """An error answered to the client as is: its status, message, the field it concerns and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


@contextmanager
def library_errors(param: str | None) -> Iterator[None]:
    """Turn hcmemory's boundary errors into client errors naming ``param``, the request field they came
    from; anything else stays a server error (500) and is logged with its traceback."""
    try:
        yield
    except APIError:
        raise
    except CheckpointNotFoundError as exc:
        log.info("not in the store: %s", exc)
        raise APIError(404, "no such stored context for this tenant (never created here, or deleted)", param,
                       "context_not_found") from exc
    except CheckpointError as exc:
        log.error("a stored context could not be read: %s", exc)
        raise APIError(500, "a stored context could not be read (damaged, or written for another model or "
                            "layout); the server log names it", param, "checkpoint_error") from exc
    except OSError as exc:  # the store's database is unreachable (TimeoutError is an OSError too)
        raise store_unavailable(exc, param) from exc
    except (ValueError, TypeError) as exc:
        code = "context_length_exceeded" if "window" in str(exc) else "invalid_value"
        raise APIError(400, str(exc), param, code) from exc


def store_unavailable(exc: OSError, param: str | None = None) -> APIError:
    """503 for a request that needs a store its server cannot reach now (the cause is logged, not sent)."""
    log.warning("context store unreachable: %s", exc)
    return APIError(503, f"the context store is unreachable ({type(exc).__name__}); conversations live in this server's memory "
                         "are still answered, this one needs its store: retry shortly", param, "store_unavailable")


def stale_message(exc: StaleCheckpointError) -> str:
    """The 409 a caller reads when another replica saved its conversation since this one loaded it: the
    versions, not the store's location (which goes to the log)."""
    log.warning("stale checkpoint refused: %s", exc)
    return (f"another server saved this conversation since this one loaded it (stored version {exc.current}, this "
            f"copy continued version {exc.expected}); this server's copy was dropped and the stored checkpoint is "
            "kept: the next request continues from it")


_UNION_TAGS = re.compile(r"^(str|int|float|bool|none|list|dict)$|[^a-z0-9_-]")
"""Parts pydantic adds to an error's location to say which member of a union failed (``str``,
``list[TextPart]``, ``TextPart``): not fields, so left out of the name the client sees."""


def _field(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` as ``messages[0].content``."""
    name = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _UNION_TAGS.search(str(part)):
            name += f".{part}" if name else str(part)
    return name or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        message = (f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}); "
                   "send a JSON object with Content-Type: application/json")
        return APIError(400, message, None, "invalid_json").response()
    param = _field(tuple(first.get("loc", ())))
    problems = "; ".join(f"{_field(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return APIError(422, f"invalid request: {problems}", param, "invalid_type").response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message, exc_info=exc.__cause__)
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see docs/serving.md for the endpoints"
    return JSONResponse(error_body(exc.status_code, message, None, code), status_code=exc.status_code,
                        headers=exc.headers)


async def _os_error(request: Request, exc: OSError) -> JSONResponse:
    """An ``OSError`` no route turned into an answer: a store (database, disk) failing under the request."""
    log.warning("%s %s failed on its store", request.method, request.url.path)
    return store_unavailable(exc).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); the server logged the traceback"),
                        status_code=500)


def install(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's own errors, and ours, through the OpenAI shape."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(Exception, _unexpected)
