"""One thread runs every model call, in arrival order; the event loop never waits on the model.

Why one thread rather than the pool's locks: there is one model, and two generations interleaved on
two CPU threads would each run at half speed while holding two contexts; run one after the other, the
first answer arrives sooner and no context is ever held by two calls.  It also makes every pool and
context operation single-threaded, so a tenant's pool can be closed or a context spilled between two
jobs without waiting for anyone.  A streamed generation runs as one job from prefill to its last token,
pushing pieces to the event loop as they form; the client reads them at its own pace without holding
the model.  ``max_pending`` bounds the queue: one more job is refused with 429.

Cancellation: a ``Run`` carries an event the worker checks before a job starts and after every piece,
so a client that disconnects (its SSE stream closed, or its plain request dropped) ends the generation
within a token or two; the pool's ``Generation.close`` then rolls the turn back and releases the context.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ..decoding import GenerationInfo
from .errors import APIError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


@dataclass
class WorkerCounts:
    """What /health reports about the model thread."""

    pending: int = 0
    finished: int = 0
    """Jobs ended, cancelled ones included."""
    cancelled: int = 0


class Run:
    """One streamed job: iterate it (``async for``) for its text pieces; ``info`` is the generation's cost,
    complete once the iteration has ended; ``cancel()`` ends it within a piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._future: asyncio.Future[None] | None = None
        self.cancelled = threading.Event()
        self.info: GenerationInfo | None = None
        self.headers: dict[str, str] = {}
        """Response headers the job adds (set before its first piece, so a stream's headers carry them)."""

    def emit(self, piece: str) -> None:
        """Called on the model thread with each new piece of text."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)

    def cancel(self) -> None:
        self.cancelled.set()

    def _attach(self, future: asyncio.Future[None]) -> None:
        self._future = future
        future.add_done_callback(lambda _: self._queue.put_nowait(_DONE))  # after every emit: both go through the loop

    def __aiter__(self) -> "Run":
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _DONE:
            assert self._future is not None
            self._future.result()  # the job's error, if it failed
            raise StopAsyncIteration
        return item  # type: ignore[return-value]


class ModelWorker:
    """The model thread and its bounded queue."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.counts = WorkerCounts()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hcmemory-model")
        self._closed = False

    async def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the model thread and return its result (its exception is raised here)."""
        return await self._submit(job)

    def stream(self, job: Callable[[Run], None]) -> Run:
        """Start ``job`` on the model thread; it emits pieces into the returned ``Run``."""
        run = Run(asyncio.get_running_loop())

        def counted() -> None:
            job(run)
            if run.cancelled.is_set():
                self.counts.cancelled += 1

        run._attach(self._submit(counted))
        return run

    def background(self, job: Callable[[], T]) -> Future[T]:
        """Queue ``job`` on the model thread from another thread (the checkpoint writer), behind the jobs
        already queued; not counted against ``max_pending``, which bounds clients' calls.  Raises
        ``RuntimeError`` once the thread has ended."""
        return self._executor.submit(job)

    def _submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        if self._closed:
            raise APIError(503, "the server is shutting down; retry against another instance or after it restarts",
                           None, "shutting_down")
        if self.counts.pending >= self.max_pending:
            raise APIError(429, f"{self.counts.pending} model calls are already queued or running (the limit is "
                                f"{self.max_pending}); retry shortly", None, "rate_limit_exceeded")
        self.counts.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: asyncio.Future[object]) -> None:
        self.counts.pending -= 1
        self.counts.finished += 1

    async def close(self, last: Callable[[], None]) -> None:
        """Refuse new jobs, let the queued ones finish, run ``last`` (saving the live contexts) on the model
        thread, and end the thread."""
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, last)
        finally:
            self._executor.shutdown(wait=True)
