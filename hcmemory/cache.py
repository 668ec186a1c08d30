"""HCCache: the KV state as a transformers ``Cache``, one ``HCLayer`` per transformer layer.

Build one with ``HCCache.for_model(model, config, tokenizer)``: it switches the model to the
``hcattention`` function and gives the layers their fitted key codecs (calibration is the
factory's job; ``HCCache(model, config)`` alone builds empty, uncalibrated layers, which is what a
checkpoint restores into).  Pass it to ``model(...)`` / ``model.generate(...)`` like any cache,
with ``glue.cache_kwarg(model, cache)`` picking the argument name the installed transformers uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from .calibration import shipped_codec_states
from .config import HCConfig, coerce_config, is_int
from .glue import ATTN_IMPLEMENTATION, attention_implementation, use_hcattention
from . import layer_state
from .layer import HCLayer, query_length_of
from .models import SLIDING, check_layer_kinds, check_model, layer_configs, layer_kinds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheStats:
    """What the state holds, measured from the stored tensors."""

    tokens_seen: int
    tokens_kept: int
    """Rows kept, summed over layers (divide by ``layers`` for a per-layer figure)."""
    layers: int
    device_bytes: int
    """Next to the model: key codes, codebooks, values when placed there (live rows)."""
    host_bytes: int
    """Host memory: exact keys for re-scoring, values when offloaded (live rows)."""
    reserved_bytes: int
    """Everything the buffers hold allocated, growth slack and bookkeeping included: what the
    process really spends, and what ``ContextPool.max_host_bytes`` counts."""
    full_fp16_bytes: int
    """What a full fp16 cache would take: every token seen in a global layer, the window's rows in a
    sliding one (``HCCache.kinds``)."""
    selected_fraction: float | None
    """Share of compressed rows read per step (top-p selection), None when nothing was selected."""

    @property
    def device_ratio(self) -> float:
        return self.device_bytes / self.full_fp16_bytes if self.full_fp16_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device_ratio": self.device_ratio}


class HCCache(Cache):
    """A transformers cache holding one conversation's HCAttention KV state (batch size 1)."""

    def __init__(self, model: torch.nn.Module, config: HCConfig | str | dict | None = None) -> None:
        check_model(model)
        config = coerce_config(config)
        mc = model.config
        use_hcattention(model)
        heads = mc.num_key_value_heads
        dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        param = next(model.parameters())
        self.config = config
        self.model_config = mc
        self.max_positions: int | None = getattr(mc, "max_position_embeddings", None)
        self._warned_positions = False
        self.kinds = layer_kinds(mc)
        """``"global"`` or ``"sliding"`` per layer (``models/kinds.py``): sliding layers keep exact rows of
        their window under the identity configuration, global layers run ``config``."""
        layers = [HCLayer(layer_config, heads, dim, param.device, param.dtype, index=i)
                  for i, layer_config in enumerate(layer_configs(mc, config))]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model: torch.nn.Module, config: HCConfig | str | dict | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> "HCCache":
        """A cache ready for ``model``: key codecs fitted on the shipped calibration text (once per
        model and codec shape, then loaded from disk in milliseconds), or left to the context's own
        keys with ``calibration="context"``."""
        cache = cls(model, config)
        states = shipped_codec_states(model, cache.config, tokenizer) if cache.config.calibration == "shipped" \
            else None
        if states is not None:
            for layer, layer_states in zip(cache.layers, states):
                layer.load_codec_states(layer_states)
        return cache

    # --- transformers' cache interface -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return query_length_of(query_length), 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_implementation(self.model_config) != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"the model runs attention implementation {attention_implementation(self.model_config)!r}, which "
                "would attend over the current chunk only; HCCache needs 'hcattention' "
                "(model.set_attn_implementation('hcattention'), or build the cache again)")
        if layer_idx == 0:
            self._warn_past_trained_length(key_states.shape[2])
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _warn_past_trained_length(self, new_tokens: int) -> None:
        if self._warned_positions or self.max_positions is None or self.seen + new_tokens <= self.max_positions:
            return
        self._warned_positions = True
        log.warning(
            "this context passes the model's trained length (max_position_embeddings=%d): from here on quality "
            "degrades as it would with a full cache. Keys are cached after RoPE, so no preset re-bases positions; "
            "bounded presets (hc-12.5-bounded, streaming, h2o) only keep memory and step time bounded. Keep "
            "contexts within the window or use a model trained for longer ones.", self.max_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HCCache holds one sequence; beam search is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("HCCache holds one sequence; num_return_sequences > 1 is not supported")

    # --- state management --------------------------------------------------------------------
    @property
    def seen(self) -> int:
        return self.layers[0].seen

    @property
    def in_transaction(self) -> bool:
        return self.layers[0].in_transaction

    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator[None]:
        """Run appends that either all stay or leave no trace.

        On an error or interrupt (or with ``commit=False``, for a temporary question overlay) every
        layer is rolled back exactly: rows (evicted ones included) and counters as they were.
        Transactions do not nest.
        """
        if self.in_transaction:
            raise RuntimeError("a transaction is already open on this cache; transactions do not nest")
        for layer in self.layers:
            layer.begin()
        try:
            yield
        except BaseException:
            self._end(commit=False)
            raise
        self._end(commit)

    def _end(self, commit: bool) -> None:
        for layer in self.layers:
            layer.commit() if commit else layer.rollback()

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def crop(self, max_length: int) -> None:
        """Forget everything after the first ``max_length`` tokens (negative: drop that many from the
        end), as transformers' caches do.  What stays is what the cache holds below that position,
        which is what a cache given only those tokens holds up to ``exact_prefix`` (not beyond: a
        bounded preset's evicted rows and a trimmed 16-bit copy do not come back; ``HCContext``
        prefills again from there).  Inside a transaction a rollback brings the cropped rows back."""
        if not is_int(max_length):
            raise TypeError(f"max_length must be an int, not {type(max_length).__name__}")
        tokens = self.seen + max_length if max_length < 0 else max_length
        if tokens < 0:
            raise ValueError(f"cannot drop {-max_length} tokens from a cache that has seen {self.seen}")
        for layer in self.layers:
            layer.crop(tokens)

    def exact_prefix(self, tokens: int) -> int:
        """The longest prefix of at most ``tokens`` tokens that ``crop`` keeps exactly as a cache given
        only those tokens would hold them (``HCLayer.exact_prefix``): crop to it and prefill the rest
        of a prompt, and the answer is that of a fresh prefill.  ``tokens`` itself for unbounded
        presets without 16-bit copies; for the others it can be far shorter."""
        return min(layer.exact_prefix(tokens) for layer in self.layers)

    def state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """Copies of all layers' tensors (keys prefixed ``"{layer}."``) and per-layer counters and kinds."""
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            layer_tensors, meta = layer_state.dump(layer)
            tensors.update({f"{i}.{k}": v for k, v in layer_tensors.items()})
            metas.append({**meta, "kind": kind})
        return tensors, metas

    def load_state(self, tensors: dict[str, torch.Tensor], metas: list[dict[str, Any]]) -> None:
        """Fill this fresh, same-configuration cache from ``state()`` output (``ValueError`` if it does not fit)."""
        if len(metas) != len(self.layers):
            raise ValueError(f"checkpoint has {len(metas)} layers, the model has {len(self.layers)}")
        check_layer_kinds([meta.get("kind") for meta in metas], self.kinds)
        grouped: list[dict[str, torch.Tensor]] = [{} for _ in self.layers]
        for name, tensor in tensors.items():
            index, _, rest = name.partition(".")
            if not index.isdigit() or int(index) >= len(self.layers):
                raise ValueError(f"checkpoint tensor {name!r} belongs to no layer of this model")
            grouped[int(index)][rest] = tensor
        for layer, layer_tensors, meta in zip(self.layers, grouped, metas):
            layer_state.load(layer, layer_tensors, {k: v for k, v in meta.items() if k != "kind"})
        seen = {layer.seen for layer in self.layers}
        if len(seen) != 1:
            raise ValueError(f"checkpoint layers have seen different numbers of tokens: {sorted(seen)}")

    def fork(self) -> "HCCache":
        """A branch of this state: O(1) now, stores are copied only when one side writes."""
        if self.in_transaction:
            raise RuntimeError("cannot fork while a transaction is open on this cache; finish it first")
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.layers = [layer.fork() for layer in self.layers]
        return twin

    def stats(self) -> CacheStats:
        """Bytes of every layer's stores, sliding layers included; the fp16 reference holds what a full
        cache keeps: every token in a global layer, the window's rows in a sliding one."""
        layers: list[HCLayer] = self.layers
        selected = sum(layer.selected_rows for layer in layers)
        selectable = sum(layer.selectable_rows for layer in layers)
        per_token_fp16 = 2 * 2 * layers[0].heads * layers[0].dim  # keys + values, 2 bytes each
        # a query at position p sees keys at positions > p - window: a sliding layer keeps window - 1 rows
        window = self.model_config.sliding_window if SLIDING in self.kinds else 0
        full_rows = sum(min(self.seen, window - 1) if kind == SLIDING else self.seen for kind in self.kinds)
        return CacheStats(
            tokens_seen=self.seen,
            tokens_kept=sum(len(layer) for layer in layers),
            layers=len(layers),
            device_bytes=sum(layer.device_bytes() for layer in layers),
            host_bytes=sum(layer.host_bytes() for layer in layers),
            reserved_bytes=sum(layer.device_bytes(reserved=True) + layer.host_bytes(reserved=True)
                               for layer in layers),
            full_fp16_bytes=full_rows * per_token_fp16,
            selected_fraction=selected / selectable if selectable else None,
        )
