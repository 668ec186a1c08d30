"""Chunked prefill: feed a long input into a cache a chunk at a time.

Each chunk's keys and values are stored (compressed, offloaded) before the next chunk runs, so
peak activation memory is that of one chunk whatever the input length, and only the last
position's logits are ever materialised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from .glue import cache_kwarg

log = logging.getLogger(__name__)


Forward = Callable[[torch.Tensor], torch.Tensor]
"""Run one ``(1, n)`` chunk into a cache; returns the chunk's last logits ``(1, vocab)``."""


def chunk_forward(model: torch.nn.Module, cache: Cache) -> Forward:
    """The plain forward of a chunk into ``cache``, on the calling thread."""
    def forward(chunk: torch.Tensor) -> torch.Tensor:
        return model(input_ids=chunk, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache)).logits[:, -1]
    return forward


@torch.no_grad()
def prefill(model: torch.nn.Module, cache: Cache, input_ids: torch.Tensor, chunk_size: int = 1024,
            progress: bool | None = None, forward: Forward | None = None) -> torch.Tensor:
    """Append ``input_ids`` (``(1, n)`` or ``(n,)``) to ``cache``; returns the last position's logits ``(1, vocab)``.

    ``progress=None`` shows a bar only for inputs longer than four chunks.  ``forward`` runs each chunk
    (default ``chunk_forward``; a ``Batcher`` passes one that interleaves the chunks with other
    contexts' decode steps).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    n = input_ids.shape[1]
    if n == 0:
        raise ValueError("prefill needs at least one token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    device = next(model.parameters()).device
    forward = forward or chunk_forward(model, cache)
    show = progress if progress is not None else n > 4 * chunk_size
    logits = None
    with tqdm(total=n, unit="tok", desc="prefill", disable=not show, leave=False) as bar:
        for start in range(0, n, chunk_size):
            chunk = input_ids[:, start : start + chunk_size].to(device)
            logits = forward(chunk)
            bar.update(chunk.shape[1])
    log.debug("prefilled %d tokens in chunks of %d", n, chunk_size)
    return logits
