"""The chunk layout every backend stores: a checkpoint's tensors cut into row chunks, each named by
its sha256, with the manifest the header carries.

One module of its own because both ``ContextStore`` (every save) and the SQLite backend (converting
stores of the earlier layout) cut tensors this way, and no second copy of the rule may drift.
Chunks are row-aligned and their size depends only on ``chunk_bytes`` and the row size, so after
an append every earlier full chunk has the same bytes and hash: a content-addressed backend stores
only the new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..checkpoint import dtype_name, encode_header, sha256, tensor_bytes
from .base import Chunk

CHUNK_BYTES = 64 * 2**20
"""Most tensor bytes per stored chunk: far below SQLite's ~1 GB blob limit and PostgreSQL's 1 GB
bytea limit, small enough that reading and hashing a chunk stays cheap."""


def _split(tensor: torch.Tensor, chunk_bytes: int) -> tuple[int, int, list[torch.Tensor]]:
    """(dimension, rows per chunk, pieces): rows of ``(heads, rows, ...)`` stores, dim 0 of 1-D tensors.

    Every piece but the last has exactly ``rows per chunk`` rows, a number that depends only on
    ``chunk_bytes`` and the row size: appending rows never moves an earlier chunk's boundaries.
    """
    dim = 1 if tensor.dim() >= 2 else 0
    if tensor.dim() == 0 or tensor.numel() == 0:
        return dim, 1, [tensor]
    row_bytes = tensor.numel() // tensor.shape[dim] * tensor.element_size()
    rows = max(1, chunk_bytes // row_bytes)
    return dim, rows, list(tensor.split(rows, dim))


def encode_checkpoint(header: dict[str, Any], tensors: dict[str, torch.Tensor], chunk_bytes: int
                      ) -> tuple[Iterator[Chunk], Callable[[], bytes]]:
    """``(chunks, header)`` for a backend's ``save``: the tensors' row chunks as ``(sha256, bytes)``,
    generated lazily, and a function giving the header's bytes with the manifest those chunks filled in
    (valid once the last chunk was taken)."""
    manifest: dict[str, Any] = {}

    def chunks() -> Iterator[Chunk]:
        seq = 0
        for name, tensor in tensors.items():
            dim, rows_per_chunk, pieces = _split(tensor, chunk_bytes)
            entries = []
            for piece in pieces:
                data = tensor_bytes(piece)
                digest = sha256(data)
                entries.append({"seq": seq, "rows": int(piece.shape[dim]) if piece.dim() else 1, "sha256": digest})
                yield digest, data
                seq += 1
            manifest[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "dim": dim,
                              "rows_per_chunk": rows_per_chunk, "chunks": entries}

    return chunks(), lambda: encode_header({**header, "tensors": manifest})
