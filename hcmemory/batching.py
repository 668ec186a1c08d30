"""Batched decode across contexts: the decode steps of several live contexts as one forward.

A memory server serves many conversations at once.  Decoded one after the other, each step of each
conversation reads all the weights; decoded together, one forward reads them once for every
conversation in the batch.  Everything else stays per conversation: each member keeps its own
``HCCache`` (its preset, codecs, selection, host rows), its query row attends over its own state only,
and RoPE gets each member's own position, so contexts of different lengths share a step without any
KV padding.

**The forward** (``batched_step``): one token per member, as a ``(rows, 1)`` batch.  ``_StepCache`` is
the transformers ``Cache`` the model sees; its ``update`` splits the batch's keys and values row by
row into each member's ``HCCache.update`` and hands the attention function one ``glue.BatchedLayers``
(verified like a single layer), which runs ``attention.attend`` per member on its query row.

**Exact against running alone.**  A conversation decoded alone runs through the same function, as a
batch of one.  A batch always runs as a multiple of ``STABLE_ROWS`` rows (padding rows attend to nothing
and are dropped): the BLAS computes rows in blocks of four, and a row's block is then computed by the same
kernel whatever the other rows hold and wherever the row sits, so each member's logits are bit-for-bit
those of decoding it alone.  Other widths mix kernels: a single row runs as a matrix-vector product, and
a remainder of one to three rows another way, so those rows would differ in the last bits (measured on
MKL, fp32, one and two threads: a batch of 6 rows padded only to 6 put members 5 and 6 1e-3 off, padded
to 8 every member is identical; ``tests/test_batching.py`` checks the logits end to end).

**Failures stay with their member.**  A member whose update or attention raises is skipped for the
rest of the forward (its row attends to nothing) and gets its error back; the others get their
logits, unaffected, since rows never mix.  The failing member's own turn transaction then rolls its
partial step back.  An error outside the per-member parts (a weight matmul) fails the step for every
member, and each member's turn is rolled back.

**Continuous batching** (``Batcher``): one model thread runs every forward of the contexts that use it.
A generation joins as a decoder for its decode loop (``decoding``) and leaves when the loop ends
(stop string, ``max_new_tokens``, a closed generation, an error); each of its steps waits for the next
batched forward.  A forward runs as soon as every joined decoder has submitted its step (or
``max_wait`` after the first one did, so a slow consumer does not hold the others).  Prefill chunks
of newcomers queue on the same thread and run one at a time between decode steps (chunked prefill),
so a long document delays the others' tokens by one chunk at a time, never by its whole prefill.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .cache import HCCache
from .glue import BatchedLayers, HandedLayer, cache_kwarg, hand_off
from .layer import query_length_of
from .prefill import chunk_forward

log = logging.getLogger(__name__)

STABLE_ROWS = 4
"""A decode step's batch is padded to a multiple of this many rows (see the module docstring: then a row of
a matrix product does not depend on the other rows)."""

_IDLE_SECONDS = 1.0
"""How long the model thread waits for a joined decoder's next step before it ends (to start again then)."""

Step = Callable[[int], torch.Tensor]
"""Feed one token to a context's cache; returns the next logits ``(1, vocab)``."""


class _StepCache(Cache):
    """The cache transformers sees during a batched decode step: row ``i`` of every layer's keys and
    values goes to ``caches[i]`` (rows past the members are padding).  What transformers reads about the
    layers (their number, which ones slide) is the same for every member of one model; lengths differ per
    member and are given as explicit positions, so ``get_seq_length`` (read only to build a mask that
    ``hcattention`` does not use) reports the first member's."""

    def __init__(self, caches: Sequence[HCCache], failures: dict[int, Exception]) -> None:
        super().__init__(layers=caches[0].layers)
        self.caches, self.failures = caches, failures

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return query_length_of(query_length), 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layers: list[HandedLayer | None] = [None] * key_states.shape[0]
        for i, cache in enumerate(self.caches):
            if i in self.failures:
                continue
            try:
                cache.update(key_states[i:i + 1], value_states[i:i + 1], layer_idx)
            except Exception as exc:  # noqa: BLE001 - this member's error (the layer is unchanged), its alone
                self.failures[i] = exc
                continue
            layers[i] = cache.layers[layer_idx]
        hand_off(BatchedLayers(layer_idx, layers, key_states, self.failures), kwargs.get("kwargs"))
        return key_states, value_states


