"""HCAttention: the attention function transformers calls for every layer that holds an HCCache.

One step of a layer reads its KV state in two parts and merges them by log-sum-exp:

* the **exact part** — sinks, the recent window and the current chunk, full-precision keys,
  causal inside the chunk;
* the **compressed part** — everything else.  Approximate scores from the key codes (computed
  next to the model) choose the rows worth reading (``top_p``); those rows are re-scored exactly
  with the host copy of their keys, and the weighted sum over their values runs where the values
  live (host memory).  With ``rescore=False`` the approximate scores are used as the weights
  directly, as the paper does.

Both parts share one softmax, so the kept probabilities are renormalised over what was read.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .selection import top_p_select

if TYPE_CHECKING:
    from .cache import HCLayer

ATTN_IMPLEMENTATION = "hcattention"
_QUERY_BLOCK_BYTES = 64 * 2**20
"""Score matrices of a prefill chunk are built in query blocks of at most this many bytes."""

_active = threading.local()


def set_active_layer(layer: "HCLayer") -> None:
    """Hand the layer just updated to the attention call that follows it on this thread.

    transformers calls ``cache.update`` and then the attention function with no cache argument;
    a thread-local hand-off keeps that pairing correct when several contexts share one model
    from different threads.
    """
    _active.layer = layer


def _take_active_layer() -> "HCLayer | None":
    layer = getattr(_active, "layer", None)
    _active.layer = None
    return layer


def hc_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function: HCAttention for HCCache layers, SDPA for anything else."""
    layer = _take_active_layer()
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    out = attend(layer, query, scaling)
    layer.evict_if_needed()
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``hcattention`` (and its mask builder) with transformers; idempotent.

    The mask builder is SDPA's: HCCache reports mask sizes covering only the current chunk, so
    the mask transformers builds is the small causal triangle of the chunk itself, and earlier
    rows (whose count differs per layer after eviction) are always visible.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, hc_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# the data path of one step


