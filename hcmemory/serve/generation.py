"""Turning an OpenAI request into one pool generation (started and finished on the pool thread, decoded on
a generation thread in the model's batch, ``worker.py``), and its result back into OpenAI's JSON or
server-sent events.

An answer under a constraint (tools, ``response_format``) that the token budget ends before the
grammar is complete is answered, as OpenAI answers a cut JSON-mode reply, with ``finish_reason:
"length"`` and the text as far as it went (the turn is not committed to the context); it is never
turned into a tool call, whose arguments would not parse.

``cached_tokens`` is the pool's own count of prompt tokens it did not prefill (``tokens_reused``: the
prefix served from the live context, or from its stored checkpoint when it was spilled), so it is as
true as the pool's bookkeeping: a turn that was prefilled from scratch reports 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request

from ..constrained import Constraint, IncompleteOutput
from ..decoding import Generation, GenerationInfo, compile_for
from .errors import APIError, error_body, library_errors
from .schemas import PromptTokensDetails, Sampled, Usage
from .server import Server
from .settings import ServeSettings
from .worker import Run

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}
"""hcmemory's reasons in OpenAI's words (a decoding timeout ends an answer the way a length limit does)."""


@dataclass(frozen=True)
class Turn:
    """One generation, as the worker runs it."""

    tenant: str
    prompt: Callable[[], list[int]]
    """Tokenizes the prompt, on the pool thread (the tokenizer's encoder is not shared across threads)."""
    context_id: str | None
    max_new_tokens: int
    temperature: float
    stop: list[str] | None
    seed: int | None
    param: str
    """The request field the prompt came from (``messages`` or ``prompt``), named by errors about it."""
    constraint: Constraint | None = None
    """What the answer must look like (tool calls, a JSON schema), enforced by the decode loop's mask."""
    constraint_param: str | None = None
    """The request field the constraint came from, named when the grammar engine cannot build it."""


def turn_of(body: Sampled, settings: ServeSettings, tenant: str, prompt: Callable[[], list[int]],
            context_id: str | None, param: str, constraint: Constraint | None = None,
            constraint_param: str | None = None) -> Turn:
    """Check the sampling fields of ``body`` against what this server honours, naming the field refused."""
    refuse = {"n": body.n not in (None, 1), "top_p": body.top_p not in (None, 1.0),
              "presence_penalty": body.presence_penalty not in (None, 0.0),
              "frequency_penalty": body.frequency_penalty not in (None, 0.0)}
    for field, refused in refuse.items():
        if refused:
            raise APIError(400, f"{field}={getattr(body, field)!r} is not supported by this server (it samples one "
                                "answer by temperature alone); leave it out", field, "unsupported_parameter")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; send one of them", "max_tokens",
                       "invalid_value")
    if body.max_completion_tokens is not None:
        max_tokens = max_new_tokens(body.max_completion_tokens, settings, "max_completion_tokens")
    else:
        max_tokens = max_new_tokens(body.max_tokens, settings, "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and (len(stop) > 4 or any(not s for s in stop)):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop", "invalid_value")
    return Turn(tenant, prompt, context_id, max_tokens, body.temperature or 0.0, stop or None, body.seed, param,
                constraint, constraint_param)


def max_new_tokens(requested: int | None, settings: ServeSettings, name: str) -> int:
    """``requested`` checked against the server's limit (400 naming ``name``), or the default."""
    if requested is None:
        return min(settings.default_max_tokens, settings.max_tokens_limit)
    if requested > settings.max_tokens_limit:
        raise APIError(400, f"{name}={requested} is over this server's limit of {settings.max_tokens_limit}; ask "
                            "for fewer tokens (or start the server with a larger --max-tokens-limit)", name,
                       "invalid_value")
    return requested


