"""Per-step selection: which compressed rows one attention step reads (the paper's dynamic eviction).

Selection never removes anything; it only decides which rows the exact re-scoring and the
host-side weighted sum touch this step.  The paper keeps, per layer, the smallest set whose
approximate attention mass reaches ``top_p``; the size is the maximum over heads and each head
keeps its own indices, so no head is starved by another's flatter distribution.
"""

from __future__ import annotations

import torch


def top_p_select(mass: torch.Tensor, top_p: float, hint: int = 0) -> torch.Tensor:
    """Indices ``(heads, k)`` of the rows each head needs to reach ``top_p`` of its mass.

    ``mass`` is ``(heads, n)``.  ``k`` is the largest count any head needs; heads that need fewer
    still return ``k`` rows (their next most likely ones), which keeps the gather rectangular and
    only ever adds accuracy.  ``hint`` (the previous step's ``k``) lets a partial top-k replace
    the full sort when the answer lies within twice the hint, which is the common case in decoding.
    """
    heads, n = mass.shape
    if top_p >= 1.0 or n == 0:
        return torch.arange(n, device=mass.device).expand(heads, n)
    candidates = min(n, max(64, 2 * hint)) if hint else n
    if candidates < n:
        values, order = torch.topk(mass, candidates, dim=-1)
    else:
        values, order = torch.sort(mass, dim=-1, descending=True)
    target = top_p * mass.sum(dim=-1, keepdim=True)
    cumulative = values.cumsum(dim=-1)
    if candidates < n and bool((cumulative[:, -1:] < target).any()):
        return top_p_select(mass, top_p)  # the hint was too small: fall back to the full sort
    # rows strictly needed: those before the cumulative sum reaches top_p of the head's total
    needed = (cumulative < target).sum(dim=-1) + 1
    k = int(needed.clamp(max=candidates).max())
    return order[:, :k]
