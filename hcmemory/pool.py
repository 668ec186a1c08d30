"""ContextPool: many conversations, the recently used ones live, the others spilled to a store.

The cap counts what the live contexts really hold allocated (``CacheStats.reserved_bytes``:
growth slack and bookkeeping included) and is enforced on every ``get``: while the live total
exceeds ``max_host_bytes``, the least recently used context other than the one just asked for is
saved (tag ``"latest"``) and closed.  A context that is busy (another thread is inside one of its
calls) is skipped rather than waited for: the pool never waits for a context while holding its own
lock, which is what makes the lock order of ``guard.py`` deadlock-free.

A spilled context object is closed: using a reference kept from before raises instead of silently
diverging from the stored copy.  Call ``get`` again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch
from transformers import PreTrainedTokenizerBase

from .config import HCConfig, coerce_config
from .context import HCContext, check_id
from .models import check_model, check_tokenizer
from .store import DEFAULT_TAG, ContextStore

log = logging.getLogger(__name__)


class ContextPool:
    """Live contexts under a memory cap, least recently used spilled to ``store`` and reloaded on access."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, store: ContextStore,
                 max_host_bytes: int, config: HCConfig | str | dict | None = None) -> None:
        check_model(model)
        check_tokenizer(tokenizer)
        if not isinstance(store, ContextStore):
            raise TypeError(f"store must be a ContextStore, not {type(store).__name__}")
        if not isinstance(max_host_bytes, int) or isinstance(max_host_bytes, bool) or max_host_bytes < 0:
            raise ValueError(f"max_host_bytes={max_host_bytes!r} must be an int >= 0")
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_host_bytes = max_host_bytes
        self.config = coerce_config(config)
        self._live: OrderedDict[str, HCContext] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, context_id: str) -> HCContext:
        """The live context ``context_id``: reloaded from the store if spilled, created if unknown."""
        check_id(context_id)
        with self._lock:
            ctx = self._live.get(context_id)
            if ctx is not None:
                self._live.move_to_end(context_id)
            else:
                if self.store.exists(context_id):
                    ctx = self.store.load(context_id, self.model, self.tokenizer)
                else:
                    ctx = HCContext(self.model, self.tokenizer, self.config, context_id=context_id)
                self._live[context_id] = ctx
            self._enforce_cap()
            return ctx

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` is live or stored (``get`` would not create it)."""
        with self._lock:
            return context_id in self._live or (isinstance(context_id, str) and context_id in self.store)

    @property
    def live_ids(self) -> list[str]:
        """Live context ids, least recently used first."""
        with self._lock:
            return list(self._live)

    def live_bytes(self) -> int:
        """What the live contexts hold allocated, as the cap counts it."""
        with self._lock:
            return sum(self._bytes(ctx) for ctx in self._live.values())

    def spill(self, context_id: str) -> None:
        """Save a live context to the store and close it (waits for a call in progress on it)."""
        check_id(context_id)
        with self._lock:
            ctx = self._live.get(context_id)
            if ctx is None:
                raise KeyError(f"context {context_id!r} is not live; live contexts: {list(self._live)}")
            self._spill(context_id, ctx, blocking=True)

    def _spill(self, context_id: str, ctx: HCContext, blocking: bool) -> bool:
        if not ctx.spill(lambda state: self.store.save_state(state, context_id, DEFAULT_TAG), blocking):
            return False
        del self._live[context_id]
        log.info("spilled context %r (%d tokens) to %s", context_id, len(ctx.token_ids), self.store.path)
        return True

    def close(self) -> None:
        """Save every live context and close them; the store stays open (it belongs to the caller)."""
        with self._lock:
            for context_id, ctx in list(self._live.items()):
                self._spill(context_id, ctx, blocking=True)

    def __enter__(self) -> "ContextPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _bytes(ctx: HCContext) -> int:
        return ctx.cache.stats().reserved_bytes

    def _enforce_cap(self) -> None:
        """Spill least recently used contexts until under the cap; the most recent one always stays,
        and a context in use by another thread is skipped."""
        sizes = {context_id: self._bytes(ctx) for context_id, ctx in self._live.items()}
        total = sum(sizes.values())
        for context_id, ctx in list(self._live.items())[:-1]:
            if total <= self.max_host_bytes:
                break
            if self._spill(context_id, ctx, blocking=False):
                total -= sizes[context_id]
        if total > self.max_host_bytes:
            log.warning("live contexts hold %d bytes, over the pool cap of %d (the most recent one alone, or the "
                        "others are in use)", total, self.max_host_bytes)
