"""Dependencies the routers share: the server's state, the caller's tenant (bearer API keys), and the
conversation a request pins."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import APIError
from .schemas import CONTEXT_ID_PATTERN
from .server import Server

DEFAULT_TENANT = "default"
_TENANT_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")
_CONTEXT_ID = re.compile(CONTEXT_ID_PATTERN)


def get_server(request: Request) -> Server:
    server: Server | None = getattr(request.app.state, "server", None)
    if server is None:
        raise APIError(503, "the server is still loading its model or is shutting down; retry shortly", None,
                       "not_ready")
    return server


ServerDep = Annotated[Server, Depends(get_server)]


@dataclass(frozen=True)
class Caller:
    tenant: str
    """Whose memory this request may see: the API key (by its hash) when keys are configured, else the
    ``x-tenant-id`` header, else the default tenant."""


def get_caller(server: ServerDep, authorization: Annotated[str | None, Header()] = None,
               x_tenant_id: Annotated[str | None, Header()] = None) -> Caller:
    keys = server.settings.api_keys
    if keys:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>' (the openai client's "
                                "api_key)", None, "invalid_api_key")
        key = key.strip()
        if not any(hmac.compare_digest(key.encode(), known.encode()) for known in keys):
            raise APIError(401, "wrong API key: it is not one this server was started with (--api-key)", None,
                           "invalid_api_key")
        return Caller("key:" + hashlib.sha256(key.encode()).hexdigest()[:32])
    if x_tenant_id is None:
        return Caller(DEFAULT_TENANT)
    if not _TENANT_PATTERN.fullmatch(x_tenant_id):
        raise APIError(400, "x-tenant-id must be 1-128 printable ASCII characters without spaces", "x-tenant-id",
                       "invalid_value")
    return Caller("tenant:" + x_tenant_id)


CallerDep = Annotated[Caller, Depends(get_caller)]


def check_context_id(value: str, param: str) -> str:
    if not _CONTEXT_ID.fullmatch(value):
        raise APIError(400, f"{param}={value[:140]!r} is not a valid context id: 1-128 letters, digits or ._:@- "
                            "starting with a letter or digit", param, "invalid_value")
    return value


def pinned_context(header: str | None, session_id: str | None, user: str | None) -> str | None:
    """The context a chat or completion request pins: ``x-session-id``, else ``session_id``, else ``user``;
    None lets the longest shared prefix pick (within the caller's tenant).  A ``user`` that is not a valid
    id (OpenAI allows any string) is pinned by its hash."""
    if header is not None:
        return check_context_id(header, "x-session-id")
    if session_id is not None:
        return check_context_id(session_id, "session_id")
    if user is not None and user:
        return user if _CONTEXT_ID.fullmatch(user) else "user-" + hashlib.sha256(user.encode()).hexdigest()[:32]
    return None
