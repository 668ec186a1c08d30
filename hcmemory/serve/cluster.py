"""Many replicas on Ray Serve: ``hcmemory serve --ray --replicas N --store postgresql://…`` (or a directory,
for replicas on one machine).

Two deployments:

* **the ingress** (``hcmemory-ingress``, no model): a small FastAPI app behind Ray's HTTP proxy.  It
  checks the body size, finds the request's conversation — the ``x-session-id`` header, else the
  ``session_id`` or ``user`` body field (``deps.pinned_context``, the rule the single server uses),
  else the context id in a ``/v1/contexts/{id}`` path — and forwards the whole HTTP request to the
  model deployment with that conversation as Ray's ``session_id``.
* **the model replicas** (``hcmemory-model``, N of them): each runs the single server's own app
  (``create_app``: its tenants, pools, model thread, routers) in-process, fed the forwarded request
  through ASGI, with per-turn checkpoints to the shared store turned on.  Every answer carries
  ``x-replica-id``.

**Affinity.**  The model deployment routes with Ray's ``ConsistentHashRouter``: a conversation's
requests go to the replica its session id hashes to on a ring every router builds the same way, so its
memory stays live on one replica.  Requests without a session id go to any replica (prefix reuse then
works within each replica).  Why forward whole HTTP requests rather than define a Python API between
the two: every endpoint, error and limit of the single server then behaves identically here, with no
second copy of any of it.

**Failover.**  A replica that dies is replaced by Serve with an empty one.  The ring changes: the dead
replica's conversations move (to the survivors, then partly to the replacement once it is up — and the
replacement, being a new point set on the ring, also takes about a third of a survivor's conversations
with two replicas).  A conversation's new owner does not hold it live, so its pool loads the last
checkpoint from the store and prefills only the tokens after it; the answer is the same as if it had
never moved, because each request carries the whole conversation and the context is cropped to what
it shares with it.  A request that was on the dying replica fails there; the ingress resends
requests that change nothing until answered (chat and text completions, which crop to the request, and
reads), up to ``failover_timeout_s``, and answers 503 for the others.

**Shutdown.**  ``serve.shutdown()`` (or Ctrl-C on ``hcmemory serve --ray``) ends each replica through
its lifespan, which saves every live context, exactly like the single server's shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message

from . import errors
from .app import create_app
from .deps import pinned_context
from .errors import APIError
from .limits import BodyLimit
from .settings import ServeSettings
from .stores import check_reachable, describe

log = logging.getLogger(__name__)

APP_NAME = "hcmemory"
MODEL_DEPLOYMENT = "hcmemory-model"
INGRESS_DEPLOYMENT = "hcmemory-ingress"
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
"""Ray's session-affinity router (Ray >= 2.56): a consistent-hash ring over ``session_id``."""
_CONTEXT_PATH = re.compile(r"^/v1/contexts/([^/]+)")
_RESENDABLE = re.compile(r"^/v1/(chat/)?completions$")
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
"""Headers of the client's connection to the ingress, not of the request the replica answers."""


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the ingress hands it to a model replica (Ray's transport carries it)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


def conversation_of(request: Forwarded) -> str | None:
    """The routing key: the conversation the request pins, as the replica's app will read it (a malformed
    one raises ``APIError`` 400 naming the field, as the replica would)."""
    headers = {name.lower(): value for name, value in request.headers}
    fields: dict[str, Any] = {}
    if request.method == "POST" and request.body:
        try:
            parsed = json.loads(request.body)
        except ValueError:
            parsed = None  # the replica answers 400 invalid_json with its own message
        if isinstance(parsed, dict):
            fields = parsed
    text = {name: value if isinstance(value, str) else None for name, value in fields.items()}
    pinned = pinned_context(headers.get("x-session-id"), text.get("session_id"), text.get("user"))
    if pinned is not None:
        return pinned
    path = _CONTEXT_PATH.match(request.path)
    if path is not None:
        return path.group(1)
    return text.get("id") if request.path == "/v1/contexts" else None


# --------------------------------------------------------------------------------------------
# The model replicas
# --------------------------------------------------------------------------------------------


async def call_app(app: ASGIApp, request: Forwarded, extra_headers: list[tuple[bytes, bytes]]
                   ) -> AsyncIterator[Message]:
    """Run ``request`` through ``app`` in this process and yield its ``http.response.*`` messages.

    Leaving the iteration early (the client went away and Ray cancelled the call) tells the app the
    client disconnected, so a generation in progress ends and its turn is rolled back, as on the
    single server."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra_headers]}
        await messages.put(message)

    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in request.headers
               if name.lower() not in _HOP_HEADERS]
    headers.append((b"content-length", str(len(request.body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query.encode("latin-1"), "root_path": "", "headers": headers,
             "client": None, "server": None, "state": {}}
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
    finally:
        gone.set()
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("the app raised after answering: %r", task.exception())


def _log_to_serve() -> None:
    """hcmemory's log records (checkpoints, restores, shutdown saves) into this replica's Serve log file,
    next to Serve's own: Serve configures only its ``ray.serve`` logger."""
    ours = logging.getLogger("hcmemory")
    if not ours.handlers:
        for handler in logging.getLogger("ray.serve").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)


