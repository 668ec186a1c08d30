"""The one interface every key/value codec implements.

A codec turns rows of vectors (one row per token, per KV head) into fixed-width rows of codes, so
that the cache can keep codes in plain growable row buffers, gather them by index and drop rows on
eviction without knowing what the codes mean.  Anything a codec needs besides the per-row codes
(codebooks, calibrated channel ranges) lives in the codec itself and is reported by ``nbytes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Codec(ABC):
    """Encodes ``(heads, n, dim)`` float rows into ``(heads, n, width)`` codes (integers, or floats for ``none``).

    ``exact`` says whether ``decode(encode(x)) == x``; exact codecs let the cache skip the
    select-then-rescore path because their scores already are the true scores.
    """

    name: str = ""
    exact: bool = False

    def __init__(self, heads: int, dim: int, device: torch.device | str | None = None) -> None:
        self.heads = heads
        self.dim = dim
        self.device = torch.device(device or "cpu")
        """Where the codec's own tensors (codebooks, channel statistics) live: next to its rows."""

    @property
    def needs_fit(self) -> bool:
        """True while the codec still needs calibration data before ``encode`` can run."""
        return False

    def fit(self, rows: torch.Tensor) -> None:
        """Calibrate on sample rows ``(heads, n, dim)``; the default codec needs nothing.

        Fitting replaces the codec's parameters, so it is done once, before any row is encoded:
        codes made under other parameters would decode wrongly."""

    @abstractmethod
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """``(heads, n, dim)`` float → ``(heads, n, width)`` codes."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(heads, n, width)`` codes → ``(heads, n, dim)`` float32 reconstruction."""

    def score(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Approximate ``queries @ keysᵀ``: ``(heads, m, dim)`` × codes ``(heads, n, width)`` → ``(heads, m, n)``.

        The default reconstructs the keys; codecs with a cheaper route (lookup tables) override it.
        """
        return queries.float() @ self.decode(codes).transpose(-1, -2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that define the codec (codebooks, ranges), for checkpoints and the calibration cache."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (onto ``self.device``, wherever it was saved from)."""

    def nbytes(self) -> int:
        """Bytes of the codec's own tensors (codebooks etc.), counted next to the model."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())
