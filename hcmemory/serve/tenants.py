"""Tenants: one ``ContextPool`` and one ``ContextStore`` (``stores.open_store``) per tenant, sharing the model.

Why a pool per tenant rather than one pool with prefixed ids: the pool's prefix reuse looks at every
context it knows, live or stored, so in a shared pool a stateless request from one tenant could be
continued from (and its reply shaped by) another tenant's conversation — llama.cpp#27148's bug.  With a
pool per tenant that cannot happen by construction: a tenant's pool never sees another tenant's tokens.
For the same reason each tenant has its own store — a SQLite file, or a namespace of the shared
PostgreSQL database (``stores.open_store``): a pool also matches against the token ids of every context
in its store.  Ids therefore need no prefix either: the same session id sent by two
tenants names two different contexts.

Every method here runs on the model thread (``worker.py``), so no call is ever in progress on a
context while a pool is closed or a context spilled.  Memory is capped across tenants: after each call
the least recently used tenants' least recently used contexts are spilled until the live contexts of all
tenants together fit ``max_host_bytes``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..config import HCConfig
from ..pool import ContextPool
from .stores import open_store

log = logging.getLogger(__name__)


class Tenants:
    """The open tenants' pools, least recently used first."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: HCConfig,
                 store: Path | str, max_host_bytes: int, max_open: int) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.store, self.max_host_bytes, self.max_open = store, max_host_bytes, max_open
        self._pools: OrderedDict[str, ContextPool] = OrderedDict()

    def pool(self, tenant: str) -> ContextPool:
        """The tenant's pool, opened (with its store) on first use."""
        pool = self._pools.get(tenant)
        if pool is not None:
            self._pools.move_to_end(tenant)
            return pool
        while len(self._pools) >= self.max_open:  # a store that cannot take the spill refuses this request instead
            self._close(next(iter(self._pools)))
        pool = ContextPool(self.model, self.tokenizer, open_store(self.store, tenant), self.max_host_bytes, self.config)
        self._pools[tenant] = pool
        return pool

    def enforce_cap(self, keep: str) -> None:
        """Spill least recently used contexts of the least recently used tenants until every tenant's live
        contexts fit the cap together; ``keep``'s most recent context stays (it just answered).  A store that
        cannot take a spill leaves the rest live, over the cap: serving goes on from memory until it is back."""
        for tenant, pool in list(self._pools.items()):
            ids = pool.live_ids[:-1] if tenant == keep else pool.live_ids
            for context_id in ids:
                if self.live_bytes() <= self.max_host_bytes:
                    return
                try:
                    pool.spill(context_id, blocking=False)  # one being written or used is skipped, not waited for
                except OSError as exc:
                    log.warning("cannot spill context %r of tenant %s: its store is unreachable (%s); live contexts "
                                "stay over the memory cap until it is back", context_id, tenant, exc)
                    return

    def live_pool(self, tenant: str) -> ContextPool | None:
        """The tenant's pool if it is open, without opening it (nothing of a closed tenant is live)."""
        return self._pools.get(tenant)

    @property
    def open(self) -> int:
        """How many tenants' pools are open."""
        return len(self._pools)

    def live_bytes(self) -> int:
        """What the live contexts of every open tenant hold allocated."""
        return sum(pool.live_bytes() for pool in self._pools.values())

    def close(self) -> None:
        """Save every live context to its tenant's store and close them all.  A tenant whose contexts cannot
        be saved is logged and the others are still saved: one unreachable store loses only its own."""
        for tenant in list(self._pools):
            try:
                self._close(tenant)
            except Exception:  # noqa: BLE001 - shutting down: every other tenant must still be saved
                log.exception("could not save tenant %s's live contexts; the turns since their last checkpoint are "
                              "lost", tenant)
                self._close_store(self._pools.pop(tenant))

    def _close(self, tenant: str) -> None:
        """Save the tenant's live contexts and close its pool and store.  When they cannot all be saved the
        error propagates and the tenant stays open, its unsaved contexts still live."""
        pool = self._pools[tenant]
        pool.close()
        del self._pools[tenant]
        self._close_store(pool)
        log.info("closed tenant %s: its live contexts were saved to its store", tenant)

    @staticmethod
    def _close_store(pool: ContextPool) -> None:
        if pool.store is not None:  # always set here; the check keeps type checkers honest
            pool.store.close()