def generate(server: Server, turn: Turn, run: Run) -> None:
    """On a generation thread: answer ``turn`` from its tenant's pool, emitting pieces into ``run`` until the
    answer ends or the run is cancelled (then the pool rolls the turn back and releases the context).  The
    answer's steps run in the model's batch; everything that touches the pool runs on the pool thread.

    A pinned conversation that is not live here but stored (spilled, or answered by another replica
    before) is loaded first, timed apart from the prefill: ``x-restore-ms`` says what the load cost.
    With per-turn checkpoints on, a pinned conversation is marked for its checkpoint afterwards.

    A constraint is built first (cached per schema), so one the grammar engine cannot build is a 400
    naming its field before any context changes; an answer it cuts short ends as ``length`` (module
    docstring)."""
    if run.gone():
        return
    generation = run.in_order(lambda: _start(server, turn, run))
    run.info = generation.info
    emitted = 0
    try:
        for piece in generation:
            run.emit(piece)
            emitted += len(piece)
            if run.gone():
                log.info("client gone: generation on context %r ended after %d pieces", generation.info.context_id,
                         generation.info.completion_tokens)
                break
    except IncompleteOutput as cut:  # the budget ran out inside the constrained answer (the serve loop has no timeout)
        if cut.text[emitted:]:
            run.emit(cut.text[emitted:])
        generation.info.finish_reason = "length"
        generation.info.completion_tokens = turn.max_new_tokens  # the mask allows no end before the grammar's
    finally:
        generation.close()
    run.in_order(lambda: _finish(server, turn))


def _start(server: Server, turn: Turn, run: Run) -> Generation:
    """On the pool thread: the request checked, its context opened, its generation handed out."""
    pool = server.tenants.pool(turn.tenant)
    with library_errors(turn.constraint_param):
        compile_for(server.model, server.tokenizer, turn.constraint)
    with library_errors(turn.param):
        prompt = turn.prompt()
        if turn.context_id is not None and turn.context_id not in pool.live_ids and turn.context_id in pool:
            started = time.perf_counter()
            pool.get(turn.context_id)
            run.headers["x-restore-ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
        return pool.generate(prompt, turn.context_id, max_new_tokens=turn.max_new_tokens,
                             temperature=turn.temperature, stop=turn.stop, seed=turn.seed,
                             constraint=turn.constraint)


def _finish(server: Server, turn: Turn) -> None:
    """On the pool thread, once the answer has ended: its checkpoint mark and the memory cap."""
    if server.checkpointer is not None and turn.context_id is not None:
        server.checkpointer.mark(turn.tenant, turn.context_id)
    server.tenants.enforce_cap(turn.tenant)


def usage(info: GenerationInfo) -> Usage:
    return Usage(prompt_tokens=info.prompt_tokens, completion_tokens=info.completion_tokens,
                 total_tokens=info.prompt_tokens + info.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=info.tokens_reused))


def finish_reason(info: GenerationInfo) -> str | None:
    return FINISH_REASONS.get(info.finish_reason or "")


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body has been read, so the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@asynccontextmanager
async def watching(request: Request, run: Run) -> AsyncIterator[None]:
    """Cancel ``run`` if the client disconnects while the block awaits it; a failure in the block cancels it too."""
    watcher = asyncio.create_task(_disconnected(request))
    watcher.add_done_callback(lambda task: task.cancelled() or run.cancel())
    try:
        yield
    except BaseException:
        run.cancel()
        raise
    finally:
        watcher.cancel()


async def collect(run: Run, request: Request) -> str:
    """The whole answer (a plain, non-streamed request)."""
    async with watching(request, run):
        return "".join([piece async for piece in run])


async def first_piece(run: Run, request: Request) -> str | None:
    """Wait for the first piece (None: the answer ended empty) before a stream's headers go out, so that
    an error in the prompt is answered with its status code rather than inside a 200 stream."""
    async with watching(request, run):
        async for piece in run:
            return piece
    return None


def sse(data: object) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def events(run: Run, first: str | None, chunks: Callable[[str | None, str | None], list[dict]],
                 include_usage: bool, usage_chunk: Callable[[Usage], dict]) -> AsyncIterator[str]:
    """The SSE body: the chunks of each piece (none while a piece is held back), the finishing chunks, the
    usage chunk when asked, ``[DONE]``.  Leaving early (the client closed the stream and Starlette cancelled
    this) cancels the generation."""
    try:
        if first is not None:
            for frame in chunks(first, None):
                yield sse(frame)
            async for piece in run:
                for frame in chunks(piece, None):
                    yield sse(frame)
        info = run.info or GenerationInfo()
        for frame in chunks(None, finish_reason(info) or "stop"):
            yield sse(frame)
        if include_usage:
            yield sse(usage_chunk(usage(info)))
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - the status line has gone out: the error goes in the stream
        log.exception("streamed generation failed")
        yield sse(error_body(500, f"internal error ({type(exc).__name__}); the server logged the traceback"))
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
