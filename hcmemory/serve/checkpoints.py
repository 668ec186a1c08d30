"""Checkpoints after every turn, off the request path: what lets a conversation outlive its replica.

A turn marks its conversation dirty (on the model thread, when the answer is complete).  A thread of
its own then copies the context's state on the model thread — a job queued behind whatever is running,
so it starts once the answer has gone out — and writes the copy to the tenant's store outside it, so the
model never waits for the database.  Marks are coalesced: a conversation answered twice before its
write comes up is written once, with its latest state.  The state is copied when the write is about to
happen, not when the turn ends, so pending checkpoints hold no memory of their own.

**Store down.**  A write that fails (the database unreachable, the disk full, a lock held too long)
leaves the conversation dirty, the server reports ``degraded`` in ``/health`` and keeps answering from
memory; the writer retries with a growing pause (up to ``max_retry_s``) and catches up on every pending
conversation once a write succeeds.  Nothing stored is lost by a failed write: the store keeps the
previous checkpoint whole (``ContextStore.save_state`` is all or nothing).

**Failover.**  The next owner of a conversation whose replica died loads this checkpoint when the
conversation's next turn reaches it (``ContextPool.get`` reloads ids its store holds) and prefills only
the tokens after it.  A conversation that left memory meanwhile (spilled under the cap) was saved by
the spill itself, so it is skipped here.

**Compare-and-set.**  During a failover two replicas can both hold a conversation live (Ray's ring moves
it to a survivor, then partly to the replacement).  Each write therefore passes the version the copy
continues (``ContextPool.version``: the checkpoint it was loaded from or last wrote; 0 for a new
conversation) as ``expected_version``.  A write the store refuses (``StaleCheckpointError``: the other
replica saved since) is not retried and not merged: this replica drops its live copy without saving it
(``ContextPool.discard``), and the conversation's next turn here loads the newer checkpoint.  A refusal
proves the store reachable, so it does not make the server degraded; ``/health`` counts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..checkpoint import ContextState
from ..pool import ContextPool
from ..stores import StaleCheckpointError

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""``(tenant, context id)``."""
Snapshot = Callable[[str, str], "tuple[ContextPool, ContextState, int] | None"]
"""Runs on the model thread: the tenant's pool, a copy of the context's state and the stored version it
continues, or None when the context is no longer live (spilled, which saved it, or deleted)."""


@dataclass(frozen=True)
class CheckpointStatus:
    """What ``/health`` reports about the checkpoints."""

    store: str
    """``ok``, or ``degraded`` while the last write failed (answers still come from memory)."""
    pending: int
    """Conversations answered since their last successful checkpoint."""
    written: int
    refused: int
    """Writes the store refused because another writer had saved the conversation since (its copy here
    was dropped)."""
    last_error: str | None
    last_write_ms: float | None
    """How long the last successful write took (state copy excluded)."""


