"""The FastAPI application behind ``hcmemory serve``, and the function that runs it under uvicorn.

``create_app(settings)`` builds the app; the model loads in its lifespan (in a thread: the event loop
stays free, and requests arriving meanwhile get 503) and, on shutdown, every tenant's live contexts are
saved to its store before the model thread ends, so a restart resumes every conversation from its store
without prefilling it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from . import errors
from .limits import BodyLimit
from .routers import completions, contexts, health
from .server import Server
from .settings import ServeSettings
from .stores import check_reachable, describe

log = logging.getLogger(__name__)


def create_app(settings: ServeSettings | None = None, replica_id: str | None = None) -> FastAPI:
    """The app; ``replica_id`` names the Ray Serve replica it runs in (``cluster.py``), else None."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = await asyncio.to_thread(Server.start, settings, replica_id)
        app.state.server = server
        log.info("serving %s (preset %s) with stores in %s%s", server.model_id, settings.preset,
                 describe(settings.store), "" if settings.api_keys else "; no API keys: tenants come from x-tenant-id")
        try:
            yield
        finally:
            app.state.server = None
            await server.close()
            log.info("saved the live contexts and closed")

    app = FastAPI(title="hcmemory", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible server whose conversations keep a compressed KV memory.")
    app.state.server = None
    errors.install(app)
    app.include_router(health.router)
    app.include_router(completions.router)
    app.include_router(contexts.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def serve(settings: ServeSettings) -> None:
    """Run the server until interrupted (Ctrl-C or SIGTERM, which save the live contexts first).
    ``ConnectionError`` before anything starts when the store's database cannot be reached."""
    check_reachable(settings.store)
    if settings.exposed and not settings.api_keys:
        log.warning("listening on %s without API keys: anyone who can reach it can read and write every "
                    "tenant's memory by naming it in x-tenant-id; pass --api-key", settings.host)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)
