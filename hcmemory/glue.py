"""What transformers needs to run a model on an HCCache: the registered attention function, the
verified hand-off of a layer from ``cache.update`` to that function, and the one helper that
passes a cache to ``forward`` / ``generate`` under the argument name the installed version uses.

**The hand-off.**  transformers calls ``cache.update(...)`` and then the attention function; the
attention function is not given the cache.  Since 5.2x, ``update`` receives the attention
module's forward kwargs (``kwargs=``), the same dict that is then splatted into the attention
call, so the layer travels inside it (``hc_layer``).  Older versions get the layer through a
thread-local.  Either way the pairing is verified: the key tensor the attention function receives
must be the one ``update`` returned for that layer, otherwise the call raises instead of
attending over the wrong rows.  ``HCCache.update`` also refuses to run when the model's attention
implementation is not ``hcattention``: another function would attend over the current chunk only.
A batched decode step (``batching.py``) hands off a ``BatchedLayers``, the same layer of every member
of the batch, under the same check: the keys must be the whole batch's, as its ``update`` returned them.

Private transformers names this package relies on, and why (checked by the test suite on 5.2
and on the newest 5.x):

* ``config._attn_implementation`` — the only way to read which attention function a model runs
  (``set_attn_implementation`` is public, reading it back is not);
* ``transformers.masking_utils.sdpa_mask`` — the mask builder registered for ``hcattention``
  (transformers requires one per attention name; the mask itself is not used, see ``attention.py``);
* ``DynamicCache.layers[i].keys`` — post-RoPE keys of the calibration pass (``calibration.py``);
* ``model.hf_quantizer`` — cleared after de-quantizing the GGUF so ``save_pretrained`` writes
  plain weights (``models/gguf.py``).
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import LayerView, attend

ATTN_IMPLEMENTATION = "hcattention"
_KWARG = "hc_layer"

_pending = threading.local()


class HandedLayer(LayerView, Protocol):
    """A layer that can be handed to the attention function (``layer.HCLayer``)."""

    index: int

    def returned_keys(self) -> torch.Tensor | None: ...
    def after_attention(self, window: int | None) -> None: ...


class BatchedLayers:
    """Layer ``index`` of every member of a batched decode step: row ``i`` of the batch is
    ``layers[i]``'s one query; rows past the members (``None``) pad the batch and attend to nothing.

    A member whose update or attention raised is recorded in ``failures`` (shared by every layer of the
    forward) and skipped from then on, its row left zero: the rows never mix, so the other members'
    results are those they would have had without it, and the failing one gets its error back (its own
    transaction then rolls its partial step back)."""

    def __init__(self, index: int, layers: list[HandedLayer | None], keys: torch.Tensor,
                 failures: dict[int, Exception]) -> None:
        self.index, self.layers, self.failures = index, layers, failures
        self._keys = weakref.ref(keys)

    def returned_keys(self) -> torch.Tensor | None:
        return self._keys()

    def attend(self, query: torch.Tensor, scaling: float, window: int | None) -> torch.Tensor:
        """Each member's ``(1, q_heads, 1, dim)`` query row over its own state, as ``(rows, q_heads, 1, dim)``."""
        out = torch.zeros_like(query)
        for i, layer in enumerate(self.layers):
            if layer is None or i in self.failures:
                continue
            try:
                out[i:i + 1] = _attend_one(layer, query[i:i + 1], scaling, window)
            except Exception as exc:  # noqa: BLE001 - this member's error, returned to it alone
                self.failures[i] = exc
        return out


def hand_off(layer: HandedLayer | BatchedLayers, forward_kwargs: dict[str, Any] | None) -> None:
    """Called by ``HCLayer.update``: make ``layer`` the one the next attention call reads.

    When the previous layer of the same forward was handed off and never claimed (its keys still
    alive), its attention ran through another function, which saw only the chunk: that forward is
    wrong, so it stops here.
    """
    previous = getattr(_pending, "layer", None)
    if previous is not None and previous.index == layer.index - 1 and previous.returned_keys() is not None:
        _pending.layer = None
        raise RuntimeError(
            f"HCCache layer {previous.index} was updated but its attention never ran through hcattention "
            "(the model changed the keys after the cache update, or another attention function ran); the outputs "
            "of that forward are wrong. This model/transformers combination is not supported.")
    if isinstance(forward_kwargs, dict):
        forward_kwargs[_KWARG] = layer
    _pending.layer = layer


def _claim(kwargs: dict[str, Any], key: torch.Tensor, module: torch.nn.Module
           ) -> HandedLayer | BatchedLayers | None:
    """The HCCache layer this attention call belongs to, or None for a call on another cache."""
    handed = kwargs.pop(_KWARG, None)
    pending = getattr(_pending, "layer", None)
    _pending.layer = None
    if handed is not None:
        if handed.returned_keys() is not key:
            raise RuntimeError(
                f"hcattention: layer {getattr(module, 'layer_idx', '?')} received keys that are not the ones HCCache "
                f"layer {handed.index} returned from update(); the model changed them between the cache update and "
                "attention, which hcmemory does not support. Refusing to attend over the wrong rows.")
        return handed
    if pending is not None and pending.returned_keys() is key:
        return pending
    return None  # not an HCCache call: a pending layer with other keys was updated outside any forward


def hc_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function: HCAttention for HCCache layers, SDPA for anything else.

    Same parameter order as transformers' own attention functions, so wrappers that pass
    ``dropout`` positionally (kvpress patches every registered function) call it correctly."""
    layer = _claim(kwargs, key, module)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    window = kwargs.get("sliding_window")
    out = layer.attend(query, scaling, window) if isinstance(layer, BatchedLayers) \
        else _attend_one(layer, query, scaling, window)
    return out.transpose(1, 2).contiguous(), None


def _attend_one(layer: HandedLayer, query: torch.Tensor, scaling: float, window: int | None) -> torch.Tensor:
    out = attend(layer, query, scaling, window)
    layer.after_attention(window)
    return out


def register() -> None:
    """Register ``hcattention`` (and its mask builder) with transformers; idempotent.

    The mask builder is SDPA's: HCCache reports mask sizes covering only the current chunk, so
    the mask transformers builds is small; ``attention.py`` derives visibility from positions.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, hc_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_hcattention(model: torch.nn.Module) -> None:
    """Switch ``model`` to ``hcattention`` (SDPA for every call that is not on an HCCache)."""
    register()
    if attention_implementation(model.config) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def attention_implementation(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


def cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` where ``forward``/``generate`` take ``cache=`` (transformers >= 5.2x, where
    ``past_key_values=`` is deprecated), else ``{"past_key_values": cache}``."""
    return {_cache_argument(type(model)): cache}


_ARGUMENT_NAMES: "weakref.WeakKeyDictionary[type, str]" = weakref.WeakKeyDictionary()


def _cache_argument(model_class: type) -> str:
    name = _ARGUMENT_NAMES.get(model_class)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
        _ARGUMENT_NAMES[model_class] = name
    return name
