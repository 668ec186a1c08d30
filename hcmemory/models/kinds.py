"""Which layers of a model attend globally and which over a sliding window, and the configuration
each kind of layer runs.

Models such as Gemma 3 interleave sliding-window layers (Gemma 3 270M: five of every six, a window
of 512) with global ones.  A sliding layer never holds more than its window, so compressing or
evicting its rows would cost accuracy for almost no memory: it keeps exact rows under the identity
configuration, and the model's window alone bounds it (``HCLayer.after_attention`` drops the rows
no later query can see).  Only the global layers, which grow with the context, run the preset's
codecs, selection, host rows and eviction.

The kind comes from ``config.layer_types`` (transformers' per-layer attention types).  A family
without it (Mistral, whose optional window applies to every layer) has only global layers, which
keep the preset and drop rows outside the window as before.
"""

from __future__ import annotations

from typing import Any

from ..config import HCConfig

GLOBAL = "global"
SLIDING = "sliding"
LAYER_KINDS = (GLOBAL, SLIDING)
"""The kinds a layer can be; checkpoints record one per layer."""


def layer_kinds(model_config: Any) -> list[str]:
    """``"sliding"`` for each layer that transformers runs with a sliding window, ``"global"`` for the others."""
    layers = model_config.num_hidden_layers
    types = getattr(model_config, "layer_types", None)
    if types is None or getattr(model_config, "sliding_window", None) is None:
        return [GLOBAL] * layers
    if len(types) != layers:
        raise ValueError(f"the model config lists {len(types)} layer_types for {layers} layers; it is inconsistent")
    return [SLIDING if kind == "sliding_attention" else GLOBAL for kind in types]


def sliding_layer_config(config: HCConfig) -> HCConfig:
    """The identity configuration (``full``) for a sliding layer of a cache running ``config``: exact rows
    next to the model, nothing selected or evicted; only how the kernels are picked and how buffers grow
    follow ``config``."""
    return HCConfig(kernel=config.kernel, store_growth=config.store_growth)


def layer_configs(model_config: Any, config: HCConfig) -> list[HCConfig]:
    """The configuration of each layer: ``config`` for global layers, ``sliding_layer_config`` for sliding ones."""
    sliding = sliding_layer_config(config)
    return [sliding if kind == SLIDING else config for kind in layer_kinds(model_config)]


def check_layer_kinds(stored: list[Any], expected: list[str]) -> None:
    """Refuse a state whose layers were built for other kinds (a sliding layer's exact window is not a
    global layer's compressed rows); ``ValueError`` naming both layouts."""
    if list(stored) != list(expected):
        raise ValueError(f"the stored layer kinds ({_describe(stored)}) differ from this model's "
                         f"({_describe(expected)}); the state was made for a model whose layers attend "
                         "differently: load it with that model")


def _describe(kinds: list[Any]) -> str:
    sliding = [i for i, kind in enumerate(kinds) if kind == SLIDING]
    unknown = sorted({str(kind) for kind in kinds} - set(LAYER_KINDS))
    return (f"{len(kinds)} layers, sliding {sliding}" if sliding else f"{len(kinds)} layers, none sliding") + \
        (f", unknown kinds {unknown}" if unknown else "")
