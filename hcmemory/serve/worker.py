"""Two kinds of threads: one pool thread (the "model thread" other modules name) runs every pool and context operation in arrival order, and up to
``generations`` generation threads run the token loops of streamed answers, whose forwards all go through
the model's one ``Batcher`` (``batching.py``).  The event loop never waits on the model.

Why one pool thread: it makes every pool and tenant operation single-threaded, so a tenant's pool can be
closed or a context spilled between two jobs without waiting for anyone, and a context is never opened,
spilled or saved by two jobs at once.  Why several generation threads: there is one model, and the
decode steps of concurrent answers share its forward — the weights are read once per step for all of
them, each answer bit-for-bit the one it gets alone — so eight conversations cost about as much per step
as two, where one thread per answer in turn would make the eighth wait for seven whole answers.  A
newcomer's prefill runs a chunk at a time between the others' steps.  A streamed job starts (tokenizes,
opens its context, checks the request) and finishes (checkpoint mark, memory cap) on the pool thread
(``Run.in_order``); only the answer's loop runs on its generation thread, pushing pieces to the event loop
as they form; the client reads them at its own pace without holding the model.  ``max_pending`` bounds
the jobs queued or running: one more is refused with 429.

Cancellation: a ``Run`` carries an event the job checks before it starts and after every piece,
so a client that disconnects (its SSE stream closed, or its plain request dropped) ends the generation
within a token or two; the pool's ``Generation.close`` then rolls the turn back, releases the context and
leaves the batch.
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
    """What /health reports about the pool and generation threads."""

    pending: int = 0
    finished: int = 0
    """Jobs ended, cancelled ones included."""
    cancelled: int = 0


class Run:
    """One streamed job: iterate it (``async for``) for its text pieces; ``info`` is the generation's cost,
    complete once the iteration has ended; ``cancel()`` ends it within a piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop, in_order: Callable[[Callable[[], T]], T],
                 count_cancelled: Callable[[], None]) -> None:
        self._loop = loop
        self.in_order = in_order
        """Run a function on the pool thread, behind the jobs queued there, and return its result (called
        from the generation thread for the job's pool and context operations)."""
        self._count_cancelled = count_cancelled
        self._counted = False
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._future: asyncio.Future[None] | None = None
        self.cancelled = threading.Event()
        self.info: GenerationInfo | None = None
        self.headers: dict[str, str] = {}
        """Response headers the job adds (set before its first piece, so a stream's headers carry them)."""

    def emit(self, piece: str) -> None:
        """Called on the generation thread with each new piece of text."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)

    def cancel(self) -> None:
        self.cancelled.set()

    def gone(self) -> bool:
        """Whether the run was cancelled; the first time it says so the run is counted as cancelled — the job
        asks before it releases its context, so a request that waits for the context sees the count."""
        if not self.cancelled.is_set():
            return False
        if not self._counted:
            self._counted = True
            self._count_cancelled()
        return True

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


DEFAULT_GENERATIONS = 8
"""Answers decoded at once (batched into one forward per step); more wait for a generation thread."""


class ModelWorker:
    """The pool thread, the generation threads and their bounded queue."""

    def __init__(self, max_pending: int, generations: int = DEFAULT_GENERATIONS) -> None:
        if not isinstance(generations, int) or generations < 1:
            raise ValueError(f"generations={generations!r} must be an int >= 1")
        self.max_pending = max_pending
        self.counts = WorkerCounts()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hcmemory-model")
        self._generations = ThreadPoolExecutor(max_workers=generations, thread_name_prefix="hcmemory-generation")
        self._closed = False
        self._lock = threading.Lock()

    async def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the pool thread and return its result (its exception is raised here)."""
        return await self._submit(job, self._executor)

    def stream(self, job: Callable[[Run], None]) -> Run:
        """Start ``job`` on a generation thread; it emits pieces into the returned ``Run`` and runs its pool and
        context operations through ``Run.in_order``."""
        run = Run(asyncio.get_running_loop(), lambda work: self._executor.submit(work).result(), self._count_cancelled)

        def counted() -> None:
            try:
                job(run)
            finally:
                run.gone()  # counted here unless the job saw the cancellation itself

        run._attach(self._submit(counted, self._generations))
        return run

    def _count_cancelled(self) -> None:
        with self._lock:  # from the generation threads
            self.counts.cancelled += 1

    def background(self, job: Callable[[], T]) -> Future[T]:
        """Queue ``job`` on the pool thread from another thread (the checkpoint writer), behind the jobs
        already queued; not counted against ``max_pending``, which bounds clients' calls.  Raises
        ``RuntimeError`` once the thread has ended."""
        return self._executor.submit(job)

    def _submit(self, job: Callable[[], T], executor: ThreadPoolExecutor) -> asyncio.Future[T]:
        if self._closed:
            raise APIError(503, "the server is shutting down; retry against another instance or after it restarts",
                           None, "shutting_down")
        if self.counts.pending >= self.max_pending:
            raise APIError(429, f"{self.counts.pending} model calls are already queued or running (the limit is "
                                f"{self.max_pending}); retry shortly", None, "rate_limit_exceeded")
        self.counts.pending += 1
        future = asyncio.get_running_loop().run_in_executor(executor, job)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: asyncio.Future[object]) -> None:
        self.counts.pending -= 1
        self.counts.finished += 1

    async def close(self, last: Callable[[], None]) -> None:
        """Refuse new jobs, let the queued ones finish (the answers first: they finish on the pool thread), run
        ``last`` (saving the live contexts) on the pool thread, and end the threads."""
        self._closed = True
        try:
            await asyncio.to_thread(self._generations.shutdown, wait=True)
            await asyncio.get_running_loop().run_in_executor(self._executor, last)
        finally:
            self._executor.shutdown(wait=True)
