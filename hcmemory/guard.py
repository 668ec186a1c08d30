"""One call at a time on a context, and a clear error instead of a deadlock or a corrupted state.

A context's calls change one live state, so they are serialized: a second thread waits its turn.
The thread that is already inside a call — typically the body of a ``for piece in ctx.stream(...)``
loop, while the stream holds the context and an open transaction — gets ``ContextBusyError``
instead: letting it in would append to a state that is about to be rolled back, fork an overlay,
or save a half-finished turn.

A plain ``Lock``, not an ``RLock``: a stream generator may be resumed and closed by another thread
than the one that started it (LangChain runs async streams in a thread pool), and an ``RLock``
cannot be released by another thread.  So the owner is tracked here and updated whenever a
stream resumes.

Lock order, for everything in hcmemory: a context's guard, then a ``ContextPool`` lock, then a
``ContextStore`` lock.  The pool and the store never *wait* for a guard while holding their own
lock: they only try it (the pool's memory cap skips a busy context), or wait for it first and
lock inside it (``ContextPool.spill``/``close`` save from the context's own spill step, with the
pool's and the store's locks taken under its guard), or copy the context's state before locking
(``save``).  User code holding a context (inside a stream loop) may therefore call into the pool
or the store, and another thread may spill that context meanwhile, without deadlocking.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ContextBusyError(RuntimeError):
    """A context was called from inside one of its own calls on the same thread (e.g. in a stream loop)."""


class CallGuard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._call = ""

    def acquire(self, call: str, blocking: bool = True) -> bool:
        """Enter ``call``; False only when ``blocking=False`` and another call is in progress."""
        if self._owner == threading.get_ident():
            if not blocking:
                return False
            raise ContextBusyError(
                f"HCContext.{call}() was called while {self._call}() is still in progress on this context from the "
                "same thread (inside a stream() loop?); finish or close that call first, or fork() the context "
                "beforehand and use the fork")
        if not self._lock.acquire(blocking):
            return False
        self._owner, self._call = threading.get_ident(), call
        return True

    def release(self) -> None:
        self._owner, self._call = None, ""
        self._lock.release()

    def resumed(self) -> None:
        """A generator holding the guard was resumed, maybe on another thread: that thread owns it now."""
        self._owner = threading.get_ident()

    @contextmanager
    def hold(self, call: str) -> Iterator[None]:
        self.acquire(call)
        try:
            yield
        finally:
            self.release()