def attend(layer: "HCLayer", query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of ``query`` ``(1, q_heads, chunk, dim)`` over the layer's kept rows.

    The chunk's own keys and values were appended by ``update`` just before, so they are the
    last ``chunk`` rows of the layer.
    """
    if query.shape[0] != 1:
        raise ValueError("HCCache holds one sequence; run one conversation per cache (batch size 1)")
    q_heads, chunk, dim = query.shape[1:]
    heads = layer.heads
    groups = q_heads // heads
    if not layer.needs_explicit_attention:
        return _exact_sdpa(layer, query, scaling)
    # the query heads of one KV head side by side; a block stacks them as (heads, groups * rows, dim)
    grouped = query[0].view(heads, groups, chunk, dim)
    block = max(1, _QUERY_BLOCK_BYTES // max(1, 4 * heads * groups * len(layer)))
    outs = []
    for start in range(0, chunk, block):
        stop = min(chunk, start + block)
        q = grouped[:, :, start:stop].reshape(heads, groups * (stop - start), dim)
        outs.append(_attend_block(layer, q, start, stop - start, chunk, scaling).view(heads, groups, stop - start, dim))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.reshape(1, q_heads, chunk, dim).to(query.device, query.dtype)


def _exact_sdpa(layer: "HCLayer", query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Identity state, nothing to observe: exactly what transformers' SDPA path computes."""
    keys, values = layer.exact_rows(0, len(layer))
    chunk, n = query.shape[2], keys.shape[1]
    device = values.device
    mask = None
    if chunk > 1 and n > chunk:
        mask = _causal_mask(chunk, n, device)
    return F.scaled_dot_product_attention(
        query.to(device), keys[None].to(device, query.dtype), values[None].to(query.dtype), attn_mask=mask,
        is_causal=chunk > 1 and n == chunk, scale=scaling, enable_gqa=True,
    ).to(query.device)


def _causal_mask(chunk: int, n: int, device: torch.device, first: int = 0, rows: int | None = None) -> torch.Tensor:
    """``(rows, n)`` boolean mask for queries ``first … first+rows`` of a chunk whose keys end the ``n`` rows."""
    rows = chunk if rows is None else rows
    query_pos = (n - chunk) + first + torch.arange(rows, device=device)
    return torch.arange(n, device=device)[None, :] <= query_pos[:, None]


def _attend_block(layer: "HCLayer", q: torch.Tensor, first: int, rows: int, chunk: int, scaling: float) -> torch.Tensor:
    """One block of ``rows`` queries (stacked over the group: ``(heads, groups * rows, dim)``).

    Columns are the selected compressed rows followed by the exact rows (sinks, recent window,
    the chunk); one softmax spans both, so the kept probabilities are renormalised over exactly
    what was read.  When every score is exact and no policy needs the probabilities, the fused
    SDPA kernel computes it; otherwise the scores are formed explicitly.
    """
    n = len(layer)
    sink_end, recent_start = layer.exact_window(n - chunk)
    host = layer.values.device
    heads, groups = layer.heads, q.shape[1] // rows
    q_host = q.to(host, torch.float32)
    exact_count = sink_end + n - recent_start
    approx_scores, index = None, None
    if recent_start > sink_end:  # compressed part: approximate scores select, exact scores weigh
        rescore, top_p = layer.config.rescore, layer.config.top_p
        if rescore and top_p < 1.0:  # scores only select: a sample of the chunk's queries is enough
            step = max(1, rows // layer.config.selection_queries)
            sample = q.view(heads, groups, rows, -1)[:, :, ::step].reshape(heads, -1, q.shape[-1])
            approx = layer.approx_scores(sample, sink_end, recent_start)
        elif not rescore:  # the paper's way: the approximate scores are the weights of every query
            approx = layer.approx_scores(q, sink_end, recent_start)
        if top_p < 1.0:
            mass = torch.softmax(approx * scaling, dim=-1).mean(dim=1)
            chosen = top_p_select(mass, layer.config.top_p, hint=layer.last_selected)
            layer.record_selection(chosen.shape[1], recent_start - sink_end)
            compressed = chosen.to(host) + sink_end
        else:
            chosen, compressed = None, torch.arange(sink_end, recent_start, device=host).expand(heads, -1)
        exact = torch.cat([torch.arange(sink_end, device=host),
                           torch.arange(recent_start, n, device=host)]).expand(heads, -1)
        index = torch.cat([compressed, exact], dim=1)  # one gather reads the selected rows, then the exact ones
        if rescore:
            keys = layer.host_keys_at(index)
        else:
            keys = layer.host_keys_at(exact)
            approx_scores = approx if chosen is None else approx.gather(
                -1, chosen[:, None, :].expand(-1, approx.shape[1], -1))
        values = layer.values_at(index)
    else:  # every row is exact (uncompressed keys): read them in place
        keys, values = layer.exact_rows(0, n)
    selected = 0 if index is None else index.shape[1] - exact_count
    visible = None
    if chunk > 1:
        visible = _causal_mask(chunk, exact_count, host, first, rows)
        if selected:
            visible = torch.cat([torch.ones(rows, selected, dtype=torch.bool, device=host), visible], dim=1)
    values = values.float()
    if approx_scores is None and not layer.observes_attention:
        out = F.scaled_dot_product_attention(q_host.view(heads, groups, rows, -1), keys[:, None].float(),
                                             values[:, None], attn_mask=visible, scale=scaling, enable_gqa=True)
        return out.reshape(heads, groups * rows, -1)

    scores = q_host @ keys.float().transpose(-1, -2)
    if approx_scores is not None:
        scores = torch.cat([approx_scores.to(host), scores], dim=-1)
    scores = scores * scaling
    if visible is not None:
        scores = scores.view(heads, groups, rows, -1).masked_fill(~visible, float("-inf")).flatten(1, 2)
    probs = torch.softmax(scores, dim=-1)
    if layer.observes_attention:
        observed = probs.sum(dim=1)
        if index is not None:
            observed = torch.zeros(heads, n, device=host).scatter_add_(1, index, observed)
        layer.observe(observed, queries=groups * rows)
    return probs @ values
