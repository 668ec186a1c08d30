"""hcmemory.kernels: the GPU kernels of the method, and the choice between them and the torch code.

The pure-torch implementations (``codecs``' ``score``, ``selection.top_p_select``) are the reference
and the CPU path; ``triton_kernels`` holds the Triton versions of the three hot steps — lookup-table
scoring of VQ codes, top-p row selection, dequantise-and-score of packed int rows.  ``backend``
(``HCConfig.kernel``) picks: ``auto`` runs Triton on CUDA tensors (when triton is installed) and
torch elsewhere; ``torch`` and ``triton`` force one (``triton`` on the CPU needs
``TRITON_INTERPRET=1``: slow, for correctness tests).

This module imports nothing at import time but the standard library: with a checkout's root on
``sys.path`` (pytest does that) it is also importable as a top-level ``kernels``, which transformers
probes for (Hugging Face's kernel hub has that name) while transformers itself is still importing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hcmemory.codecs import Codec

BACKENDS = ("auto", "torch", "triton")
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(tensor: "torch.Tensor", backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not _HAVE_TRITON:
            raise RuntimeError("HCConfig.kernel='triton' but triton is not installed: pip install 'hcmemory[triton]'")
        return True
    if backend != "auto":
        raise ValueError(f"kernel backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    return tensor.is_cuda and _HAVE_TRITON


def approx_scores(codec: Codec, queries: torch.Tensor, codes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``queries (heads, m, dim)`` against coded keys ``(heads, n, width)`` -> ``(heads, m, n)``."""
    if use_triton(codes, backend):
        from hcmemory.codecs import UniformCodec, VQCodec

        from . import triton_kernels

        if isinstance(codec, VQCodec):
            return triton_kernels.lut_scores(codec.lookup_table(queries), codes)
        if isinstance(codec, UniformCodec):
            shift, scale = codec.channel_stats(codes.device) if codec.axis == "channel" else (None, None)
            return triton_kernels.uniform_scores(queries, codes, codec.bits, codec.group_size, shift, scale)
    return codec.score(queries, codes)


def top_p_impl(tensor: torch.Tensor, backend: str = "auto") -> Callable[..., torch.Tensor] | None:
    """The top-p row selection to use for tensors like ``tensor``: the Triton one, or None for the
    reference ``selection.top_p_select``."""
    if not use_triton(tensor, backend):
        return None
    from . import triton_kernels

    return lambda mass, top_p, hint=0, min_rows=0: triton_kernels.top_p_rows(mass, top_p, min_rows)