class Checkpointer:
    """The writer thread and its queue of dirty conversations."""

    def __init__(self, snapshot: Snapshot, on_model_thread: Callable[[Callable[[], object]], Future],
                 retry_s: float = 0.5, max_retry_s: float = 30.0) -> None:
        self._snapshot, self._on_model_thread = snapshot, on_model_thread
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._dirty: OrderedDict[Key, None] = OrderedDict()
        self._writing: Key | None = None
        """The conversation being written now: still pending until its write has succeeded."""
        self._wake = threading.Condition()
        self._closing = False
        self._written = 0
        self._refused = 0
        self._error: str | None = None
        self._write_ms: float | None = None
        self._thread = threading.Thread(target=self._loop, name="hcmemory-checkpoints", daemon=True)
        self._thread.start()

    def mark(self, tenant: str, context_id: str) -> None:
        """``context_id`` of ``tenant`` finished a turn: write its state soon (its latest, once)."""
        with self._wake:
            self._dirty[tenant, context_id] = None
            self._wake.notify()

    def status(self) -> CheckpointStatus:
        with self._wake:
            pending = len(self._dirty) + (self._writing is not None and self._writing not in self._dirty)
            return CheckpointStatus("degraded" if self._error else "ok", pending, self._written, self._refused,
                                    self._error, self._write_ms)

    def close(self, timeout: float = 30.0) -> None:
        """End the writer after the write in progress (the server's shutdown then saves every live
        context itself, so what is still pending here is not lost)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the checkpoint writer did not end within %.0f s", timeout)

    def _loop(self) -> None:
        pause = self.retry_s
        while True:
            with self._wake:
                while not self._dirty and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                key, _ = self._dirty.popitem(last=False)
                self._writing = key
            written = self._write(key)
            with self._wake:
                self._writing = None
                if written:
                    pause = self.retry_s
                    continue
                self._dirty.setdefault(key, None)  # a newer mark may have put it back already
                retry_at = time.monotonic() + pause  # new marks wake the thread: wait the pause out anyway
                while not self._closing and (left := retry_at - time.monotonic()) > 0:
                    self._wake.wait(left)
            pause = min(pause * 2, self.max_retry_s)

    def _failed(self, context_id: str, exc: Exception) -> bool:
        with self._wake:
            first = self._error is None
            self._error = _public_reason(exc)
        (log.warning if first else log.debug)("checkpoint of context %r failed (%s); serving from memory and "
                                              "retrying", context_id, exc)
        return False

    def _write(self, key: Key) -> bool:
        """Copy and store one conversation's state; False (and degraded) when the store refused it."""
        tenant, context_id = key
        try:
            copied = self._on_model_thread(lambda: self._snapshot(tenant, context_id))
        except RuntimeError:  # the model thread has ended: the server is shutting down and saves them itself
            return True
        try:
            found = copied.result()
        except OSError as exc:  # the copy's pool spilled others under its cap, into a store that is down
            return self._failed(context_id, exc)
        except Exception:  # noqa: BLE001 - a context that cannot be copied is not the store's fault: not retried
            log.exception("could not copy context %r for its checkpoint", context_id)
            return True
        if found is None:
            return True
        pool, state, version = found
        started = time.perf_counter()
        try:
            saved = pool.save_state(context_id, state, version)
        except StaleCheckpointError as exc:
            self._drop(pool, context_id, version, exc)
            saved = None
        except Exception as exc:  # noqa: BLE001 - any failure of the store: retried, never fatal to serving
            return self._failed(context_id, exc)
        with self._wake:
            if self._error is not None:
                log.warning("the store takes checkpoints again; catching up on %d conversations", len(self._dirty))
            self._error = None
            if saved is not None:
                self._written += 1
                self._write_ms = (time.perf_counter() - started) * 1000
        return True

    def _drop(self, pool: ContextPool, context_id: str, version: int, exc: StaleCheckpointError) -> None:
        """Another writer saved ``context_id`` since this copy's version: drop the live copy without saving
        it (on the model thread), unless the pool has moved on from that version meanwhile."""
        log.warning("checkpoint of context %r refused, its live copy here is dropped: %s", context_id, exc)
        with self._wake:
            self._refused += 1

        def drop() -> None:
            if context_id in pool.live_ids and pool.version(context_id) == version:
                pool.discard(context_id)

        try:
            dropped = self._on_model_thread(drop)
        except RuntimeError:  # the model thread has ended: the copy goes with the process
            return
        try:
            dropped.result()
        except Exception:  # noqa: BLE001 - the writer thread must go on with the other conversations
            log.exception("could not drop the stale copy of context %r", context_id)


def _public_reason(exc: Exception) -> str:
    """What ``/health`` (which needs no key) may say about a failed write: the kind of failure, never the
    store's path, host or user, which the log has."""
    if isinstance(exc, ConnectionError):
        return "ConnectionError: the store cannot be reached"
    if isinstance(exc, TimeoutError):
        return "TimeoutError: the store stayed busy"
    if isinstance(exc, OSError):
        return "OSError: the store refused the write (disk full, read-only or unreachable)"
    return f"{type(exc).__name__}: the store refused the write"
