"""Permanent eviction under a budget: one small class per policy, one scoring method each.

Selection (``selection.py``) picks rows per step; eviction decides which rows are dropped for
good so memory stays bounded however long the conversation gets.  A policy only *scores* the
evictable rows; the cache protects sinks and the recent window and does the compaction, so every
policy gets the same guarantees for free.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class EvictionPolicy:
    """Scores rows; the highest scores are kept.

    ``mass`` is the layer's per-row attention statistic ``(heads, n)`` built by ``accumulate``;
    ``positions`` is each row's absolute token position ``(n,)``.
    """

    name: ClassVar[str] = ""
    uses_attention: ClassVar[bool] = False
    """Whether attention probabilities must be observed each step (costs an explicit softmax)."""
    keeps_sinks: ClassVar[bool] = True

    def accumulate(self, mass: torch.Tensor, step: torch.Tensor, queries: int) -> None:
        """Fold one step's attention ``step`` (``(heads, n)`` summed over ``queries``) into ``mass``."""
        mass += step

    def score(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HCPolicy(EvictionPolicy):
    """Cumulative attention mass, layer-wise: a row matters if any head of the layer needs it.

    Each step (a decode token or a whole prefill chunk) adds its *mean* per-query mass, so a
    1024-token chunk does not outweigh the decode steps that follow it; the layer score is the
    maximum over heads, mirroring the paper's "k = max over heads" selection.  Cumulative, so it
    favours old rows; ``mean`` (below) corrects that and is what ``hc-12.5-bounded`` uses.
    """

    name = "hc"
    uses_attention = True

    def accumulate(self, mass: torch.Tensor, step: torch.Tensor, queries: int) -> None:
        mass += step / max(queries, 1)

    def score(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return mass.amax(dim=0)


class MeanPolicy(EvictionPolicy):
    """Mean attention a row received per query that could see it, layer-wise (max over heads).

    A cumulative score (``hc``, ``h2o``) grows with a row's age: a row read by every chunk since the
    document's start outscores one that only the last chunk saw, so once a long document passes the
    budget, what survives is its beginning, needles later in it go first.  Dividing by the number of
    queries since the row arrived (every one saw it: rows only ever leave, never hide) compares rows
    of every age on one scale.  kvpress's ObservedAttention normalises H2O the same way; the
    measurement that made it ``hc-12.5-bounded``'s policy is in docs/DESIGN-NOTES.md.
    """

    name = "mean"
    uses_attention = True

    def score(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        queries_since = (positions[-1] - positions + 1).clamp(min=1).to(mass)
        return (mass / queries_since).amax(dim=0)


class H2OPolicy(EvictionPolicy):
    """Heavy hitters (H2O): attention received, summed over every query and head."""

    name = "h2o"
    uses_attention = True

    def score(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return mass.sum(dim=0)


class StreamingPolicy(EvictionPolicy):
    """StreamingLLM: attention sinks plus the most recent tokens."""

    name = "streaming"

    def score(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions.to(torch.float32)


class WindowPolicy(StreamingPolicy):
    """A plain sliding window: the most recent tokens, no sinks."""

    name = "window"
    keeps_sinks = False


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (HCPolicy, MeanPolicy, H2OPolicy, StreamingPolicy, WindowPolicy)
}


def make_policy(name: str) -> EvictionPolicy | None:
    if name == "none":
        return None
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; allowed: 'none', {', '.join(map(repr, POLICIES))}")
    return POLICIES[name]()


def rows_to_keep(score: torch.Tensor, budget: int, sinks: int, recent: int) -> torch.Tensor:
    """Ascending indices of the ``budget`` rows to keep: protected sinks and recent rows first,
    then the best-scored of the rest."""
    n = score.shape[0]
    if n <= budget:
        return torch.arange(n, device=score.device)
    sinks = min(sinks, n)
    recent = min(recent, n - sinks)
    middle = torch.arange(sinks, n - recent, device=score.device)
    room = max(budget - sinks - recent, 0)
    best = middle[torch.topk(score[sinks : n - recent], room).indices] if room else middle[:0]
    protected = torch.cat([torch.arange(sinks, device=score.device),
                           torch.arange(n - recent, n, device=score.device)])
    return torch.sort(torch.cat([protected, best])).values