@torch.no_grad()
def batched_step(model: torch.nn.Module, members: Sequence[tuple[HCCache, int]]) -> list[torch.Tensor | Exception]:
    """Feed each member's token to its cache in one forward; per member, its next logits ``(1, vocab)``
    or the exception its own update or attention raised (see the module docstring)."""
    if not members:
        raise ValueError("a batched step needs at least one member")
    caches = [cache for cache, _ in members]
    if len({id(cache) for cache in caches}) != len(caches):
        raise ValueError("a cache appears twice in one batched step; one step per context")
    rows = -(-len(members) // STABLE_ROWS) * STABLE_ROWS  # a multiple of STABLE_ROWS (module docstring)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    positions = torch.zeros(rows, 1, dtype=torch.long)
    for i, (cache, token) in enumerate(members):
        tokens[i, 0], positions[i, 0] = token, cache.seen
    device = next(model.parameters()).device
    failures: dict[int, Exception] = {}
    logits = model(input_ids=tokens.to(device), position_ids=positions.to(device), use_cache=True,
                   **cache_kwarg(model, _StepCache(caches, failures))).logits[:, -1]
    return [failures.get(i, logits[i:i + 1]) for i in range(len(members))]


def solo_step(model: torch.nn.Module, cache: HCCache) -> Step:
    """Decode steps of one context alone, as a batch of one: the same logits it gets in any batch."""
    def step(token: int) -> torch.Tensor:
        (result,) = batched_step(model, [(cache, token)])
        if isinstance(result, Exception):
            raise result
        return result
    return step


@dataclass(eq=False)
class _Job:
    """One decode step (``payload``: the token) or prefill chunk (``payload``: ``(1, n)`` ids) waiting for
    the model thread."""

    cache: HCCache
    payload: Any
    submitted: float = field(default_factory=time.perf_counter)
    taken: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None

    def finish(self, result: torch.Tensor | BaseException) -> None:
        if isinstance(result, BaseException):
            self.error = result
        else:
            self.result = result
        self.done.set()


@dataclass
class BatcherCounts:
    """What the model thread has run (read by ``/health``-style reports and the tests)."""

    forwards: int = 0
    """Batched decode forwards."""
    steps: int = 0
    """Decode steps, summed over members."""
    chunks: int = 0
    """Prefill chunks."""
    largest_batch: int = 0


class Batcher:
    """Continuous batching for every context of one model (see the module docstring).

    ``max_batch`` caps the members of one forward (the others wait for the next);  ``max_wait`` is how
    long a submitted step waits for the decoders that have not submitted theirs yet.  The model thread
    starts with the first job and ends when nothing is queued and no decoder is joined, so an idle
    batcher holds no thread.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int = 16, max_wait: float = 0.005) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be an int >= 1")
        if not max_wait >= 0:
            raise ValueError(f"max_wait={max_wait!r} must be >= 0 seconds")
        self._model = weakref.ref(model)  # the batchers registry must not keep a model alive
        self.max_batch, self.max_wait = max_batch, max_wait
        self.counts = BatcherCounts()
        self._cond = threading.Condition()
        self._decoders = 0
        self._steps: list[_Job] = []
        self._chunks: deque[_Job] = deque()
        self._chunk_turn = False
        self._last_end = 0.0
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model this batcher served was freed")
        return model

    # --- what the contexts call ----------------------------------------------------------------
    @contextmanager
    def decoding(self, cache: HCCache) -> Iterator[Step]:
        """Join the batch as a decoder of ``cache`` for the block: the step function it yields runs each
        step in the next batched forward.  Leaving the block (however it ends) leaves the batch."""
        with self._cond:
            self._decoders += 1
        try:
            yield lambda token: self._submit(self._steps, _Job(cache, token))
        finally:
            with self._cond:
                self._decoders -= 1
                self._cond.notify_all()

    def prefill_forward(self, cache: HCCache) -> Callable[[torch.Tensor], torch.Tensor]:
        """A ``prefill`` forward for ``cache`` whose chunks run on the model thread between decode steps."""
        return lambda chunk: self._submit(self._chunks, _Job(cache, chunk))

    def _submit(self, queue: list[_Job] | deque[_Job], job: _Job) -> torch.Tensor:
        with self._cond:
            queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="hcmemory-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        try:
            job.done.wait()
        except BaseException:  # interrupted (KeyboardInterrupt): the job must not touch the cache afterwards
            with self._cond:
                taken = job.taken
                if not taken:
                    queue.remove(job)
            if taken:
                job.done.wait()  # running now: the caller's rollback must come after it
            raise
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # --- the model thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                steps, chunk = self._next()
                if not steps and chunk is None:
                    self._thread = None
                    return
            with torch.no_grad():
                self._run(steps, chunk)
            with self._cond:
                self._last_end = time.perf_counter()

    def _next(self) -> tuple[list[_Job], _Job | None]:
        """Under the lock: the next forward's decode steps, or the next prefill chunk; nothing to end the
        thread.  Chunks and decode forwards alternate while both are queued."""
        while True:
            if self._chunks and (self._chunk_turn or not self._steps):
                self._chunk_turn = False
                chunk = self._chunks.popleft()
                chunk.taken = True
                return [], chunk
            if self._steps:
                # from the later of the oldest step's submission and the end of the last forward: the members
                # of that forward need a moment to submit their next steps, or two would alternate forever
                waited = time.perf_counter() - max(self._steps[0].submitted, self._last_end)
                if len(self._steps) >= min(self._decoders, self.max_batch) or waited >= self.max_wait:
                    steps, self._steps = self._steps[:self.max_batch], self._steps[self.max_batch:]
                    for job in steps:
                        job.taken = True
                    self._chunk_turn = True
                    return steps, None
                self._cond.wait(self.max_wait - waited)
            elif self._decoders == 0:
                return [], None  # idle
            elif not self._cond.wait(timeout=_IDLE_SECONDS) and not (self._steps or self._chunks):
                return [], None  # decoders joined, but none submitted a step for a while: restarted when one does

    def _run(self, steps: list[_Job], chunk: _Job | None) -> None:
        jobs = steps if chunk is None else [chunk]
        try:
            if chunk is not None:
                results: list[torch.Tensor | Exception] = [chunk_forward(self.model, chunk.cache)(chunk.payload)]
                self.counts.chunks += 1
            else:
                results = batched_step(self.model, [(job.cache, job.payload) for job in steps])
                self.counts.forwards += 1
                self.counts.steps += len(steps)
                self.counts.largest_batch = max(self.counts.largest_batch, len(steps))
        except BaseException as exc:  # noqa: BLE001 - the forward failed for every member: each gets the error
            log.debug("a batched forward of %d jobs failed: %r", len(jobs), exc)
            results = [exc] if len(jobs) == 1 else [_shared_failure(exc, len(jobs)) for _ in jobs]
        for job, result in zip(jobs, results):
            job.finish(result)


def _shared_failure(exc: BaseException, members: int) -> RuntimeError:
    """One member's copy of an error that failed a whole forward (each thread raises its own exception)."""
    failure = RuntimeError(f"a batched decode step of {members} contexts failed: {exc!r}")
    failure.__cause__ = exc
    return failure


_batchers: "weakref.WeakKeyDictionary[torch.nn.Module, Batcher]" = weakref.WeakKeyDictionary()
_batchers_lock = threading.Lock()


def shared_batcher(model: torch.nn.Module) -> Batcher:
    """The process's batcher for ``model``: every pool on one model batches its contexts together."""
    with _batchers_lock:
        batcher = _batchers.get(model)
        if batcher is None:
            batcher = _batchers[model] = Batcher(model)
        return batcher
