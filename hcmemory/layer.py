"""HCLayer: one transformer layer's KV state, as rows of a few stores.

* key codes next to the model (the codec decides: full keys, VQ indices, packed ints);
* when keys are compressed and re-scored, an exact copy of the keys on the host, read only for
  the rows a step selects and for the sinks and recent rows (without re-scoring, as in the paper and
  KIVI, there is no exact copy and every score comes from the codes);
* values, on the host or next to the model;
* each row's absolute position, and its cumulative attention mass when a policy needs it;
* with ``full_precision_window``, 16-bit copies of the rows the next step reads exactly
  (``window.py``), which reads prefer to the stores' codes.

Two lengths are kept apart: ``seen`` (tokens ever appended, which gives positions and is what
``get_seq_length`` reports to transformers) and ``len(layer)`` (rows kept, which attention spans).

Every change is all or nothing.  ``update`` encodes every store's rows before it writes any of
them.  A transaction (``begin`` / ``commit`` / ``rollback``) records what eviction drops of the
rows that existed when it began, so a rollback rebuilds the state exactly even though budgets and
sliding windows are enforced after every step, inside long appends too; the log holds at most the
rows the layer had at the start, so a bounded layer stays bounded.

Key codecs that need fitting (VQ codebooks, per-channel int statistics) are fitted before the
layer holds any code: from the shipped calibration text (``load_codec_states``), or, with
``calibration="context"``, on the layer's own committed keys once ``calibration_tokens`` have
arrived — until then keys are kept exact, and nothing a rolled-back question brought in is
ever fitted on.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .codecs import IdentityCodec, LayerCodecs, codecs_for
from .config import HCConfig
from .eviction import EvictionPolicy, make_policy, rows_to_keep
from .glue import hand_off
from .kernels.dispatch import approx_scores, nearest_impl
from .rows import CodedRows, RowBuffer
from .window import ExactCopies

HOST = torch.device("cpu")


@dataclass
class _Transaction:
    rows: int
    seen: int
    counters: tuple[int, int, int]
    mass: RowBuffer | None
    window: ExactCopies | None
    floor: int = 0
    """Rows at positions below this existed at ``begin`` and are still there unless logged in
    ``dropped``; ``seen`` at first, lowered by a crop (rows appended after it start at its point)."""
    dropped: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Rows that existed at ``begin`` and were evicted or cropped since, per store (positions included)."""


