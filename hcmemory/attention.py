"""HCAttention: the math of one attention step over one layer's KV state.

One step of a layer reads its KV state in two parts that share one softmax:

* the **exact part** — sinks, the recent window and the current chunk, full-precision keys,
  causal inside the chunk;
* the **compressed part** — everything else.  Approximate scores from the key codes (computed
  next to the model) choose the rows worth reading (``top_p``); those rows are re-scored exactly
  with the exact copy of their keys, and the weighted sum over their values runs where the values
  live (host memory).  With ``rescore=False`` the approximate scores are used as the weights
  directly, as the paper does.

The layer is read through ``LayerView`` only, so this module knows nothing of caches or of
transformers; ``glue.py`` connects it to the model.  Visibility always comes from the rows' own
positions (causal, and the model's sliding window where it has one), never from a mask built by
transformers over a different number of rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from .kernels.dispatch import gather_attention_impl, top_p_impl
from .selection import select_rows

if TYPE_CHECKING:
    from .config import HCConfig
    from .rows import RowBuffer

_QUERY_BLOCK_BYTES = 64 * 2**20
"""Explicit score matrices of a prefill chunk are built in query blocks of at most this many bytes."""


class LayerView(Protocol):
    """What one attention step needs from a layer's state (``layer.HCLayer`` implements it)."""

    config: "HCConfig"
    heads: int
    device: torch.device
    seen: int
    positions: "RowBuffer"
    last_selected: int
    observes_attention: bool
    needs_explicit_attention: bool

    @property
    def value_device(self) -> torch.device: ...
    def __len__(self) -> int: ...
    def exact_window(self, old: int) -> tuple[int, int]: ...
    def exact_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def approx_scores(self, queries: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...
    def exact_keys_at(self, index: torch.Tensor) -> torch.Tensor: ...
    def values_at(self, index: torch.Tensor) -> torch.Tensor: ...
    def row_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...
    def record_selection(self, selected: int, selectable: int) -> None: ...
    def observe(self, step_mass: torch.Tensor, queries: int) -> None: ...


def attend(layer: LayerView, query: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
    """Attention of ``query`` ``(1, q_heads, chunk, dim)`` over the layer's kept rows.

    The chunk's own keys and values were appended just before, so they are the last ``chunk``
    rows of the layer.  ``window`` is the model's sliding window for this layer (a query at
    position p sees keys at positions > p - window), None for global attention.
    """
    if query.shape[0] != 1:
        raise ValueError("HCCache holds one sequence; run one conversation per cache (batch size 1)")
    q_heads, chunk, dim = query.shape[1:]
    heads = layer.heads
    if q_heads % heads:
        raise ValueError(f"{q_heads} query heads cannot share {heads} KV heads")
    groups = q_heads // heads
    if not layer.needs_explicit_attention:
        return _exact_sdpa(layer, query, scaling, window)
    # the query heads of one KV head side by side; a block stacks them as (heads, groups * rows, dim)
    grouped = query[0].view(heads, groups, chunk, dim)
    # explicit score matrices are bounded by query blocks; SDPA needs none, and each block reads the
    # rows again (across the bus, for a chunk computed next to the model)
    config = layer.config
    explicit_scores = layer.observes_attention or (not config.rescore and _step_top_p(config, chunk) < 1.0)
    block = max(1, _QUERY_BLOCK_BYTES // max(1, 4 * heads * groups * len(layer))) if explicit_scores else chunk
    outs = []
    for start in range(0, chunk, block):
        stop = min(chunk, start + block)
        q = grouped[:, :, start:stop].reshape(heads, groups * (stop - start), dim)
        out = _attend_block(layer, q, start, stop - start, chunk, scaling, window)
        outs.append(out.view(heads, groups, stop - start, dim))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.reshape(1, q_heads, chunk, dim).to(query.device, query.dtype)


def _compute_device(layer: LayerView, chunk: int) -> torch.device:
    """Where a step's attention runs.  A decode step's few queries go to the rows: the weighted sum
    runs where the values live, the paper's split.  A prefill chunk of many queries would cost
    queries x rows multiply-adds per head on the host, so the rows come to the model instead and each
    crosses the bus once per chunk (on a CPU-only machine both are the CPU)."""
    return layer.device if chunk > layer.config.selection_queries else layer.value_device


def _fused_attention(layer: LayerView, chunk: int, window: int | None, index: torch.Tensor
                     ) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None:
    """A decode step over re-scored rows that every query sees, as one kernel reading the selected rows
    in place (``hcmemory.kernels``), when the rows' layout and the backend allow; else None."""
    config = layer.config
    if not config.rescore or chunk != 1 or layer.observes_attention or _outside_window(layer, chunk, window):
        return None
    kernel = gather_attention_impl(index, config.kernel)
    buffers = layer.row_buffers() if kernel is not None else None
    if buffers is None or buffers[0].device != index.device:
        return None
    return lambda queries, rows, scale: kernel(queries, *buffers, rows, scale)


def _query_positions(layer: LayerView, chunk: int, first: int, rows: int, device: torch.device) -> torch.Tensor:
    return layer.seen - chunk + first + torch.arange(rows, device=device)


def _window_bias(layer: LayerView, key_positions: torch.Tensor, chunk: int, first: int, rows: int,
                 window: int, dtype: torch.dtype) -> torch.Tensor:
    """``(..., rows, cols)`` additive mask: causal and inside the sliding window, from absolute positions."""
    query = _query_positions(layer, chunk, first, rows, key_positions.device)[:, None]
    keys = key_positions[..., None, :]
    visible = (keys <= query) & (keys > query - window)
    return torch.zeros(visible.shape, device=visible.device, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _outside_window(layer: LayerView, chunk: int, window: int | None) -> bool:
    """Whether any kept row is out of the window of some query of this chunk (rows older than
    every query's window are dropped after each step, so for a decode step this is rare)."""
    if window is None or not len(layer):
        return False
    oldest = int(layer.positions.view()[0, 0])  # host memory: no device synchronisation
    return chunk > 1 or oldest <= layer.seen - chunk - window


def _exact_sdpa(layer: LayerView, query: torch.Tensor, scaling: float, window: int | None) -> torch.Tensor:
    """Identity state, nothing to observe: exactly what transformers' SDPA path computes."""
    chunk = query.shape[2]
    where = _compute_device(layer, chunk)
    keys, values = (rows.to(where) for rows in layer.exact_rows(0, len(layer)))
    n = keys.shape[1]
    mask = None
    if _outside_window(layer, chunk, window):
        mask = _window_bias(layer, layer.positions.view()[0].to(where), chunk, 0, chunk, window, query.dtype)
    elif chunk > 1 and n > chunk:
        mask = _causal_bias(chunk, n, where, query.dtype)
    return F.scaled_dot_product_attention(
        query.to(where), keys[None].to(where, query.dtype), values[None].to(query.dtype), attn_mask=mask,
        is_causal=mask is None and chunk > 1 and n == chunk, scale=scaling, enable_gqa=True,
    ).to(query.device)


@functools.lru_cache(maxsize=2)
def _causal_bias(chunk: int, n: int, device: torch.device, dtype: torch.dtype, first: int = 0,
                 rows: int | None = None, selected: int = 0) -> torch.Tensor:
    """``(rows, selected + n)`` additive mask (0 visible, -inf hidden) for queries ``first … first+rows``
    of a chunk whose keys end the ``n`` rows, after ``selected`` rows every query sees.

    Additive, and built once per chunk for every layer: SDPA converts a boolean mask to this form on
    each call, which cost about a tenth of a 7.5K-token prefill.  Shared between calls, so read-only,
    and never an inference tensor (autograd, should a later call run with it, refuses to save those).
    """
    rows = chunk if rows is None else rows
    with torch.inference_mode(False):
        query_pos = (n - chunk) + first + torch.arange(rows, device=device)
        hidden = torch.arange(n, device=device)[None, :] > query_pos[:, None]
        bias = torch.zeros(rows, selected + n, device=device, dtype=dtype)
        bias[:, selected:].masked_fill_(hidden, float("-inf"))
    return bias


def _step_top_p(config: HCConfig, chunk: int) -> float:
    """The top-p of a step of ``chunk`` queries: ``prefill_top_p`` for prefill-sized steps, if set."""
    return config.top_p if chunk <= config.selection_queries or config.prefill_top_p is None else config.prefill_top_p


def _attend_block(layer: LayerView, q: torch.Tensor, first: int, rows: int, chunk: int, scaling: float,
                  window: int | None) -> torch.Tensor:
    """One block of ``rows`` queries (stacked over the group: ``(heads, groups * rows, dim)``).

    Columns are the selected compressed rows followed by the exact rows (sinks, recent window,
    the chunk); one softmax spans both, so the kept probabilities are renormalised over exactly
    what was read.  When nothing is selected and no policy needs the probabilities, the fused SDPA
    kernel computes it; otherwise the scores are formed explicitly.
    """
    n = len(layer)
    sink_end, recent_start = layer.exact_window(n - chunk)
    where = _compute_device(layer, chunk)
    heads, groups = layer.heads, q.shape[1] // rows
    q_rows = q.to(where, torch.float32)
    approx_scores, index = None, None
    config = layer.config
    top_p = _step_top_p(config, chunk)
    exact_count = n  # columns read exactly; with a selection, the sinks, the recent window and the chunk
    if recent_start > sink_end and top_p < 1.0:
        # compressed part: approximate scores select, exact scores weigh
        exact_count = sink_end + n - recent_start
        if config.rescore:  # scores only select: a sample of the chunk's queries is enough
            step = max(1, rows // config.selection_queries)
            sample = q.view(heads, groups, rows, -1)[:, :, ::step].reshape(heads, -1, q.shape[-1])
            if config.selection_scores == "codes":
                approx = layer.approx_scores(sample, sink_end, recent_start)
            else:
                exact_keys = layer.exact_rows(sink_end, recent_start)[0].to(where)
                approx = sample.to(where, torch.float32) @ exact_keys.float().mT
        else:  # the paper's way: the approximate scores are the weights of every query
            approx = layer.approx_scores(q, sink_end, recent_start)
        if top_p < 1.0:
            probs = torch.softmax(approx * scaling, dim=-1)
            chosen = select_rows(probs, top_p, config.selection_aggregate, layer.last_selected, config.min_selected,
                                 top_p_impl(probs, config.kernel))
            layer.record_selection(chosen.shape[1], recent_start - sink_end)
            compressed = chosen.to(where) + sink_end
        else:
            chosen, compressed = None, torch.arange(sink_end, recent_start, device=where).expand(heads, -1)
        exact = torch.cat([torch.arange(sink_end, device=where),
                           torch.arange(recent_start, n, device=where)]).expand(heads, -1)
        index = torch.cat([compressed, exact], dim=1)  # one gather reads the selected rows, then the exact ones
        fused = _fused_attention(layer, chunk, window, index)
        if fused is not None:
            return fused(q_rows, index, scaling)
        if config.rescore:
            keys = layer.exact_keys_at(index)
        else:
            keys = layer.exact_keys_at(exact)
            approx_scores = approx if chosen is None else approx.gather(
                -1, chosen[:, None, :].expand(-1, approx.shape[1], -1))
        values = layer.values_at(index)
    else:  # every row, in place and in order: exact, or (without re-scoring) as the codes decode, which is
        # what the codes' scores compute (``Codec.score``), so SDPA's fused kernel can weigh them
        keys, values = layer.exact_rows(0, n)
    keys, values = keys.to(where), values.to(where)
    selected = 0 if index is None else index.shape[1] - exact_count
    if _outside_window(layer, chunk, window):
        positions = layer.positions.view()[0].to(where)
        if index is None:  # every row in order: one (rows, n) mask for all heads
            bias = _window_bias(layer, positions, chunk, first, rows, window, torch.float32)
        else:  # each head read its own rows: (heads, 1, rows, cols), broadcast over the group
            bias = _window_bias(layer, positions[index], chunk, first, rows, window, torch.float32)[:, None]
    elif chunk > 1:
        bias = _causal_bias(chunk, exact_count, where, torch.float32, first, rows, selected)
    else:
        bias = None
    values = values.float()
    if approx_scores is None and not layer.observes_attention:
        out = F.scaled_dot_product_attention(q_rows.view(heads, groups, rows, -1), keys[:, None].float(),
                                             values[:, None], attn_mask=bias, scale=scaling, enable_gqa=True)
        return out.reshape(heads, groups * rows, -1)

    scores = q_rows @ keys.float().transpose(-1, -2)
    if approx_scores is not None:
        scores = torch.cat([approx_scores.to(where), scores], dim=-1)
    scores = scores * scaling
    if bias is not None:
        scores = (scores.view(heads, groups, rows, -1) + bias).flatten(1, 2)
    probs = torch.softmax(scores, dim=-1)
    if layer.observes_attention:
        observed = probs.sum(dim=1)
        if index is not None:
            observed = torch.zeros(heads, n, device=where).scatter_add_(1, index, observed)
        layer.observe(observed.to(layer.value_device), queries=groups * rows)
    return probs @ values
