"""A layer's state as tensors and counters, and the checks that a loaded one is consistent.

``dump`` copies everything an ``HCLayer`` holds; ``load`` fills a fresh layer of the same
configuration and refuses, naming the problem, anything that does not fit it: stores of different
lengths, rows of another dtype or width than the codecs produce, positions out of order or beyond
the tokens seen, VQ codes beyond the codebook, a compressed layer without its codebook, counters
that contradict each other, window copies of rows the next step does not read exactly.  A checkpoint
that loads is consistent, not just intact.
"""

from __future__ import annotations

from typing import Any

import torch

from .codecs import VQCodec
from .config import is_int
from .layer import HCLayer
from .rows import CodedRows, RowBuffer
from .window import ExactCopies


def dump(layer: HCLayer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copies of everything this layer holds (row tensors, fitted codec tensors) and its counters.

    Copies, not views: a checkpoint is written after the caller's lock is released."""
    layer._require_no_transaction("save")
    tensors: dict[str, torch.Tensor] = {}
    for name, store in layer._all_stores().items():
        if len(store):
            tensors[f"rows.{name}"] = (store.codes() if isinstance(store, CodedRows) else store.view()).clone()
    if layer.calibrated:
        for name in ("keys", "exact_keys"):
            codec = getattr(layer.codecs, name)
            for key, value in ({} if codec is None else codec.state_dict()).items():
                tensors[f"codec.{name}.{key}"] = value.clone()
    if layer.window is not None and len(layer.window):
        window = layer.window
        tensors |= {"window.rows": window.rows.clone(), "window.keys": window.keys.clone(),
                    "window.values": window.values.clone()}
    meta = {"seen": layer.seen, "selected_rows": layer.selected_rows, "selectable_rows": layer.selectable_rows,
            "calibrated": layer.calibrated}
    return tensors, meta


def load(layer: HCLayer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of ``dump`` on a fresh layer of the same configuration; raises ``ValueError``
    naming the first thing that does not fit (a state that loads is consistent, not just intact)."""
    if len(layer) or layer.seen:
        raise RuntimeError("a state can only be loaded into a fresh layer")
    ints = ("seen", "selected_rows", "selectable_rows")
    if set(meta) != {*ints, "calibrated"}:
        raise ValueError(f"layer {layer.index}: counters {sorted(meta)} are not those of this format")
    if any(not is_int(meta[k]) or meta[k] < 0 for k in ints) \
            or not isinstance(meta["calibrated"], bool) or meta["selected_rows"] > meta["selectable_rows"]:
        raise ValueError(f"layer {layer.index}: invalid counters {meta}")
    needs_fit = not layer.calibrated
    if meta["calibrated"] and needs_fit:
        layer.load_codec_states({name: {k.split(".", 2)[2]: v for k, v in tensors.items()
                                       if k.startswith(f"codec.{name}.")} for name in ("keys", "exact_keys")})
    elif not meta["calibrated"] and (not needs_fit or layer.config.calibration != "context"):
        raise ValueError(f"layer {layer.index}: stored as not calibrated, which key_codec="
                         f"{layer.config.key_codec!r} with calibration={layer.config.calibration!r} never is")
    expected = {f"rows.{name}" for name, store in layer._all_stores().items()}
    if layer.calibrated and needs_fit:
        expected |= {f"codec.{name}.{key}" for name in ("keys", "exact_keys")
                     for key in (getattr(layer.codecs, name).state_dict() if getattr(layer.codecs, name) else {})}
    if layer.window is not None:
        expected |= set(WINDOW_TENSORS)
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"layer {layer.index}: unexpected tensors {unexpected}")
    rows = {name: tensors.get(f"rows.{name}") for name in layer._all_stores()}
    counts = {name: 0 if t is None else (t.shape[1] if t.dim() >= 2 else -1) for name, t in rows.items()}
    n = counts["values"]
    if set(counts.values()) != {n} or n > meta["seen"]:
        raise ValueError(f"layer {layer.index}: stores hold {counts} rows with {meta['seen']} tokens seen")
    for name, store in layer._all_stores().items():
        if rows[name] is not None:
            _check_rows(layer, name, store, rows[name], meta["seen"])
    window = _window(layer, {k: v for k, v in tensors.items() if k.startswith("window.")}, n)
    for name, store in layer._all_stores().items():
        if rows[name] is not None:
            store.append_codes(rows[name]) if isinstance(store, CodedRows) else store.append(rows[name])
    layer.window = window
    layer.seen, layer.selected_rows, layer.selectable_rows = meta["seen"], meta["selected_rows"], meta["selectable_rows"]


WINDOW_TENSORS = ("window.rows", "window.keys", "window.values")


def _window(layer: HCLayer, tensors: dict[str, torch.Tensor], length: int) -> ExactCopies | None:
    """The stored window copies, checked: the rows a step after this state reads exactly, and copies of
    the layer's shape and dtype (none stored: the stores are read, as when it was saved without)."""
    empty = layer.window
    if empty is None or not tensors:
        return empty
    if set(tensors) != set(WINDOW_TENSORS):
        raise ValueError(f"layer {layer.index}: window copies need all of {list(WINDOW_TENSORS)}, "
                         f"got {sorted(tensors)}")
    rows, keys, values = (tensors[name] for name in WINDOW_TENSORS)
    config = layer.config
    if rows.dtype != torch.int64 or rows.dim() != 1 or bool((rows[1:] <= rows[:-1]).any()):
        raise ValueError(f"layer {layer.index}: window rows must be increasing int64 row indices")
    if not bool(ExactCopies.read_exactly(rows, length, config.sink_tokens, config.recent_tokens).all()):
        raise ValueError(f"layer {layer.index}: window copies of rows {rows.tolist()} are not among the first "
                         f"{config.sink_tokens} and last {config.recent_tokens} of the {length} rows")
    shape = (layer.heads, len(rows), layer.dim)
    for name, t in (("keys", keys), ("values", values)):
        if t.dtype != empty.keys.dtype or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer {layer.index}: window {name} are {t.dtype} {tuple(t.shape)}, expected finite "
                             f"{empty.keys.dtype} {shape}")
    return ExactCopies(rows, keys.to(empty.keys.device), values.to(empty.keys.device))


def _check_rows(layer: HCLayer, name: str, store: CodedRows | RowBuffer, rows: torch.Tensor, seen: int) -> None:
    if isinstance(store, CodedRows):
        probe = store.codec.encode(torch.zeros(layer.heads, 1, layer.dim, dtype=layer.dtype, device=store.device))
        dtype, shape = probe.dtype, (layer.heads, *probe.shape[2:])
    else:
        dtype, shape = store.dtype, (store.heads, *store.row_shape)
    if rows.dtype != dtype or (rows.shape[0], *rows.shape[2:]) != shape:
        raise ValueError(f"layer {layer.index}: {name} rows are {rows.dtype} {tuple(rows.shape)}, this configuration "
                         f"stores {dtype} rows of shape {shape}")
    if name == "positions":
        positions = rows[0]
        if len(positions) and (int(positions[0]) < 0 or int(positions[-1]) >= seen
                               or not bool((positions[1:] > positions[:-1]).all())):
            raise ValueError(f"layer {layer.index}: row positions are not increasing within [0, seen)")
    if isinstance(store, CodedRows) and isinstance(store.codec, VQCodec) and rows.numel():
        if int(VQCodec._indices(rows).max()) >= store.codec.centroids:
            raise ValueError(f"layer {layer.index}: {name} holds codes beyond the codebook's "
                             f"{store.codec.centroids} centroids")
    if name == "mass" and not bool(torch.isfinite(rows).all()):
        raise ValueError(f"layer {layer.index}: attention mass holds non-finite values")