class HCLayer(CacheLayerMixin):
    """One transformer layer's KV state (see the module docstring for what it holds)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, config: HCConfig, heads: int, dim: int, device: torch.device, dtype: torch.dtype,
                 index: int = 0) -> None:
        super().__init__()
        self.config, self.heads, self.dim, self.index = config, heads, dim, index
        self.device, self.dtype = torch.device(device), dtype
        """Where the model runs: key codes (and values with ``value_placement="device"``) live there."""
        self.value_device = HOST if config.value_placement == "host" else self.device
        self.policy: EvictionPolicy | None = make_policy(config.eviction)
        self.observes_attention = self.policy is not None and self.policy.uses_attention
        self.is_initialized = True
        self._returned: weakref.ref[torch.Tensor] | None = None
        self._txn: _Transaction | None = None
        self._reset_stores(self._fresh_codecs())

    def _fresh_codecs(self) -> LayerCodecs:
        # only VQ keys are assigned to centroids: asking for the kernel elsewhere would build the C++
        # kernels for a configuration that never runs them
        nearest = nearest_impl(torch.empty(0, device=self.device), self.config.kernel) \
            if self.config.key_codec == "vq" else None
        return codecs_for(self.config, self.heads, self.dim, self.dtype, self.device, HOST, nearest)

    def _reset_stores(self, codecs: LayerCodecs) -> None:
        """Empty stores for ``codecs``; key codes start exact when the codecs still need fitting."""
        growth = self.config.store_growth
        # host rows stay pageable: pinned, every geometric growth would pin a new block while torch's caching
        # allocator keeps the old ones, to speed up transfers that are small on the decode path (indices,
        # queries, outputs); docs/DESIGN-NOTES.md has the measurement
        self.codecs = codecs
        self.calibrated = not any(c is not None and c.needs_fit for c in (codecs.keys, codecs.exact_keys))
        key_codec = codecs.keys if self.calibrated else IdentityCodec(self.heads, self.dim, device=self.device)
        self.key_codes = CodedRows(key_codec, self.device, growth)
        self.exact_keys = (CodedRows(codecs.exact_keys, HOST, growth)
                           if self.calibrated and codecs.exact_keys is not None else None)
        self.values = CodedRows(codecs.values, self.value_device, growth)
        self.positions = RowBuffer(1, (), torch.int64, HOST, growth)
        self.mass = RowBuffer(self.heads, (), torch.float32, self.value_device, growth) \
            if self.observes_attention else None
        # 16-bit copies: a float32 model's rows in float16, as hc presets keep their re-scoring keys
        copies = self.dtype if self.dtype.itemsize <= 2 else torch.float16
        self.window = ExactCopies.empty(self.heads, self.dim, copies, self.value_device) \
            if self.config.full_precision_window else None
        self.seen = self.selected_rows = self.selectable_rows = self.last_selected = 0

    # --- what the state is -------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        """Whether rows other than the sinks and recent rows are read through approximate codes."""
        return self.calibrated and self.config.compressed_keys

    @property
    def needs_explicit_attention(self) -> bool:
        return self.compressed or self.observes_attention

    def __len__(self) -> int:
        return len(self.values)

    def _stores(self) -> dict[str, CodedRows | RowBuffer]:
        """Every store that holds one row per kept token (``mass`` is restored separately on rollback)."""
        stores: dict[str, CodedRows | RowBuffer] = {"key_codes": self.key_codes, "values": self.values,
                                                    "positions": self.positions}
        if self.exact_keys is not None:
            stores["exact_keys"] = self.exact_keys
        return stores

    def _all_stores(self) -> dict[str, CodedRows | RowBuffer]:
        return {**self._stores(), **({"mass": self.mass} if self.mass is not None else {})}

    # --- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Stores are built eagerly from the model config; nothing to do lazily."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the chunk's post-RoPE keys and values, all stores or none; attention then reads
        them from the stores (the returned tensors are the chunk's own, for the verified hand-off)."""
        if key_states.dim() != 4 or key_states.shape[0] != 1:
            raise ValueError("HCCache holds one sequence; use one cache per conversation (batch size 1)")
        if key_states.shape[1] != self.heads or key_states.shape[3] != self.dim:
            raise ValueError(f"keys of shape {tuple(key_states.shape)} do not fit this layer "
                             f"({self.heads} KV heads of {self.dim} dims): the cache was built for another model")
        if not self.calibrated and self.config.calibration == "shipped":
            raise RuntimeError(f"layer {self.index}: the key codecs of key_codec={self.config.key_codec!r} are not "
                               "calibrated; build the cache with HCCache.for_model(model, config, tokenizer), which "
                               "loads or fits them, or use calibration='context'")
        keys, values = key_states[0], value_states[0]
        n = keys.shape[1]
        key_codes = self.key_codes.encode(keys)
        pending: list[tuple[CodedRows | RowBuffer, torch.Tensor]] = [
            (self.key_codes, key_codes), (self.values, self.values.encode(values)),
            (self.positions, torch.arange(self.seen, self.seen + n, dtype=torch.int64)[None])]
        if self.exact_keys is not None:
            pending.append((self.exact_keys, self.exact_keys.encode(self.codecs.exact_input(keys, key_codes))))
        if self.mass is not None:
            pending.append((self.mass, torch.zeros(self.heads, n)))
        rows = len(self)
        # trimmed again here (after_attention did it) for an update whose attention never ran: the
        # copies must stay those of the rows this step reads exactly, or later reads would differ
        copies = None if self.window is None else self.window.trimmed(
            rows, self.config.sink_tokens, self.config.recent_tokens).appended(rows, keys, values)
        try:
            for store, codes in pending:  # the allocations: the only step that can fail
                store.reserve(codes) if isinstance(store, CodedRows) else store.reserve(n)
            for store, codes in pending:
                store.append_codes(codes) if isinstance(store, CodedRows) else store.append(codes)
        except BaseException:
            for store, _ in pending:
                store.truncate(rows)
            raise
        self.seen += n
        if copies is not None:
            self.window = copies
        if self._txn is None:
            self.calibrate_if_ready()
        self._returned = weakref.ref(key_states)
        hand_off(self, kwargs.get("kwargs"))
        return key_states, value_states

    def returned_keys(self) -> torch.Tensor | None:
        """The key tensor the last ``update`` returned, while it is alive (the hand-off check)."""
        return None if self._returned is None else self._returned()

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        """Only the chunk's own causal triangle: ``attention.py`` computes visibility from positions."""
        return query_length_of(query_length), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length
    """transformers 5.2 (the kvpress environment) declares the layer method under this name."""

    def reset(self) -> None:
        """Forget every row; context-calibrated codecs are forgotten too (they describe the old keys)."""
        self._require_no_transaction("reset")
        self._reset_stores(self._fresh_codecs() if self.config.calibration == "context" else self.codecs)

    # --- what attention reads (``attention.LayerView``) -------------------------------------------
    def exact_window(self, old: int) -> tuple[int, int]:
        """``(sink_end, recent_start)`` over the ``old`` rows before the current chunk; rows in
        between are the compressed part (none when keys are exact)."""
        if not self.compressed:
            return old, old
        sink_end = min(self.config.sink_tokens, old)
        return sink_end, max(sink_end, old - self.config.recent_tokens)

    def _exact_keys(self, read: Callable[[CodedRows], torch.Tensor]) -> torch.Tensor:
        """Exact keys of the rows ``read`` takes from a store: the key codes when they are exact, else
        the exact copy — plus the codes' reconstruction (decoded next to the model) when the copy
        holds residuals."""
        if self.exact_keys is None:
            return read(self.key_codes)
        keys = read(self.exact_keys)
        return keys + read(self.key_codes).to(HOST) if self.codecs.residual else keys

    def exact_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact keys and values of rows ``[start, stop)``, where the values live."""
        keys = self._exact_keys(lambda store: store.decoded(start, stop)).to(self.value_device)
        values = self.values.decoded(start, stop)
        if self.window is not None:
            keys, values = (self.window.over_range(t, start, part) for t, part in ((keys, "keys"), (values, "values")))
        return keys, values

    def approx_scores(self, queries: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Approximate ``q·k`` for rows ``[start, stop)`` from the codes, next to the model."""
        return approx_scores(self.key_codes.codec, queries.to(self.device, torch.float32),
                             self.key_codes.codes(start, stop), self.config.kernel)

    def exact_keys_at(self, index: torch.Tensor) -> torch.Tensor:
        keys = self._exact_keys(lambda store: store.gather_decoded(index.to(store.device))).to(self.value_device)
        return keys if self.window is None else self.window.over(keys, index, "keys")

    def values_at(self, index: torch.Tensor) -> torch.Tensor:
        values = self.values.gather_decoded(index)
        return values if self.window is None else self.window.over(values, index, "values")

    def row_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole ``(heads, capacity, dim)`` buffers of the exact keys and of the values, when both keep
        plain float rows of one layout where the values live: a fused kernel reads the selected rows in
        place.  None when either is quantized or holds residuals, or when 16-bit copies stand in
        for some rows."""
        keys = self.exact_keys if self.exact_keys is not None else self.key_codes
        stores = (keys, self.values)
        if self.codecs.residual or self.window is not None or any(
                not isinstance(s.codec, IdentityCodec) or s.rows is None or s.device != self.value_device
                for s in stores):
            return None
        key_rows, value_rows = keys.rows.data, self.values.rows.data
        if key_rows.dtype != value_rows.dtype or key_rows.stride() != value_rows.stride() \
                or key_rows.shape != value_rows.shape:
            return None
        return key_rows, value_rows

    def record_selection(self, selected: int, selectable: int) -> None:
        self.selected_rows += selected
        self.selectable_rows += selectable
        self.last_selected = selected

    def observe(self, step_mass: torch.Tensor, queries: int) -> None:
        self.policy.accumulate(self.mass.writable(), step_mass, queries)

    # --- after each step: the model's sliding window and the budget ---------------------------
    def after_attention(self, sliding_window: int | None) -> None:
        """Drop rows no later query can see (outside the model's sliding window), then evict
        down to the budget.  Runs inside transactions too: rollback restores what it drops."""
        if sliding_window is not None and len(self):
            positions = self.positions.view()[0]
            if int(positions[0]) <= self.seen - sliding_window:  # the next query sits at position `seen`
                self._keep((positions > self.seen - sliding_window).nonzero().flatten())
        self._evict_if_needed()
        if self.window is not None:  # the chunk's copies were for this step; the next reads fewer rows exactly
            self.window = self.window.trimmed(len(self), self.config.sink_tokens, self.config.recent_tokens)

    def budget_rows(self) -> int | None:
        budget = self.config.budget
        if budget is None:
            return None
        rows = budget if isinstance(budget, int) else math.ceil(budget * self.seen)
        return max(rows, self.config.sink_tokens + self.config.recent_tokens + 1)

    def _evict_if_needed(self) -> None:
        """Drop rows beyond the budget; amortized by a small slack so compaction is not per step."""
        budget = self.budget_rows()
        if budget is None or len(self) <= budget + min(64, budget // 8):
            return
        mass = self.mass.view() if self.mass is not None else torch.zeros(self.heads, len(self))
        score = self.policy.score(mass, self.positions.view()[0]).to(HOST)
        sinks = self.config.sink_tokens if self.policy.keeps_sinks else 0
        self._keep(rows_to_keep(score, budget, sinks, self.config.recent_tokens))

    def _keep(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (ascending) of every store, logging for rollback what an open
        transaction will need back."""
        txn = self._txn
        if txn is not None:
            dropped = torch.ones(len(self), dtype=torch.bool)
            dropped[index.to(HOST)] = False
            dropped &= self.positions.view()[0] < txn.floor
            if bool(dropped.any()):
                rows = dropped.nonzero().flatten()
                txn.dropped.append({name: store.take(rows) for name, store in self._stores().items()})
        for store in self._all_stores().values():
            store.keep(index)
        if self.window is not None:
            self.window = self.window.kept(index)

    # --- transactions ------------------------------------------------------------------------
    def begin(self) -> None:
        self._require_no_transaction("begin a transaction")
        self._txn = _Transaction(len(self), self.seen, (self.selected_rows, self.selectable_rows, self.last_selected),
                                 None if self.mass is None else self.mass.fork(), self.window, floor=self.seen)

    def commit(self) -> None:
        self._txn = None
        self.calibrate_if_ready()

    def rollback(self) -> None:
        """Restore the state ``begin`` saw, rows evicted since included, exactly."""
        txn, self._txn = self._txn, None
        if txn is None:
            return
        if not txn.dropped:
            for store in self._stores().values():
                store.truncate(txn.rows)
        else:  # merge the surviving old rows with the evicted ones, back in position order
            survivors = int((self.positions.view()[0] < txn.floor).sum())
            kept = torch.arange(survivors)
            merged = {name: torch.cat([store.take(kept)] + [d[name] for d in txn.dropped], dim=1)
                      for name, store in self._stores().items()}
            order = merged["positions"][0].argsort()
            for name, store in self._stores().items():
                store.replace(merged[name][:, order])
        if txn.mass is not None:
            self.mass = txn.mass
        self.window = txn.window
        self.seen = txn.seen
        self.selected_rows, self.selectable_rows, self.last_selected = txn.counters

    def crop(self, tokens: int) -> None:
        """Forget every token at position ``tokens`` and beyond.  Rows are kept in position order, so
        the rows that stay are a prefix; on a bounded layer they are the kept rows below that
        position.  Inside a transaction the cropped rows are logged and come back on rollback."""
        if tokens >= self.seen:
            return
        index = torch.arange(int((self.positions.view()[0] < tokens).sum()))
        if self._txn is not None:
            self._keep(index)
            self._txn.floor = min(self._txn.floor, tokens)
        else:
            for store in self._all_stores().values():
                store.truncate(len(index))
            if self.window is not None:
                self.window = self.window.truncated(len(index))
        self.seen = tokens

    def exact_prefix(self, tokens: int) -> int:
        """The longest prefix of at most ``tokens`` tokens that ``crop`` leaves exactly as a layer given
        only those tokens would hold them, so that prefilling the rest answers as one fresh prefill.

        Shorter when what the layer holds below ``tokens`` was shaped by the tokens after it: a row
        there was evicted (or left the model's sliding window); the rows carry attention mass from
        later queries, which a later eviction would choose by (then nothing is kept); or a 16-bit
        copy the next step would read was trimmed when its row left the recent rows, and only the
        row's codes remain.  Rows below the first such row are always exact."""
        if tokens >= self.seen:
            return tokens
        if self.mass is not None:
            return 0
        positions = self.positions.view()[0]
        tokens = min(tokens, _first_missing(positions))
        if self.window is not None:
            rows = torch.arange(tokens)
            needed = rows[ExactCopies.read_exactly(rows, tokens, self.config.sink_tokens, self.config.recent_tokens)]
            if not bool(torch.isin(needed, self.window.rows).all()):
                tokens = min(tokens, _first_missing(self.window.rows))
        return tokens

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    def _require_no_transaction(self, what: str) -> None:
        if self._txn is not None:
            raise RuntimeError(f"cannot {what} while a transaction is open on this cache; finish it first")

    # --- calibration -------------------------------------------------------------------------
    def load_codec_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Fitted codec tensors (``{"keys": ..., "exact_keys": ...}``) for an empty layer."""
        if len(self):
            raise RuntimeError("codec states can only be loaded into an empty layer")
        codecs = self._fresh_codecs()
        for name in ("keys", "exact_keys"):
            codec = getattr(codecs, name)
            if codec is not None and codec.needs_fit:
                codec.load_state_dict(states.get(name, {}))
        self._reset_stores(codecs)

    def calibrate_if_ready(self) -> None:
        """``calibration="context"``: fit the key codecs on this layer's committed keys once enough
        tokens have arrived, and re-encode the rows kept so far with them."""
        if self.calibrated or self.config.calibration != "context" or self.seen < self.config.calibration_tokens:
            return
        keys = self.key_codes.decoded()  # still exact: identity codes
        codecs = self._fresh_codecs()  # never the codecs a fork may share
        codecs.fit(keys.float())
        key_codes = CodedRows(codecs.keys, self.device, self.config.store_growth)
        key_codes.append(keys)
        exact = None
        if codecs.exact_keys is not None:
            exact = CodedRows(codecs.exact_keys, HOST, self.config.store_growth)
            exact.append(codecs.exact_input(keys, key_codes.codes()))
        self.codecs, self.key_codes, self.exact_keys, self.calibrated = codecs, key_codes, exact, True

    # --- branching ---------------------------------------------------------------------------
    def fork(self) -> "HCLayer":
        """A branch sharing every store copy-on-write."""
        self._require_no_transaction("fork")
        twin = copy.copy(self)
        for name, store in self._all_stores().items():
            setattr(twin, name, store.fork())
        twin._returned = None
        return twin

    # --- bytes -------------------------------------------------------------------------------
    def device_bytes(self, reserved: bool = False) -> int:
        """Next to the model: key codes and codebooks, and values (with their 16-bit copies) when placed there."""
        total = self.key_codes.reserved_bytes() if reserved else self.key_codes.nbytes()
        return total + (self._value_side_bytes(reserved) if self.config.value_placement == "device" else 0)

    def host_bytes(self, reserved: bool = False) -> int:
        """Host memory: the exact key copy, values (and 16-bit copies) when offloaded, and (reserved only)
        bookkeeping."""
        stores: list[CodedRows | RowBuffer] = [s for s in (self.exact_keys,) if s is not None]
        if reserved:
            stores += [self.positions] + ([self.mass] if self.mass is not None else [])
        total = sum(s.reserved_bytes() if reserved else s.nbytes() for s in stores)
        return total + (self._value_side_bytes(reserved) if self.config.value_placement == "host" else 0)

    def _value_side_bytes(self, reserved: bool) -> int:
        """The values and the 16-bit copies, which live beside them."""
        values = self.values.reserved_bytes() if reserved else self.values.nbytes()
        return values + (0 if self.window is None else self.window.nbytes())


def _first_missing(ascending: torch.Tensor) -> int:
    """The smallest ``n >= 0`` not among ``ascending`` (distinct, ascending non-negative ints)."""
    gaps = (ascending != torch.arange(len(ascending), device=ascending.device)).nonzero()
    return int(gaps[0]) if len(gaps) else len(ascending)


def query_length_of(query_length: int | torch.Tensor) -> int:
    # transformers 5.2 passes cache_position (a tensor of the chunk's positions); later versions an int
    return int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
