"""The request body limit, enforced before anything parses the body.

Pure ASGI rather than a Starlette ``BaseHTTPMiddleware``: it must count bytes as they arrive (a chunked
upload has no ``Content-Length`` to check) and hand the buffered body on untouched, and it must not wrap
streaming responses (``BaseHTTPMiddleware`` would sit between the SSE stream and the client).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 in OpenAI's error shape."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, len(body))
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, as the app expects
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        error = APIError(413, f"the request body has {size} bytes or more, over this server's limit of "
                              f"{self.max_bytes}; send less (e.g. append long documents in parts to "
                              "/v1/contexts/{id}/documents) or start the server with a larger --max-body-bytes",
                         None, "request_too_large")
        await error.response()(scope, receive, send)
