"""Per-step selection: which compressed rows one attention step reads (the paper's dynamic eviction).

Selection never removes anything; it only decides which rows the exact re-scoring and the
host-side weighted sum touch this step.  The paper keeps, per layer, the smallest set whose
approximate attention mass reaches ``top_p``; the size is the maximum over heads and each head
keeps its own indices, so no head is starved by another's flatter distribution.
"""

from __future__ import annotations

import torch


def top_p_select(mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """Indices ``(heads, k)`` of the rows each head needs to reach ``top_p`` of its mass.

    ``mass`` is ``(heads, n)`` and sums to (at most) one per head.  ``k`` is the largest count any
    head needs; heads that need fewer still return ``k`` rows (their next most likely ones),
    which keeps the gather rectangular and only ever adds accuracy.
    """
    heads, n = mass.shape
    if top_p >= 1.0 or n == 0:
        return torch.arange(n, device=mass.device).expand(heads, n)
    sorted_mass, order = torch.sort(mass, dim=-1, descending=True)
    cumulative = sorted_mass.cumsum(dim=-1)
    total = cumulative[:, -1:]
    # rows strictly needed: those before the cumulative sum reaches top_p of the head's total
    needed = (cumulative < top_p * total).sum(dim=-1) + 1
    k = int(needed.clamp(max=n).max())
    return order[:, :k]