class ModelReplica:
    """One model replica: the single server's app with its own pools, fed requests by the ingress."""

    async def __init__(self, settings: ServeSettings) -> None:
        _log_to_serve()
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self.app = create_app(settings, self.replica_id)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model and opens the tenants, as at a server's start
        self._closed = False
        log.info("replica %s ready", self.replica_id)

    async def handle(self, request: Forwarded) -> AsyncIterator[tuple[int, list[tuple[str, str]]] | bytes]:
        """The response to ``request``: ``(status, headers)`` first, then the body's pieces."""
        extra = [(b"x-replica-id", self.replica_id.encode())]
        async for message in call_app(self.app, request, extra):
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])

    async def __del__(self) -> None:
        """Serve's graceful shutdown of this replica: save every live context (the app's lifespan end)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        await self._lifespan.__aexit__(None, None, None)


# --------------------------------------------------------------------------------------------
# The ingress
# --------------------------------------------------------------------------------------------


def ingress_app(model: DeploymentHandle, settings: ServeSettings, failover_timeout_s: float) -> FastAPI:
    """The ingress's app: every route forwarded, by conversation, to a model replica."""
    app = FastAPI(title="hcmemory", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"], include_in_schema=False)
    async def forward(request: Request) -> StreamingResponse:
        forwarded = Forwarded(request.method, request.url.path, request.url.query,
                              list(request.headers.items()), await request.body())
        conversation = conversation_of(forwarded)
        resendable = request.method == "GET" or bool(_RESENDABLE.match(request.url.path))
        stream, (status, headers) = await _first(model, forwarded, conversation, resendable, failover_timeout_s)
        kept = {name: value for name, value in headers if name.lower() not in ("transfer-encoding", "connection")}
        return StreamingResponse(_rest(stream), status_code=status, headers=kept)

    return app


async def _first(model: DeploymentHandle, request: Forwarded, conversation: str | None, resendable: bool,
                 timeout_s: float) -> tuple[DeploymentResponseGenerator, tuple[int, list[tuple[str, str]]]]:
    """Send ``request`` to the conversation's replica and wait for its status line; a replica that died
    before answering is tried again (on the replica the ring names now) when the request is resendable."""
    deadline, pause = time.monotonic() + timeout_s, 0.2
    options: dict[str, Any] = {"stream": True}
    if conversation is not None:
        options["session_id"] = conversation
    while True:
        stream = model.options(**options).handle.remote(request)
        try:
            return stream, await stream.__anext__()
        except (RayActorError, ActorUnavailableError) as exc:
            if not resendable or time.monotonic() + pause > deadline:
                raise APIError(503, f"the replica holding this conversation went away ({type(exc).__name__}); its "
                                    "conversations move to the other replicas: retry", None,
                               "replica_unavailable") from exc
            log.info("replica unavailable for conversation %r (%s); resending in %.1f s", conversation,
                     type(exc).__name__, pause)
        except StopAsyncIteration as exc:  # the replica's app failed before its status line (it logged why)
            raise APIError(500, "the model replica failed before answering; see its log", None,
                           "replica_error") from exc
        except asyncio.CancelledError:
            stream.cancel()
            raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


async def _rest(stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The body's pieces; a client that leaves cancels the replica's call (which rolls the turn back)."""
    try:
        async for piece in stream:
            yield piece
    finally:
        stream.cancel()


@serve.ingress()
class Ingress:
    """The HTTP entry point: no model, forwards each request by its conversation."""

    def __init__(self, model: DeploymentHandle, settings: ServeSettings, failover_timeout_s: float) -> None:
        self._model, self._settings, self._timeout = model, settings, failover_timeout_s

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self._model, self._settings, self._timeout)


# --------------------------------------------------------------------------------------------
# Building and running
# --------------------------------------------------------------------------------------------


def build(settings: ServeSettings, replicas: int, replica_cpus: float = 1.0,
          failover_timeout_s: float = 60.0) -> serve.Application:
    """The Serve application: the ingress bound to ``replicas`` model replicas routed by conversation."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"replicas={replicas!r} must be an int >= 1")
    if not isinstance(replica_cpus, (int, float)) or isinstance(replica_cpus, bool) or replica_cpus <= 0:
        raise ValueError(f"replica_cpus={replica_cpus!r} must be a number > 0")
    settings = replace(settings, checkpoint_each_turn=True)
    model = serve.deployment(ModelReplica, name=MODEL_DEPLOYMENT).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=settings.max_pending, graceful_shutdown_timeout_s=120,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
    ).bind(settings)
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT).options(ray_actor_options={"num_cpus": 0})
    return ingress.bind(model, settings, failover_timeout_s)


def run(settings: ServeSettings, replicas: int, replica_cpus: float = 1.0, address: str | None = None) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy, and serve until Ctrl-C or SIGTERM; then
    shut Serve down, which saves every replica's live contexts.  ``ConnectionError`` before anything
    starts when the store's database cannot be reached from here."""
    check_reachable(settings.store)
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings, replicas, replica_cpus), name=APP_NAME, route_prefix="/")
    log.info("serving on http://%s:%d with %d model replicas; stores in %s", settings.host, settings.port, replicas,
             describe(settings.store))
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down: the replicas save their live contexts")
    serve.shutdown()
    ray.shutdown()
