"""Per-step selection: which compressed rows one attention step reads (the paper's dynamic eviction).

Selection never removes anything; it only decides which rows the exact re-scoring and the
host-side weighted sum touch this step.  The paper keeps, per layer, the smallest set whose
approximate attention mass reaches ``top_p``; the size is the maximum over heads and each head
keeps its own indices, so no head is starved by another's flatter distribution.

A step has several queries per KV head (the query heads of its group, and a prefill block's
tokens); ``aggregate`` says how their distributions become one choice per KV head:

* ``mean`` — top-p of the mean distribution (the rows most queries need);
* ``max`` — top-p of the per-row maximum (a row any query leans on);
* ``union`` — every query's own top-p set, united (each query keeps what it needs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch



def top_p_select(mass: torch.Tensor, top_p: float, hint: int = 0, min_rows: int = 0) -> torch.Tensor:
    """Indices ``(heads, k)`` of the rows each head needs to reach ``top_p`` of its mass.

    ``mass`` is ``(heads, n)``.  ``k`` is the largest count any head needs (at least ``min_rows``);
    heads that need fewer still return ``k`` rows (their next most likely ones), which keeps the
    gather rectangular and only ever adds accuracy.  ``hint`` (the previous step's ``k``) lets a
    partial top-k replace the full sort when the answer lies within twice the hint, which is the
    common case in decoding.
    """
    heads, n = mass.shape
    if top_p >= 1.0 or n <= min_rows:
        return torch.arange(n, device=mass.device).expand(heads, n)
    candidates = min(n, max(64, 2 * hint, min_rows)) if hint else n
    if candidates < n:
        values, order = torch.topk(mass, candidates, dim=-1)
    else:
        values, order = torch.sort(mass, dim=-1, descending=True)
    target = top_p * mass.sum(dim=-1, keepdim=True)
    cumulative = values.cumsum(dim=-1)
    if candidates < n and bool((cumulative[:, -1:] < target).any()):
        return top_p_select(mass, top_p, min_rows=min_rows)  # the hint was too small: full sort
    # rows strictly needed: those before the cumulative sum reaches top_p of the head's total
    needed = (cumulative < target).sum(dim=-1) + 1
    k = max(int(needed.clamp(max=candidates).max()), min(min_rows, candidates))
    return order[:, :k]


def select_rows(probs: torch.Tensor, top_p: float, aggregate: str = "mean", hint: int = 0,
                min_rows: int = 0, top_p_impl: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Indices ``(heads, k)`` chosen from the per-query distributions ``probs`` ``(heads, queries, n)``;
    ``top_p_impl`` replaces ``top_p_select`` (a kernel, ``hcmemory.kernels``)."""
    select = top_p_impl or top_p_select
    if aggregate == "mean":
        return select(probs.mean(dim=1), top_p, hint, min_rows)
    if aggregate == "max":
        return select(probs.amax(dim=1), top_p, hint, min_rows)
    if aggregate != "union":
        raise ValueError(f"aggregate={aggregate!r}; allowed: 'mean', 'max', 'union'")
    heads, _, n = probs.shape
    if top_p >= 1.0 or n <= min_rows:
        return torch.arange(n, device=probs.device).expand(heads, n)
    values, order = torch.sort(probs, dim=-1, descending=True)
    needed = (values.cumsum(dim=-1) < top_p * values.sum(dim=-1, keepdim=True)).sum(dim=-1, keepdim=True) + 1
    ranks = torch.arange(n, device=probs.device)
    chosen = torch.zeros(heads, n, dtype=torch.bool, device=probs.device)
    chosen.scatter_(1, torch.where(ranks < needed, order, order[..., :1]).flatten(1), True)
    k = max(int(chosen.sum(dim=-1).max()), min(min_rows, n))
    # the union first, then each head's most likely other rows, so the gather stays rectangular
    return torch.topk(chosen.float() * 2 + probs.mean(dim=1), k, dim=-1).indices
