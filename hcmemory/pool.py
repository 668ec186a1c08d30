"""ContextPool: many conversations, the recently used ones live, the others spilled to a store, and
prefix reuse for stateless callers.

**Ownership.**  A context addressed by id — ``get(id)``, ``generate(..., context_id=id)``,
``save(id)``, LangChain's ``context_id=``, a LangGraph thread — is *named*: it belongs to whoever
uses that id, and no other request ever reads or changes it.  Only *anonymous* contexts, which the
pool made for requests that named none, are candidates for prefix reuse, and a request never
continues one in place: it continues a copy-on-write fork under a new id, without the original's
``metadata``, so the original stays exactly as its own request left it.  Addressing an anonymous
context by id (the ``context_id`` a ``Generation`` reports) makes it named from then on.  A fork
whose committed tokens cover its source wholly supersedes it: the source is dropped from memory,
or deleted from the store once the fork is stored.

**Prefix reuse.**  LangChain, LlamaIndex and friends send the whole prompt every time (document +
question, or the whole chat history).  ``generate`` finds, among the anonymous contexts, live and
spilled, the one whose tokens share the longest prefix with the request, forks it and continues
the fork: only the new suffix is prefilled, anything beyond the shared prefix is cropped from the
fork — llama.cpp server's ``cache_prompt`` with slots, for many conversations at once and with
spill to disk.  A context is only reused when the shared prefix covers at least ``min_reuse`` of
it, since the fork keeps a copy of what it shares; one a generation is running on is skipped.

**What the store holds.**  Named contexts are spilled under the tag ``"latest"``, anonymous ones
under ``REUSE_TAG``.  The pool's index of stored candidates is read once, from headers only
(``ContextStore.index``), and keeps each entry's configuration and model and tokenizer
fingerprints: pools of other presets or models sharing the store file (``shared_engine``) skip each
other's entries, and an entry whose header cannot be read, or whose checkpoint then does not load,
is skipped and logged, never fatal to the request that found it.

**Memory.**  The cap counts what the live contexts really hold allocated
(``CacheStats.reserved_bytes``) and is enforced whenever a context is added: the least recently
used ones are saved to the store and closed, or simply closed without a store.  A context that is
busy (in a call on another thread) or held by a generation the pool handed out is skipped.  A
context its user closed is forgotten (``get`` makes a new one).

**Locks.**  The pool never waits for a context while holding its own lock (see ``guard.py``):
``spill`` and ``close`` wait for a busy context first and take the pool lock inside, from the
context's own spill step; reuse forks outside the pool lock; ``match`` reads only the pool's
snapshots of committed token ids (tuples, replaced whenever a generation on an anonymous context
ends or it is spilled), never a context's live list.

**Versions (compare-and-set).**  The pool records, per live context, the version of the stored
checkpoint it continues: the one it was loaded from, or the one its last save or spill wrote (0: none
yet).  Every save and spill passes it as ``expected_version``, so when two pools on one store hold the
same conversation (a failover between replicas), the one whose copy is older is refused
(``StaleCheckpointError``) instead of overwriting the other's turns.  A refused spill (under the cap or on
``close``) drops the copy without saving it, logged; a refused ``save`` raises and keeps the copy, and
``discard`` drops it — the next ``get`` loads the newer checkpoint.  ``save_state`` writes a copy taken
earlier (a server's per-turn checkpoint, written off its model thread) under the same rule.

**Batching.**  The pool's contexts run their forwards through the model's shared ``Batcher``
(``batching.py``): generations iterated on several threads decode together, one forward per step for
all of them, each answer bit-for-bit the one it gets alone; a newcomer's prefill runs a chunk at a time
between their steps.  ``batching=False`` runs every forward on its caller's thread instead.

**Failures.**  A rejected request (a bad prompt or sampling argument, ``max_new_tokens`` beyond the
model's window) leaves the pool exactly as it was: a new, loaded or forked context is registered
only once its request was accepted.  A spilled context object is closed: a reference kept from
before raises instead of silently diverging from the stored copy.  Call ``get`` again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .batching import Batcher, shared_batcher
from .checkpoint import ContextState, fingerprints
from .config import HCConfig, coerce_config
from .context import HCContext, _shared_prefix, check_id
from .decoding import Generation
from .models import check_model, check_tokenizer
from .stores import DEFAULT_TAG, CheckpointNotFoundError, ContextStore, SavedCheckpoint, StaleCheckpointError

log = logging.getLogger(__name__)

REUSE_TAG = "prefix-cache"
"""The store tag of anonymous contexts (candidates for prefix reuse); named ones go under ``"latest"``."""


class ContextInUseError(RuntimeError):
    """A context cannot be spilled now: a generation the pool handed out on it has not finished."""


class ContextPool:
    """Live contexts under a memory cap, least recently used spilled to ``store`` and reloaded on access."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, store: ContextStore | None = None,
                 max_host_bytes: int = 8 * 2**30, config: HCConfig | str | dict | None = None,
                 min_reuse: float = 0.5, batching: bool = True) -> None:
        check_model(model)
        check_tokenizer(tokenizer)
        if store is not None and not isinstance(store, ContextStore):
            raise TypeError(f"store must be a ContextStore or None, not {type(store).__name__}")
        if not isinstance(max_host_bytes, int) or isinstance(max_host_bytes, bool) or max_host_bytes < 0:
            raise ValueError(f"max_host_bytes={max_host_bytes!r} must be an int >= 0")
        if isinstance(min_reuse, bool) or not isinstance(min_reuse, (int, float)) or not 0 <= min_reuse <= 1:
            raise ValueError(f"min_reuse={min_reuse!r} must be a fraction in [0, 1]")
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_host_bytes = max_host_bytes
        self.config = coerce_config(config)
        self.min_reuse = min_reuse
        self.batcher: Batcher | None = shared_batcher(model) if batching else None
        """Runs the forwards of every live context of this model, the decode steps of concurrent generations
        batched into one forward (``batching.py``); None runs each on its caller's thread."""
        self._live: OrderedDict[str, HCContext] = OrderedDict()
        self._anonymous: set[str] = set()
        """Live contexts the pool made for requests without an id."""
        self._committed: dict[str, tuple[int, ...]] = {}
        """Token ids each live anonymous context held when its last generation ended: the candidates
        ``match`` reads (immutable, replaced as a whole, so no lock of the context is needed)."""
        self._stored: dict[str, tuple[int, ...]] | None = None
        """Token ids of the stored anonymous contexts of this configuration, model and tokenizer, read
        once from their headers."""
        self._superseded: dict[str, str] = {}
        """Fork id -> the stored candidate it covers, deleted from the store once the fork is stored."""
        self._in_use: Counter[str] = Counter()
        """Generations the pool handed out (and forks being copied) per context: never spilled or superseded."""
        self._versions: dict[str, int] = {}
        """The stored version each live context continues (see Versions); absent means 0, nothing stored."""
        self._lock = threading.RLock()
        self._saving: dict[str, HCContext] = {}
        """Contexts whose copy ``save_state`` is writing now, without the pool's lock: another save of the
        same context waits for it (``_saved``), so the two never race on one version."""
        self._saved = threading.Condition(self._lock)

    # --- contexts by id ------------------------------------------------------------------------
    def get(self, context_id: str) -> HCContext:
        """The live context ``context_id``: reloaded from the store if spilled, created if unknown.
        From now on it belongs to the caller: no request without its id reuses it."""
        check_id(context_id)
        with self._lock:
            ctx = self._live_context(context_id)
            if ctx is None:
                ctx, self._versions[context_id] = self._open(context_id)
                self._adopt(ctx)
            self._live.move_to_end(context_id)
            self._claim(context_id)
            self._enforce_cap()
            return ctx

    def add(self, ctx: HCContext) -> None:
        """Register a context made elsewhere (another preset, a fork, one loaded from a file) under its
        own id, as named: the pool spills and reloads it like any other, and no request without its id
        reuses it.  Refused when the id is live or stored already, so nothing is silently replaced."""
        if not isinstance(ctx, HCContext):
            raise TypeError(f"add() takes an HCContext, not {type(ctx).__name__}")
        if ctx.closed:
            raise ValueError(f"context {ctx.context_id!r} is closed; add a live context")
        if ctx.model is not self.model or ctx.tokenizer is not self.tokenizer:
            raise ValueError(f"context {ctx.context_id!r} runs another model or tokenizer than this pool, which "
                             "reloads its contexts with its own; make it with the pool's model and tokenizer")
        with self._lock:
            if ctx.context_id in self:
                raise ValueError(f"context {ctx.context_id!r} already exists in this pool; delete it first or use "
                                 "another id (e.g. ctx.fork('new-id'))")
            self._adopt(ctx)
            self._enforce_cap()

    def delete(self, context_id: str) -> None:
        """Forget a conversation: close it if live (after a call in progress on it) and delete every
        checkpoint of it from the store.  ``ContextInUseError`` while a generation the pool handed out
        runs on it; ``KeyError`` when it is neither live nor stored."""
        check_id(context_id)
        with self._lock:
            ctx = self._live_context(context_id)
            if context_id in self._in_use:
                raise ContextInUseError(f"context {context_id!r} is in use by a generation that has not finished; "
                                        "delete it once that generation is consumed or closed")
            if ctx is None and not (self.store is not None and context_id in self.store):
                raise KeyError(f"context {context_id!r} is neither live nor stored")
        if ctx is not None:
            ctx.close()  # outside the pool's lock: waits for a call in progress on it
        with self._lock:
            self._unregister(context_id, ctx)
            if self._stored is not None:
                self._stored.pop(context_id, None)
            self._superseded.pop(context_id, None)
            if self.store is not None and context_id in self.store:
                self.store.delete(context_id)
        log.info("deleted context %r", context_id)

    def discard(self, context_id: str) -> bool:
        """Close a live context and forget it *without saving it*; its stored checkpoints stay as they
        are, and the next ``get`` loads them.  For a copy found stale (``StaleCheckpointError``: another
        writer saved the conversation since): saving it would overwrite newer turns, and answering from it
        would ignore them.  False when it is not live; ``ContextInUseError`` while a generation the pool
        handed out runs on it."""
        check_id(context_id)
        with self._lock:
            ctx = self._live_context(context_id)
            if ctx is None:
                return False
            if context_id in self._in_use:
                raise ContextInUseError(f"context {context_id!r} is in use by a generation that has not finished; "
                                        "discard it once that generation is consumed or closed")
        ctx.close()  # outside the pool's lock: waits for a call in progress on it
        with self._lock:
            self._unregister(context_id, ctx)
        log.info("discarded context %r without saving it", context_id)
        return True

    def _unregister(self, context_id: str, ctx: HCContext | None) -> None:
        """Drop ``ctx`` (when it is still the live ``context_id``) from the live contexts and their records."""
        if ctx is not None and self._live.get(context_id) is ctx:
            del self._live[context_id]
        self._anonymous.discard(context_id)
        self._committed.pop(context_id, None)
        self._versions.pop(context_id, None)

    def _live_context(self, context_id: str) -> HCContext | None:
        """The live context ``context_id``; one its user closed is forgotten."""
        ctx = self._live.get(context_id)
        if ctx is not None and ctx.closed:
            self._forget(context_id)
            return None
        return ctx

    def _prune(self) -> None:
        for context_id in [cid for cid, ctx in self._live.items() if ctx.closed]:
            self._forget(context_id)

    def _forget(self, context_id: str) -> None:
        """Drop a context closed by its user: its state is gone, so it is neither live nor a candidate."""
        self._unregister(context_id, self._live[context_id])
        log.info("context %r was closed by its user; the pool forgot it", context_id)

    def _open(self, context_id: str) -> tuple[HCContext, int]:
        """A context that is not live, not registered yet, and the version of ``"latest"`` it continues:
        loaded from the store if it holds one, else new (0).  One stored only as a reuse candidate is
        named from now on, saved under ``"latest"``, which it has no version of yet."""
        if self.store is not None:
            if self.store.exists(context_id, DEFAULT_TAG):
                return self.store.load_versioned(context_id, self.model, self.tokenizer, DEFAULT_TAG)
            if self.store.exists(context_id, REUSE_TAG):
                return self.store.load(context_id, self.model, self.tokenizer, REUSE_TAG), 0
        return HCContext(self.model, self.tokenizer, self.config, context_id=context_id), 0

    def _adopt(self, ctx: HCContext) -> None:
        """Make ``ctx`` live here (under the pool's lock); its forwards run through the pool's batcher."""
        ctx.batcher = self.batcher
        self._live[ctx.context_id] = ctx

    def _claim(self, context_id: str) -> None:
        """``context_id`` was addressed by id: it is named from now on, no candidate for anyone else."""
        self._anonymous.discard(context_id)
        self._committed.pop(context_id, None)
        if self._stored is not None:
            self._stored.pop(context_id, None)

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` is live or stored (``get`` would not create it)."""
        with self._lock:
            self._prune()
            return context_id in self._live or (
                isinstance(context_id, str) and self.store is not None and context_id in self.store)

    @property
    def live_ids(self) -> list[str]:
        """Live context ids, least recently used first."""
        with self._lock:
            self._prune()
            return list(self._live)

    def held_bytes(self, context_id: str) -> int | None:
        """Bytes a live context holds (next to the model and on the host); None when it is not live."""
        with self._lock:
            ctx = self._live.get(context_id)
        if ctx is None or ctx.closed:
            return None
        stats = ctx.cache.stats()
        return stats.device_bytes + stats.host_bytes

    def live_bytes(self) -> int:
        """What the live contexts hold allocated, as the cap counts it."""
        with self._lock:
            self._prune()
            return sum(self._bytes(ctx) for ctx in self._live.values())

    # --- stateless callers ---------------------------------------------------------------------
    def match(self, token_ids: Sequence[int]) -> tuple[str | None, int]:
        """The anonymous context (live or stored) sharing the longest prefix with ``token_ids``, and
        its length; ``(None, 0)`` when none shares enough to be reused (see ``min_reuse``).  Named
        contexts and contexts a generation is running on are never candidates."""
        with self._lock:
            best, best_len = None, 0
            for candidates in (self._committed, self._stored_candidates()):
                for cid, held in candidates.items():
                    if cid in self._in_use:
                        continue
                    shared = _shared_prefix(held, token_ids)
                    if shared > best_len and shared >= self.min_reuse * len(held):
                        best, best_len = cid, shared
            return best, best_len

    def generate(self, token_ids: Sequence[int], context_id: str | None = None, **sampling: Any) -> Generation:
        """Answer a whole prompt from ``context_id``'s context, or, without an id, from a fork of the
        anonymous context that already holds most of it, or from a new one (see the module
        docstring); the prompt and the answer are committed to it.  ``sampling``:
        ``max_new_tokens``, ``temperature``, ``stop``, ``seed``, ``timeout``, ``constraint`` (see
        ``HCContext.generate``; compiled before anything in the pool changes).  The ``Generation``'s
        info reports ``context_id``, ``tokens_reused`` and ``tokens_prefilled``.  A rejected request
        raises before anything in the pool changes."""
        if context_id is not None:
            return self._generate_named(check_id(context_id), token_ids, sampling)
        context_id = uuid.uuid4().hex
        source, ctx = self._fork_for(token_ids, context_id)
        gen = ctx.generate(token_ids, **sampling)  # checks the request; a rejected one leaves the fork unregistered
        with self._lock:
            self._adopt(ctx)
            self._anonymous.add(context_id)
            self._hold(ctx, gen, source)
            self._enforce_cap()
        return gen

    def _generate_named(self, context_id: str, token_ids: Sequence[int], sampling: dict[str, Any]) -> Generation:
        with self._lock:
            ctx = self._live_context(context_id)
            opened = ctx is None
            if opened:
                ctx, version = self._open(context_id)
            gen = ctx.generate(token_ids, **sampling)  # checks the request before the pool changes
            if opened:
                self._adopt(ctx)
                self._versions[context_id] = version
            self._live.move_to_end(context_id)
            self._claim(context_id)
            self._hold(ctx, gen, None)
            self._enforce_cap()
        return gen

    def _fork_for(self, token_ids: Sequence[int], context_id: str) -> tuple[str | None, HCContext]:
        """(the candidate reused or None, an unregistered context for a request without id): a fork
        of the best candidate, or a new context.  A stored candidate that does not load into this
        pool is dropped from the index and the next best tried."""
        while True:
            with self._lock:
                source, _ = self.match(token_ids)
                if source is None:
                    return None, HCContext(self.model, self.tokenizer, self.config, context_id=context_id)
                live = self._live_context(source)
                self._in_use[source] += 1  # neither spilled nor superseded while it is copied
            try:
                original = live if live is not None else self._load_candidate(source)
                if original is not None:
                    twin = original.fork(context_id)  # outside the pool lock: may wait for the original
                    twin.metadata.clear()  # the original's notes belong to its owner
                    return source, twin
            finally:
                self._let_go(source)

    def _load_candidate(self, context_id: str) -> HCContext | None:
        """A stored candidate as loaded, or None (logged, dropped from the index) when it does not fit."""
        try:
            return self.store.load(context_id, self.model, self.tokenizer, REUSE_TAG)
        except (CheckpointNotFoundError, ValueError) as exc:  # CheckpointError and another model are ValueErrors
            log.warning("prefix reuse skips stored context %r: %s", context_id, exc)
            with self._lock:
                self._stored_candidates().pop(context_id, None)
            return None

    def _hold(self, ctx: HCContext, gen: Generation, source: str | None) -> None:
        self._in_use[ctx.context_id] += 1
        gen.on_close(lambda: self._finished(ctx, source))

    def _let_go(self, context_id: str) -> None:
        with self._lock:
            self._in_use[context_id] -= 1
            if self._in_use[context_id] <= 0:
                del self._in_use[context_id]

    def _finished(self, ctx: HCContext, source: str | None) -> None:
        """A generation on ``ctx`` ended (or was dropped): snapshot what an anonymous context now
        holds, and let it supersede the candidate it was forked from when it covers it wholly."""
        context_id = ctx.context_id
        self._let_go(context_id)
        with self._lock:
            if context_id not in self._anonymous or self._live.get(context_id) is not ctx or ctx.closed:
                return
            held = self._committed[context_id] = tuple(ctx.token_ids)
            if source is None or source in self._in_use:
                return
            if source in self._committed:
                if held[:len(self._committed[source])] == self._committed[source]:
                    self._unregister(source, self._live[source])
                return
            covered = None if self._stored is None else self._stored.get(source)
            if covered is not None and held[:len(covered)] == covered:
                self._superseded[context_id] = source

    def _stored_candidates(self) -> dict[str, tuple[int, ...]]:
        if self._stored is None:
            self._stored = {} if self.store is None else self._read_index()
        return self._stored

    def _read_index(self) -> dict[str, tuple[int, ...]]:
        """The stored anonymous contexts this pool can continue (the store leaves out and logs
        headers it cannot read); those of another configuration, model or tokenizer are skipped."""
        identity = (self.config.to_dict(), *fingerprints(self.model, self.tokenizer))
        found: dict[str, tuple[int, ...]] = {}
        for (context_id, _), entry in self.store.index(REUSE_TAG).items():
            if context_id in self._live or self.store.exists(context_id):
                continue  # named since it was stored: live here under its id, or saved under "latest"
            if (entry.config, entry.model_fingerprint, entry.tokenizer_fingerprint) != identity:
                log.info("prefix reuse skips stored context %r: made with another configuration, model or "
                         "tokenizer than this pool's", context_id)
                continue
            found[context_id] = entry.token_ids
        return found

    # --- memory --------------------------------------------------------------------------------
    def save(self, context_id: str) -> SavedCheckpoint | None:
        """Checkpoint a live context to the store now, keeping it live (e.g. after every agent step).
        Like ``get``, it makes the context the caller's own: no request without its id reuses it.
        ``StaleCheckpointError`` (the copy kept) when another writer saved it since this pool loaded or
        last saved it; None when another call of this pool saved or spilled it meanwhile."""
        check_id(context_id)
        if self.store is None:
            raise ValueError("this pool has no store to save to; create it with store=ContextStore(path)")
        with self._lock:
            ctx = self._live_context(context_id)
            if ctx is None:
                raise KeyError(f"context {context_id!r} is not live; live contexts: {list(self._live)}")
            self._claim(context_id)
            expected = self._versions.get(context_id, 0)
        state = ctx.to_state()  # copied under the context's guard, before the store's lock (see guard.py)
        return self.save_state(context_id, state, expected)

    def version(self, context_id: str) -> int:
        """The stored version (of ``"latest"``) the live context ``context_id`` continues — the one it was
        loaded from or last saved as; 0 when it has not been stored.  ``KeyError`` when it is not live."""
        check_id(context_id)
        with self._lock:
            if self._live_context(context_id) is None:
                raise KeyError(f"context {context_id!r} is not live; live contexts: {list(self._live)}")
            return self._versions.get(context_id, 0)

    def save_state(self, context_id: str, state: ContextState, expected_version: int) -> SavedCheckpoint | None:
        """Store ``state``, a copy of the live context ``context_id`` taken when its ``version()`` was
        ``expected_version``, as its ``"latest"`` checkpoint, and record the new version.

        Why a copy taken earlier: a server copies a context on its model thread and writes it on another,
        so the model never waits for the database.  Returns None, writing nothing, when the copy is
        obsolete — the context was saved, spilled, reloaded or dropped by this pool since (that newer save
        covers it).  ``StaleCheckpointError`` when the store holds another version: someone else saved the
        conversation since; nothing is changed, and the caller should ``discard`` its copy."""
        if self.store is None:
            raise ValueError("this pool has no store to save to; create it with store=ContextStore(path)")
        with self._lock:
            while True:
                ctx = self._live_context(context_id)
                if ctx is None or self._versions.get(context_id, 0) != expected_version:
                    return None
                if context_id not in self._saving:
                    break
                self._saved.wait()  # another copy of it is being written: this one may be obsolete after it
            self._saving[context_id] = ctx
        saved = None
        try:
            saved = self.store.save_state(state, context_id, DEFAULT_TAG, expected_version=expected_version)
            return saved
        finally:
            with self._lock:
                del self._saving[context_id]
                if saved is not None and self._live.get(context_id) is ctx:
                    self._versions[context_id] = saved.version
                    self._claim(context_id)
                self._saved.notify_all()

    def spill(self, context_id: str, blocking: bool = True) -> bool:
        """Save a live context to the store (if any) and close it; True when it was.  Waits for a call in
        progress on it (without holding the pool's lock) and raises ``ContextInUseError`` while a
        generation the pool handed out on it has not finished; with ``blocking=False`` a context that is
        busy, in use or being written is left live and False returned instead (a memory cap's sweep)."""
        check_id(context_id)
        with self._lock:
            ctx = self._live_context(context_id)
            if ctx is None:
                raise KeyError(f"context {context_id!r} is not live; live contexts: {list(self._live)}")
            if not blocking and (context_id in self._in_use or context_id in self._saving):
                return False
        if self._spill(context_id, ctx, blocking):
            return True
        with self._lock:  # busy (not blocking), or its user closed it meanwhile
            self._prune()
        return False

    def _spill(self, context_id: str, ctx: HCContext, blocking: bool) -> bool:
        """Save and close ``ctx`` as one step of the context (under its guard, then the pool's lock);
        False when it is busy and ``blocking`` is False, or closed."""
        def save(state: ContextState) -> None:
            with self._lock:
                if self._live.get(context_id) is not ctx:
                    return  # superseded or forgotten meanwhile: nothing of it is live any more
                if context_id in self._in_use:
                    raise ContextInUseError(f"context {context_id!r} is in use by a generation that has not finished; "
                                            "spill it once that generation is consumed or closed")
                while context_id in self._saving:  # a copy of it is being written (save_state): after it
                    self._saved.wait()
                anonymous = context_id in self._anonymous
                if self.store is not None:
                    try:
                        self.store.save_state(state, context_id, REUSE_TAG if anonymous else DEFAULT_TAG,
                                              expected_version=self._versions.get(context_id, 0))
                    except StaleCheckpointError as exc:
                        log.warning("context %r was not spilled, it was dropped: %s", context_id, exc)
                    else:
                        if anonymous:
                            self._stored_candidates()[context_id] = tuple(state.token_ids)
                            self._delete_superseded(context_id)
                self._unregister(context_id, ctx)

        if not ctx.spill(save, blocking):
            return False
        log.info("%s context %r (%d tokens)", "spilled" if self.store is not None else "dropped", context_id,
                 len(ctx.token_ids))
        return True

    def _delete_superseded(self, context_id: str) -> None:
        """``context_id`` is stored now: the stored candidate it covers wholly is redundant."""
        old = self._superseded.pop(context_id, None)
        if old is None or old in self._in_use or self._stored_candidates().pop(old, None) is None:
            return
        try:
            self.store.delete(old, REUSE_TAG)
        except CheckpointNotFoundError:
            pass  # another pool on this store deleted it already
        except (OSError, TimeoutError) as exc:  # only redundant now: the spill that made it so stands
            log.warning("could not delete stored context %r, which %r supersedes (%s)", old, context_id, exc)

    def close(self) -> None:
        """Save every live context (if there is a store) and close them, waiting for calls in progress
        on them without holding the pool's lock; the store stays open.  Contexts a generation is
        still running on are left live and named in one ``ContextInUseError`` at the end."""
        with self._lock:
            self._prune()
            live = list(self._live.items())
        in_use = []
        for context_id, ctx in live:
            try:
                self._spill(context_id, ctx, blocking=True)
            except ContextInUseError:
                in_use.append(context_id)
        if in_use:
            raise ContextInUseError(f"contexts {in_use} are in use by generations that have not finished; they "
                                    "stay live: consume or close those generations, then close the pool again")

    def __enter__(self) -> "ContextPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _bytes(ctx: HCContext) -> int:
        return ctx.cache.stats().reserved_bytes  # not ctx.stats(): that would wait for a busy context

    def _enforce_cap(self) -> None:
        """Spill least recently used contexts until under the cap; the most recent one always stays,
        a context in use (busy, or held by a generation) is skipped, and so is one the store cannot
        take now (down or busy): a request is never refused because memory could not be spilled."""
        self._prune()
        sizes = {context_id: self._bytes(ctx) for context_id, ctx in self._live.items()}
        total = sum(sizes.values())
        for context_id, ctx in list(self._live.items())[:-1]:
            if total <= self.max_host_bytes:
                break
            if context_id in self._in_use or context_id in self._saving:
                continue
            try:
                spilled = self._spill(context_id, ctx, blocking=False)
            except (OSError, TimeoutError) as exc:  # the store is down or busy: keep serving from memory
                log.warning("could not spill context %r (%s); it stays live over the cap", context_id, exc)
                continue
            if spilled:
                total -= sizes[context_id]
        if total > self.max_host_bytes:
            log.warning("live contexts hold %d bytes, over the pool cap of %d (the most recent one alone, or the "
                        "others are in use)", total, self.max_host_bytes)
