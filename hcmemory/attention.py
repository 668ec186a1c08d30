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
    # queries of one KV head stacked: (heads, groups * chunk, dim), query index = g * chunk + i
    stacked = query[0].reshape(heads, groups * chunk, dim)
    n = len(layer)
    block = max(1, _QUERY_BLOCK_BYTES // max(1, 4 * heads * groups * n))
    outs = []
    for start in range(0, chunk, block):
        stop = min(chunk, start + block)
        q = stacked.view(heads, groups, chunk, dim)[:, :, start:stop].reshape(heads, groups * (stop - start), dim)
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
    """One block of ``rows`` queries (stacked over the group: ``(heads, groups * rows, dim)``)."""
    n = len(layer)
    old = n - chunk
    sink_end, recent_start = layer.exact_window(old)
    host = layer.values.device
    q_host = q.to(host, torch.float32)
    groups = q.shape[1] // rows

    # exact part: sinks + recent window + the chunk itself
    k_exact, v_exact = layer.exact_rows(0, sink_end, recent_start, n)
    exact_index = torch.cat([torch.arange(sink_end, device=host), torch.arange(recent_start, n, device=host)])
    s_exact = (q_host @ k_exact.transpose(-1, -2).float()) * scaling
    visible = _causal_mask(chunk, exact_index.numel(), host, first, rows)
    s_exact = s_exact.view(layer.heads, groups, rows, -1).masked_fill(~visible, float("-inf")).flatten(1, 2)
    scores, values, index = [s_exact], [v_exact], [exact_index.expand(layer.heads, -1)]

    # compressed part: approximate scores select, exact scores weigh
    if recent_start > sink_end:
        approx = layer.approx_scores(q, sink_end, recent_start) * scaling
        chosen = None
        if layer.config.top_p < 1.0:
            mass = torch.softmax(approx.float(), dim=-1).mean(dim=1)
            chosen = top_p_select(mass, layer.config.top_p)
            layer.record_selection(chosen.shape[1], recent_start - sink_end)
        rows_index = (torch.arange(sink_end, recent_start, device=approx.device).expand(layer.heads, -1)
                      if chosen is None else chosen + sink_end)
        if layer.config.rescore:
            k_sel = layer.host_keys_at(rows_index)
            s_comp = (q_host @ k_sel.transpose(-1, -2).float()) * scaling
        else:
            s_comp = approx if chosen is None else approx.gather(-1, chosen[:, None, :].expand(-1, approx.shape[1], -1))
        scores.append(s_comp.to(host, torch.float32))
        values.append(layer.values_at(rows_index))
        index.append(rows_index.to(host))

    # one softmax over both parts, merged by log-sum-exp
    lse = torch.logsumexp(torch.cat([torch.logsumexp(s, dim=-1, keepdim=True) for s in scores], dim=-1),
                          dim=-1, keepdim=True)
    out = torch.zeros(q_host.shape, dtype=torch.float32, device=host)
    observed = torch.zeros(layer.heads, n, device=host) if layer.observes_attention else None
    for s, v, idx in zip(scores, values, index):
        p = torch.exp(s - lse)
        out += p @ v.float()
        if observed is not None:
            observed.scatter_add_(1, idx, p.sum(dim=1))
    if observed is not None:
        layer.observe(observed, queries=groups * rows)
    return out
