"""``none``: full-precision rows, the reference every compressing codec is measured against."""

from __future__ import annotations

import torch

from .base import Codec


class IdentityCodec(Codec):
    """Keeps rows as they are, in ``dtype`` (the model's own dtype unless told otherwise)."""

    name = "none"
    exact = True

    def __init__(self, heads: int, dim: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(heads, dim, device)
        self.dtype = dtype

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.dtype is None else rows.to(self.dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def score(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return queries @ codes.to(queries.dtype).transpose(-1, -2)
