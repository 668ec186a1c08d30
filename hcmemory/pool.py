"""ContextPool: many conversations, the recently used ones live, the others spilled to a store, and
prefix reuse for stateless callers.

**Prefix reuse.**  LangChain, LlamaIndex and friends send the whole prompt every time (document +
question, or the whole chat history).  ``generate`` finds, among live and spilled contexts, the one
whose tokens share the longest prefix with the request, and continues it: only the new suffix is
prefilled, anything the context held beyond the shared prefix is cropped — llama.cpp server's
``cache_prompt`` with slots, for many conversations at once and with spill to disk.  A context is
only taken over when the shared prefix covers at least ``min_reuse`` of it, so a new conversation
that merely shares the system prompt with an old one starts fresh instead of wiping it.  A request
may also pin a conversation by id.

**Memory.**  The cap counts what the live contexts really hold allocated
(``CacheStats.reserved_bytes``) and is enforced whenever a context is added: the least recently
used ones are saved to the store (tag ``"latest"``) and closed, or simply closed without a store.
A context that is busy (in a call on another thread) or leased to a running generation is skipped
rather than waited for: the pool never waits for a context while holding its own lock, which is
what makes the lock order of ``guard.py`` deadlock-free.

A spilled context object is closed: a reference kept from before raises instead of silently
diverging from the stored copy.  Call ``get`` again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .config import HCConfig, coerce_config
from .context import HCContext, _shared_prefix, check_id
from .decoding import Generation
from .models import check_model, check_tokenizer
from .store import DEFAULT_TAG, ContextStore

log = logging.getLogger(__name__)


class ContextPool:
    """Live contexts under a memory cap, least recently used spilled to ``store`` and reloaded on access."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, store: ContextStore | None = None,
                 max_host_bytes: int = 8 * 2**30, config: HCConfig | str | dict | None = None,
                 min_reuse: float = 0.5) -> None:
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
        self._live: OrderedDict[str, HCContext] = OrderedDict()
        self._stored: dict[str, list[int]] | None = None
        """Token ids of the contexts in the store, read once from their headers (never their tensors)."""
        self._leases: Counter[str] = Counter()
        self._lock = threading.RLock()

    # --- contexts by id ------------------------------------------------------------------------
    def get(self, context_id: str) -> HCContext:
        """The live context ``context_id``: reloaded from the store if spilled, created if unknown."""
        check_id(context_id)
        with self._lock:
            ctx = self._get(context_id)
            self._enforce_cap()
            return ctx

    def _get(self, context_id: str) -> HCContext:
        ctx = self._live.get(context_id)
        if ctx is not None:
            self._live.move_to_end(context_id)
            return ctx
        if self.store is not None and self.store.exists(context_id):
            ctx = self.store.load(context_id, self.model, self.tokenizer)
        else:
            ctx = HCContext(self.model, self.tokenizer, self.config, context_id=context_id)
        self._live[context_id] = ctx
        return ctx

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` is live or stored (``get`` would not create it)."""
        with self._lock:
            return context_id in self._live or (
                isinstance(context_id, str) and self.store is not None and context_id in self.store)

    @property
    def live_ids(self) -> list[str]:
        """Live context ids, least recently used first."""
        with self._lock:
            return list(self._live)

    def held_bytes(self, context_id: str) -> int | None:
        """Bytes a live context holds (next to the model and on the host); None when it is not live."""
        with self._lock:
            ctx = self._live.get(context_id)
        if ctx is None:
            return None
        stats = ctx.cache.stats()
        return stats.device_bytes + stats.host_bytes

    def live_bytes(self) -> int:
        """What the live contexts hold allocated, as the cap counts it."""
        with self._lock:
            return sum(self._bytes(ctx) for ctx in self._live.values())

    # --- stateless callers ---------------------------------------------------------------------
    def match(self, token_ids: Sequence[int]) -> tuple[str | None, int]:
        """The context (live or stored) sharing the longest prefix with ``token_ids``, and its length;
        ``(None, 0)`` when none shares enough to be taken over (see ``min_reuse``)."""
        with self._lock:
            best, best_len = None, 0
            candidates = {cid: ctx.token_ids for cid, ctx in self._live.items()}
            for cid, ids in self._stored_tokens().items():
                candidates.setdefault(cid, ids)
            for cid, ids in candidates.items():
                shared = _shared_prefix(ids, token_ids)
                if shared > best_len and shared >= self.min_reuse * len(ids):
                    best, best_len = cid, shared
            return best, best_len

    def generate(self, token_ids: Sequence[int], context_id: str | None = None, **sampling) -> Generation:
        """Answer a whole prompt from the context that already holds most of it (see the module
        docstring), or from ``context_id``'s, or from a new context; the prompt and the answer are
        committed to it.  ``sampling``: ``max_new_tokens``, ``temperature``, ``stop``, ``seed``, ``timeout``.
        The ``Generation``'s info reports ``context_id``, ``tokens_reused`` and ``tokens_prefilled``."""
        with self._lock:
            if context_id is None:
                context_id, _ = self.match(token_ids)
            ctx = self._get(check_id(context_id) if context_id is not None else uuid.uuid4().hex)
            self._leases[ctx.context_id] += 1
            try:
                gen = ctx.generate(token_ids, **sampling)
            except BaseException:
                self._release(ctx.context_id)
                raise
            gen.on_close(lambda: self._release(ctx.context_id))
            self._enforce_cap()
        return gen

    def _release(self, context_id: str) -> None:
        with self._lock:
            self._leases[context_id] -= 1
            if self._leases[context_id] <= 0:
                del self._leases[context_id]

    def _stored_tokens(self) -> dict[str, list[int]]:
        if self._stored is None:
            self._stored = {} if self.store is None else {
                cid: self.store.token_ids(cid) for cid in self.store.list() if self.store.exists(cid)}
        return self._stored

    # --- memory --------------------------------------------------------------------------------
    def save(self, context_id: str) -> None:
        """Checkpoint a live context to the store now, keeping it live (e.g. after every agent step)."""
        check_id(context_id)
        if self.store is None:
            raise ValueError("this pool has no store to save to; create it with store=ContextStore(path)")
        with self._lock:
            ctx = self._live.get(context_id)
        if ctx is None:
            raise KeyError(f"context {context_id!r} is not live; live contexts: {self.live_ids}")
        state = ctx.to_state()  # copied under the context's guard, before the store's lock (see guard.py)
        self.store.save_state(state, context_id, DEFAULT_TAG)
        with self._lock:
            self._stored_tokens()[context_id] = list(state.token_ids)

    def spill(self, context_id: str) -> None:
        """Save a live context to the store (if any) and close it; waits for a call in progress on it."""
        check_id(context_id)
        with self._lock:
            ctx = self._live.get(context_id)
            if ctx is None:
                raise KeyError(f"context {context_id!r} is not live; live contexts: {list(self._live)}")
            self._spill(context_id, ctx, blocking=True)

    def _spill(self, context_id: str, ctx: HCContext, blocking: bool) -> bool:
        def save(state):
            if self.store is not None:
                self.store.save_state(state, context_id, DEFAULT_TAG)
                self._stored_tokens()[context_id] = list(state.token_ids)

        if not ctx.spill(save, blocking):
            return False
        del self._live[context_id]
        log.info("%s context %r (%d tokens)", "spilled" if self.store is not None else "dropped", context_id,
                 len(ctx.token_ids))
        return True

    def close(self) -> None:
        """Save every live context (if there is a store) and close them; the store stays open."""
        with self._lock:
            for context_id, ctx in list(self._live.items()):
                self._spill(context_id, ctx, blocking=True)

    def __enter__(self) -> "ContextPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _bytes(ctx: HCContext) -> int:
        return ctx.cache.stats().reserved_bytes  # not ctx.stats(): that would wait for a busy context

    def _enforce_cap(self) -> None:
        """Spill least recently used contexts until under the cap; the most recent one always stays,
        and a context in use (busy or leased) is skipped."""
        sizes = {context_id: self._bytes(ctx) for context_id, ctx in self._live.items()}
        total = sum(sizes.values())
        for context_id, ctx in list(self._live.items())[:-1]:
            if total <= self.max_host_bytes:
                break
            if context_id not in self._leases and self._spill(context_id, ctx, blocking=False):
                total -= sizes[context_id]
        if total > self.max_host_bytes:
            log.warning("live contexts hold %d bytes, over the pool cap of %d (the most recent one alone, or the "
                        "others are in use)", total, self.max_host_bytes)
