"""The memory endpoints, beyond OpenAI's: a conversation's context as a resource of its tenant.

``POST /v1/contexts`` creates one (with a preset), ``/documents`` reads text into it once (no later call
prefills it again), ``/ask`` answers a question in an overlay that leaves the context unchanged, ``/fork``
branches it, ``GET`` reports its size and compression, ``/checkpoint`` saves it to the tenant's store
now, ``DELETE`` removes it from memory and store.  A context id is also a session id: a chat request
sent with ``x-session-id: <id>`` continues that context.  Another tenant asking for the same id gets 404:
its pool and store are its own (``tenants.py``).

Every operation runs on the pool thread (``worker.py``), one at a time; an answer's token loop runs on a
generation thread, in the model's batch.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from ...config import HCConfig
from ...context import HCContext
from ...decoding import Generation
from ...pool import ContextPool
from ...stores import ContextStore, StaleCheckpointError
from ..deps import CallerDep, ServerDep, get_caller
from ..errors import APIError, library_errors, stale_message
from ..generation import collect, max_new_tokens, usage
from ..schemas import (CONTEXT_ID_PATTERN, Answer, AskRequest, Checkpoint, ContextCreate, ContextInfo, Deleted,
                       DocumentsAdded, DocumentsAppend, ErrorResponse, ForkRequest)
from ..server import Server
from ..worker import Run

router = APIRouter(prefix="/v1/contexts", tags=["contexts"], dependencies=[Depends(get_caller)],
                   responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 503)})
ContextId = Annotated[str, Path(pattern=CONTEXT_ID_PATTERN, description="the context (or session) id")]


def _store(pool: ContextPool) -> ContextStore:
    if pool.store is None:  # every tenant's pool is made with its store (tenants.py)
        raise RuntimeError("a tenant's pool has no store")
    return pool.store


def _existing(pool: ContextPool, context_id: str) -> HCContext:
    if context_id not in pool:
        raise APIError(404, f"no context {context_id!r} for this tenant (contexts are per API key or x-tenant-id); "
                            "create it with POST /v1/contexts", "context_id", "context_not_found")
    return pool.get(context_id)


def _new_id(pool: ContextPool, requested: str | None) -> str:
    context_id = requested or uuid.uuid4().hex
    if context_id in pool:
        raise _exists(context_id)
    return context_id


def _exists(context_id: str) -> APIError:
    return APIError(409, f"a context {context_id!r} already exists for this tenant; pick another id or leave it out "
                         "for a random one", "id", "context_exists")


def _save_new(pool: ContextPool, ctx: HCContext) -> None:
    """Store a new context as its first checkpoint (the pool then loads it): ``expected_version=0``, so that
    of two replicas creating the same id at once, the second is refused rather than replacing the first."""
    try:
        _store(pool).save(ctx, expected_version=0)
    except StaleCheckpointError as exc:
        raise _exists(ctx.context_id) from exc


def _preset(config: HCConfig) -> str | None:
    return next((name for name in HCConfig.presets() if HCConfig.preset(name) == config), None)


def _info(server: Server, ctx: HCContext, include_text: bool = False) -> ContextInfo:
    stats = ctx.stats()
    return ContextInfo(id=ctx.context_id, tokens=len(ctx), tokens_prefilled=stats.tokens_prefilled,
                       preset=_preset(ctx.config), config=ctx.config.to_dict(), stats=stats.as_dict(),
                       text=server.tokenizer.decode(ctx.token_ids) if include_text else None)


@router.post("", status_code=201)
async def create_context(body: ContextCreate, server: ServerDep, caller: CallerDep) -> ContextInfo:
    with library_errors("preset"):
        config = HCConfig.from_spec(body.preset) if body.preset else server.config

    def job() -> ContextInfo:
        pool = server.tenants.pool(caller.tenant)
        context_id = _new_id(pool, body.id)
        # Created in the store, then made live by the pool: a pool builds new contexts with its own
        # preset only, and the stored copy makes the new context durable from the start.
        _save_new(pool, HCContext(server.model, server.tokenizer, config, context_id))
        return _info(server, pool.get(context_id))

    return await server.worker.call(job)


@router.get("/{context_id}")
async def get_context(context_id: ContextId, server: ServerDep, caller: CallerDep,
                      include_text: Annotated[bool, Query(description="also return the decoded context")] = False
                      ) -> ContextInfo:
    def job() -> ContextInfo:
        pool = server.tenants.pool(caller.tenant)
        info = _info(server, _existing(pool, context_id), include_text)
        server.tenants.enforce_cap(caller.tenant)
        return info

    return await server.worker.call(job)


@router.post("/{context_id}/documents")
async def append_documents(context_id: ContextId, body: DocumentsAppend, server: ServerDep,
                           caller: CallerDep) -> DocumentsAdded:
    texts = [body.text] if isinstance(body.text, str) else body.text
    if not any(text.strip() for text in texts):
        raise APIError(400, "text is empty; send the document's text", "text", "invalid_value")

    def job() -> DocumentsAdded:
        pool = server.tenants.pool(caller.tenant)
        ctx = _existing(pool, context_id)
        with library_errors("text"):
            added = ctx.append(texts, raw=body.raw)
        server.tenants.enforce_cap(caller.tenant)
        return DocumentsAdded(**_info(server, ctx).model_dump(), tokens_added=added)

    return await server.worker.call(job)


@router.post("/{context_id}/ask")
async def ask(context_id: ContextId, body: AskRequest, request: Request, server: ServerDep,
              caller: CallerDep) -> Answer:
    limit = max_new_tokens(body.max_tokens, server.settings, "max_tokens")

    def start() -> Generation:
        pool = server.tenants.pool(caller.tenant)
        ctx = _existing(pool, context_id)
        with library_errors("question"):
            return ctx.stream(body.question, commit=False, max_new_tokens=limit, temperature=body.temperature,
                              stop=body.stop, seed=body.seed)

    def job(run: Run) -> None:  # on a generation thread, the answer's steps in the model's batch
        generation = run.in_order(start)
        run.info = generation.info
        try:
            for piece in generation:
                run.emit(piece)
                if run.gone():
                    break
        finally:
            generation.close()

    run = server.worker.stream(job)
    answer = await collect(run, request)
    info = run.info
    if info is None:
        raise APIError(503, "the request was dropped before it ran", None, "cancelled")
    return Answer(id=context_id, answer=answer, finish_reason=info.finish_reason, usage=usage(info))


@router.post("/{context_id}/fork", status_code=201)
async def fork(context_id: ContextId, body: ForkRequest, server: ServerDep, caller: CallerDep) -> ContextInfo:
    def job() -> ContextInfo:
        pool = server.tenants.pool(caller.tenant)
        source = _existing(pool, context_id)
        twin_id = _new_id(pool, body.id)
        # The pool adopts contexts only through its store, so the fork is saved there and loaded back.
        _save_new(pool, source.fork(twin_id))
        info = _info(server, pool.get(twin_id))
        server.tenants.enforce_cap(caller.tenant)
        return info

    return await server.worker.call(job)


@router.post("/{context_id}/checkpoint")
async def checkpoint(context_id: ContextId, server: ServerDep, caller: CallerDep) -> Checkpoint:
    def job() -> Checkpoint:
        pool = server.tenants.pool(caller.tenant)
        _existing(pool, context_id)
        try:
            pool.save(context_id)
        except StaleCheckpointError as exc:  # this copy is older than the stored one: it must not answer again
            pool.discard(context_id)
            raise APIError(409, stale_message(exc), "context_id", "stale_checkpoint") from exc
        return Checkpoint(id=context_id, checkpoints=_store(pool).checkpoints(context_id))

    return await server.worker.call(job)


@router.delete("/{context_id}")
async def delete_context(context_id: ContextId, server: ServerDep, caller: CallerDep) -> Deleted:
    def job() -> Deleted:
        pool = server.tenants.pool(caller.tenant)
        if context_id not in pool:
            raise APIError(404, f"no context {context_id!r} for this tenant", "context_id", "context_not_found")
        pool.delete(context_id)
        return Deleted(id=context_id)

    return await server.worker.call(job)
