"""16-bit copies of the rows a step reads exactly (``HCConfig.full_precision_window``).

The exact part of a step — the sinks, the recent rows and the chunk itself — is otherwise read
from the stores like any other row, so with int values or int re-scoring keys it is only as exact
as those codes.  KIVI and transformers' quantized caches keep their newest tokens in full precision
for this reason: a token's neighbourhood carries much of its attention, and in a chunked prefill
the errors of one chunk's reads shape the keys and values of the next (measured:
docs/DESIGN-NOTES.md).

An ``ExactCopies`` is a value: every change returns a new one, so a transaction keeps the copies
it began with, and a fork shares them.  Rows are named by their index in the layer's stores, the
same index every store uses; between steps only the next step's exact rows are kept, so the copies
cost ``sink_tokens + recent_tokens`` rows per layer whatever the context length.  A crop keeps the
copies below its point; those of rows that had left the recent rows are gone, which
``HCLayer.exact_prefix`` accounts for.

The module and the layer's ``window`` attribute keep their names (checkpoints store the copies as
``window.*`` tensors), as does ``HCLayer.exact_window`` (the sink and recent bounds, named by
``attention.LayerView``); elsewhere in the layer "window" is only the model's sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExactCopies:
    rows: torch.Tensor
    """``(m,)`` int64 on the host, ascending: the store rows these copies stand for."""
    keys: torch.Tensor
    """``(heads, m, dim)``, 16-bit (the model's dtype, or float16), where the values live."""
    values: torch.Tensor

    @classmethod
    def empty(cls, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> "ExactCopies":
        blank = torch.empty(heads, 0, dim, dtype=dtype, device=device)
        return cls(torch.empty(0, dtype=torch.int64), blank, blank)

    def __len__(self) -> int:
        return self.rows.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    # --- changes: each returns new copies ---------------------------------------------------------
    def appended(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> "ExactCopies":
        """With copies of ``keys``/``values`` ``(heads, n, dim)``, the rows from ``start`` on."""
        like = self.keys  # never written in place, so tensors made under inference mode serve any later step
        return ExactCopies(torch.cat([self.rows, torch.arange(start, start + keys.shape[1])]),
                           torch.cat([like, keys.to(like.device, like.dtype)], dim=1),
                           torch.cat([self.values, values.to(like.device, like.dtype)], dim=1))

    def _where(self, keep: torch.Tensor, rows: torch.Tensor | None = None) -> "ExactCopies":
        if bool(keep.all()) and rows is None:
            return self
        index = keep.nonzero().flatten().to(self.keys.device)
        return ExactCopies(self.rows[keep] if rows is None else rows[keep], self.keys.index_select(1, index),
                           self.values.index_select(1, index))

    @staticmethod
    def read_exactly(rows: torch.Tensor, length: int, sinks: int, recent: int) -> torch.Tensor:
        """Which of ``rows`` the next step over ``length`` rows reads exactly: its first ``sinks`` and
        last ``recent`` rows (``HCLayer.exact_window``)."""
        return (rows >= 0) & ((rows < min(sinks, length)) | ((rows >= length - recent) & (rows < length)))

    def trimmed(self, length: int, sinks: int, recent: int) -> "ExactCopies":
        """Only the copies of the rows the next step over ``length`` rows reads exactly."""
        return self._where(self.read_exactly(self.rows, length, sinks, recent))

    def truncated(self, length: int) -> "ExactCopies":
        return self._where(self.rows < length)

    def kept(self, index: torch.Tensor) -> "ExactCopies":
        """The copies that survive the layer keeping store rows ``index`` (ascending), renumbered."""
        index = index.to(self.rows.device)
        if not len(self) or not len(index):
            return self._where(torch.zeros_like(self.rows, dtype=torch.bool))
        at = torch.searchsorted(index, self.rows)
        found = index[at.clamp(max=len(index) - 1)] == self.rows
        return self._where(found, at)

    # --- reads -----------------------------------------------------------------------------------
    def over(self, read: torch.Tensor, index: torch.Tensor, part: str) -> torch.Tensor:
        """``read`` ``(heads, cols, dim)``, the stores' rows ``index`` (``(cols,)`` or ``(heads, cols)``),
        with every row these copies stand for replaced by its copy of ``part`` (``keys`` or ``values``).

        ``read`` must be a fresh tensor (a gather's result): the copies are written into it, so a step
        that selected thousands of rows pays for the few dozen it holds, not for another full pass."""
        if not len(self):
            return read
        rows = self.rows.to(index.device)
        index = index.expand(read.shape[0], -1)
        at = torch.searchsorted(rows, index).clamp_(max=len(rows) - 1)
        head, col = (rows[at] == index).nonzero(as_tuple=True)
        copies = getattr(self, part)
        picked = copies[head.to(copies.device), at[head, col].to(copies.device)]
        read[head.to(read.device), col.to(read.device)] = picked.to(read.device, read.dtype)
        return read

    def over_range(self, read: torch.Tensor, start: int, part: str) -> torch.Tensor:
        """``over`` for the contiguous rows ``[start, start + cols)``."""
        inside = (self.rows >= start) & (self.rows < start + read.shape[1])
        if not bool(inside.any()):
            return read
        at = inside.nonzero().flatten()
        copies = getattr(self, part).index_select(1, at.to(self.keys.device))
        return read.index_copy(1, (self.rows[at] - start).to(read.device), copies.to(read.device, read.dtype))
