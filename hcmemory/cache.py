"""HCCache: the KV state as a transformers ``Cache``, one ``HCLayer`` per transformer layer.

A layer holds its tokens as rows of a few stores:

* key codes next to the model (the codec decides: full keys, VQ indices, packed ints);
* when keys are compressed and re-scored, an exact copy of the keys on the host, read only for
  the rows a step selects and for the exact window (without re-scoring, as in the paper and
  KIVI, there is no exact copy and every score comes from the codes);
* values, on the host or next to the model;
* each row's absolute position, and its cumulative attention mass when a policy needs it.

Two lengths are kept apart: ``seen`` (tokens ever appended, which gives positions and is what
``get_seq_length`` reports to transformers) and ``len(layer)`` (rows kept, which attention spans).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import ATTN_IMPLEMENTATION, register, set_active_layer
from .calibration import load_or_fit_codebooks
from .codecs import Codec, make_codec
from .config import HCConfig
from .eviction import EvictionPolicy, make_policy, rows_to_keep
from .models import SUPPORTED_MODEL_TYPES
from .stores import CodedRows, RowBuffer

HOST = torch.device("cpu")


def _codecs_for(config: HCConfig, heads: int, dim: int, dtype: torch.dtype) -> tuple[Codec, Codec | None, Codec]:
    """(key codec next to the model, exact host-key codec or None, value codec)."""
    keys = make_codec(config.key_codec, heads, dim, dtype=dtype, subvector_dim=config.vq_subvector_dim,
                      centroids=config.vq_centroids, sharing=config.vq_codebook, kmeans_iters=config.kmeans_iters,
                      axis="channel")
    host_keys = (make_codec(config.rescore_keys, heads, dim, dtype=dtype, axis="channel")
                 if config.compressed_keys and config.rescore else None)
    values = make_codec(config.value_codec, heads, dim, dtype=dtype, axis="token")
    return keys, host_keys, values


class HCLayer(CacheLayerMixin):
    """One transformer layer's KV state (see the module docstring for what it holds)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, config: HCConfig, heads: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.heads, self.dim = heads, dim
        self.device, self.dtype = device, dtype
        key_codec, host_key_codec, value_codec = _codecs_for(config, heads, dim, dtype)
        growth = config.store_growth
        self.key_codes = CodedRows(key_codec, device, growth)
        self.host_keys = None if host_key_codec is None else CodedRows(host_key_codec, HOST, growth)
        value_device = HOST if config.value_placement == "host" else device
        self.values = CodedRows(value_codec, value_device, growth)
        self.positions = RowBuffer(1, (), torch.int64, HOST, growth)
        self.policy: EvictionPolicy | None = make_policy(config.eviction)
        self.observes_attention = self.policy is not None and self.policy.uses_attention
        self.mass = RowBuffer(heads, (), torch.float32, value_device, growth) if self.observes_attention else None
        self.needs_explicit_attention = config.compressed_keys or self.observes_attention
        self.seen = 0
        self.selected_rows = 0
        self.selectable_rows = 0
        self.last_selected = 0
        self.defer_eviction = False
        self.is_initialized = True

    # --- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Stores are built eagerly from the model config; nothing to do lazily."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the chunk's post-RoPE keys and values; attention then reads them from the stores."""
        if key_states.shape[0] != 1:
            raise ValueError("HCCache holds one sequence; use one cache per conversation (batch size 1)")
        keys, values = key_states[0], value_states[0]
        n = keys.shape[1]
        key_codec = self.key_codes.codec
        if key_codec.needs_fit:
            if self.config.calibration != "context":
                raise RuntimeError("VQ codebooks are not calibrated; build the cache with HCCache(model, config) "
                                   "so it loads or fits them, or use calibration='context'")
            key_codec.fit(keys.float())
        self.key_codes.append(keys)
        if self.host_keys is not None:
            self.host_keys.append(keys)
        self.values.append(values)
        self.positions.append(torch.arange(self.seen, self.seen + n, dtype=torch.int64)[None])
        if self.mass is not None:
            self.mass.append(torch.zeros(self.heads, n))
        self.seen += n
        set_active_layer(self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        """Only the chunk's own causal triangle: earlier rows are always visible to it."""
        return _query_length(query_length), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # transformers 5.2 name

    def reset(self) -> None:
        self.restore(_LayerMark(0, 0, 0, 0, None))

    # --- what attention reads ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.values)

    def exact_window(self, old: int) -> tuple[int, int]:
        """``(sink_end, recent_start)`` over the ``old`` rows before the current chunk; rows in
        between are the compressed part (none when keys are exact)."""
        if not self.config.compressed_keys:
            return old, old
        sink_end = min(self.config.sink_tokens, old)
        return sink_end, max(sink_end, old - self.config.recent_tokens)

    def _exact_key_store(self) -> CodedRows:
        return self.key_codes if self.host_keys is None else self.host_keys

    def exact_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact keys and values of rows ``[start, stop)``, on the host side."""
        keys = self._exact_key_store().decoded(start, stop)
        return keys.to(self.values.device), self.values.decoded(start, stop)

    def approx_scores(self, queries: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Approximate ``q·k`` for rows ``[start, stop)`` from the codes, next to the model."""
        return self.key_codes.codec.score(queries.to(self.device, torch.float32), self.key_codes.codes(start, stop))

    def host_keys_at(self, index: torch.Tensor) -> torch.Tensor:
        return self._exact_key_store().gather_decoded(index).to(self.values.device)

    def values_at(self, index: torch.Tensor) -> torch.Tensor:
        return self.values.gather_decoded(index)

    def record_selection(self, selected: int, selectable: int) -> None:
        self.selected_rows += selected
        self.selectable_rows += selectable
        self.last_selected = selected

    # --- statistics and eviction -------------------------------------------------------------
    def observe(self, step_mass: torch.Tensor, queries: int) -> None:
        self.policy.accumulate(self.mass.writable(), step_mass, queries)

    def budget_rows(self) -> int | None:
        budget = self.config.budget
        if budget is None:
            return None
        rows = budget if isinstance(budget, int) else math.ceil(budget * self.seen)
        return max(rows, self.config.sink_tokens + self.config.recent_tokens + 1)

    def evict_if_needed(self) -> None:
        """Drop rows beyond the budget; amortized by a small slack so compaction is not per step."""
        budget = self.budget_rows()
        if budget is None or self.defer_eviction:
            return
        slack = min(64, budget // 8)
        if len(self) <= budget + slack:
            return
        mass = self.mass.view() if self.mass is not None else torch.zeros(self.heads, len(self))
        score = self.policy.score(mass, self.positions.view()[0]).to(HOST)
        sinks = self.config.sink_tokens if self.policy.keeps_sinks else 0
        self.keep(rows_to_keep(score, budget, sinks, self.config.recent_tokens))

    def keep(self, index: torch.Tensor) -> None:
        for store in self._stores():
            store.keep(index)

    def snapshot(self) -> "_LayerMark":
        """A restore point for ``restore``: lengths, counters and (copy-on-write) attention masses."""
        return _LayerMark(len(self), self.seen, self.selected_rows, self.selectable_rows,
                          None if self.mass is None else self.mass.fork())

    def restore(self, mark: "_LayerMark") -> None:
        """Forget everything appended since ``mark`` (no eviction may have run in between)."""
        for store in self._stores():
            store.truncate(mark.rows)
        if mark.mass is not None:
            mark.mass.truncate(mark.rows)
            self.mass = mark.mass
        self.seen, self.selected_rows, self.selectable_rows = mark.seen, mark.selected, mark.selectable

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Everything this layer holds, as tensors (rows and codec tables) and integers."""
        tensors: dict[str, torch.Tensor] = {}
        for name, store in self._named_stores().items():
            rows = store.rows if isinstance(store, CodedRows) else store
            if rows is not None:
                tensors[f"rows.{name}"] = rows.view()
            if isinstance(store, CodedRows):
                tensors.update({f"codec.{name}.{k}": v for k, v in store.codec.state_dict().items()})
        meta = {"seen": self.seen, "selected_rows": self.selected_rows, "selectable_rows": self.selectable_rows}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> None:
        """Inverse of ``state`` on a freshly built layer of the same configuration."""
        for name, store in self._named_stores().items():
            if isinstance(store, CodedRows):
                prefix = f"codec.{name}."
                codec_state = {k[len(prefix):]: v.to(store.device) for k, v in tensors.items()
                               if k.startswith(prefix)}
                if codec_state:
                    store.codec.load_state_dict(codec_state)
            rows = tensors.get(f"rows.{name}")
            if rows is None:
                continue
            if isinstance(store, CodedRows):
                store.append_raw(rows)
            else:
                store.append(rows)
        lengths = {len(store) if isinstance(store, CodedRows) else store.len for store in self._stores()}
        if len(lengths) != 1:
            raise ValueError(f"checkpoint layer is inconsistent: stores hold {sorted(lengths)} rows")
        self.seen, self.selected_rows, self.selectable_rows = meta["seen"], meta["selected_rows"], meta["selectable_rows"]

    def fork(self) -> "HCLayer":
        """A branch sharing every store copy-on-write."""
        twin = copy.copy(self)
        twin.key_codes = self.key_codes.fork()
        twin.host_keys = None if self.host_keys is None else self.host_keys.fork()
        twin.values = self.values.fork()
        twin.positions = self.positions.fork()
        twin.mass = None if self.mass is None else self.mass.fork()
        return twin

    def _named_stores(self) -> dict[str, CodedRows | RowBuffer]:
        stores: dict[str, CodedRows | RowBuffer] = {"key_codes": self.key_codes, "values": self.values,
                                                    "positions": self.positions}
        if self.host_keys is not None:
            stores["host_keys"] = self.host_keys
        if self.mass is not None:
            stores["mass"] = self.mass
        return stores

    def _stores(self) -> list[CodedRows | RowBuffer]:
        return list(self._named_stores().values())

    def device_bytes(self) -> int:
        """Bytes next to the model: key codes, codebooks, and values when placed there."""
        total = self.key_codes.nbytes()
        if self.config.value_placement == "device":
            total += self.values.nbytes()
        return total

    def host_bytes(self) -> int:
        total = 0 if self.host_keys is None else self.host_keys.nbytes()
        if self.config.value_placement == "host":
            total += self.values.nbytes()
        return total


def _query_length(query_length: int | torch.Tensor) -> int:
    # transformers 5.2 passes cache_position (a tensor of the chunk's positions); later versions an int
    return int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)


@dataclass(frozen=True)
class _LayerMark:
    rows: int
    seen: int
    selected: int
    selectable: int
    mass: RowBuffer | None


@dataclass(frozen=True)
class CacheStats:
    """What the state holds, measured from the stored tensors."""

    tokens_seen: int
    tokens_kept: int
    """Rows kept, summed over layers (divide by ``layers`` for a per-layer figure)."""
    layers: int
    device_bytes: int
    """Next to the model: key codes, codebooks, values when placed there."""
    host_bytes: int
    """Host memory: exact keys for re-scoring, values when offloaded."""
    full_fp16_bytes: int
    """What a full fp16 cache of every token seen would take."""
    selected_fraction: float | None
    """Share of compressed rows read per step (top-p selection), None when nothing was selected."""

    @property
    def device_ratio(self) -> float:
        return self.device_bytes / self.full_fp16_bytes if self.full_fp16_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device_ratio": self.device_ratio}


class HCCache(Cache):
    """A transformers cache holding one conversation's HCAttention KV state.

    Pass it as ``past_key_values`` to ``model(...)`` or ``model.generate(...)``.  Building it
    registers the ``hcattention`` attention function and switches the model to it; that function
    falls back to SDPA for any call that does not come through an HCCache, so the model keeps
    working with other caches.  ``tokenizer`` is only needed to calibrate VQ codebooks on the
    shipped text the first time for a model (found next to the model when not given);
    ``calibrate=False`` skips that, for a cache whose codebooks come from a checkpoint.
    """

    def __init__(self, model: torch.nn.Module, config: HCConfig | str | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, *, calibrate: bool = True) -> None:
        config = HCConfig.preset(config) if isinstance(config, str) else (config or HCConfig())
        mc = model.config
        if getattr(mc, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"HCCache supports model types {sorted(SUPPORTED_MODEL_TYPES)}, not {mc.model_type!r}")
        register()
        if mc._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        heads = mc.num_key_value_heads
        dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        param = next(model.parameters())
        self.config = config
        self.q_heads = mc.num_attention_heads
        layers = [HCLayer(config, heads, dim, param.device, param.dtype) for _ in range(mc.num_hidden_layers)]
        super().__init__(layers=layers)
        if config.key_codec == "vq" and config.calibration == "shipped" and calibrate:
            load_or_fit_codebooks(model, self, tokenizer)

    # --- transformers' cache interface -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return _query_length(query_length), 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HCCache holds one sequence; beam search is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("HCCache holds one sequence; num_return_sequences > 1 is not supported")

    # --- state management --------------------------------------------------------------------
    @property
    def seen(self) -> int:
        return self.layers[0].seen

    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator[None]:
        """Run appends that either all stay or leave no trace.

        Eviction is deferred to the end of the block, so that on an error or interrupt (or with
        ``commit=False``, for a temporary question overlay) the state is rolled back exactly:
        rows truncated, counters and attention masses restored.
        """
        marks = [layer.snapshot() for layer in self.layers]
        outermost = not self.layers[0].defer_eviction
        for layer in self.layers:
            layer.defer_eviction = True
        try:
            yield
        except BaseException:
            self._restore(marks)
            raise
        else:
            if not commit:
                self._restore(marks)
        finally:
            for layer in self.layers:
                layer.defer_eviction = not outermost
        with torch.inference_mode():  # the stores were filled under inference mode
            for layer in self.layers:
                layer.evict_if_needed()

    def _restore(self, marks: list[_LayerMark]) -> None:
        for layer, mark in zip(self.layers, marks):
            layer.restore(mark)

    def state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, int]]]:
        """All layers' tensors (keys prefixed ``"{layer}."``) and per-layer integers, for checkpoints."""
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, layer in enumerate(self.layers):
            layer_tensors, meta = layer.state()
            tensors.update({f"{i}.{k}": v for k, v in layer_tensors.items()})
            metas.append(meta)
        return tensors, metas

    def load_state(self, tensors: dict[str, torch.Tensor], metas: list[dict[str, int]]) -> None:
        """Fill this (empty, same-configuration) cache from ``state()`` output."""
        if len(metas) != len(self.layers):
            raise ValueError(f"checkpoint has {len(metas)} layers, the model has {len(self.layers)}")
        for i, (layer, meta) in enumerate(zip(self.layers, metas)):
            prefix = f"{i}."
            layer.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta)

    def fork(self) -> "HCCache":
        """A branch of this state: O(1) now, stores are copied only when one side writes."""
        twin = copy.copy(self)
        twin.layers = [layer.fork() for layer in self.layers]
        return twin

    def stats(self) -> CacheStats:
        layers: list[HCLayer] = self.layers
        selected = sum(layer.selected_rows for layer in layers)
        selectable = sum(layer.selectable_rows for layer in layers)
        per_token_fp16 = 2 * 2 * layers[0].heads * layers[0].dim  # keys + values, 2 bytes each
        return CacheStats(
            tokens_seen=self.seen,
            tokens_kept=sum(len(layer) for layer in layers),
            layers=len(layers),
            device_bytes=sum(layer.device_bytes() for layer in layers),
            host_bytes=sum(layer.host_bytes() for layer in layers),
            full_fp16_bytes=self.seen * per_token_fp16 * len(layers),
            selected_fraction=selected / selectable if selectable else None,
        )
