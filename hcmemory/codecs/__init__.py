"""Key and value codecs behind one interface, and ``make_codec`` to build one from config names."""

from __future__ import annotations

import torch

from .base import Codec
from .identity import IdentityCodec
from .uniform import UniformCodec
from .vq import VQCodec

CODEC_KINDS = ("none", "fp16", "bf16", "vq", "int8", "int4", "int2")

__all__ = ["CODEC_KINDS", "Codec", "IdentityCodec", "UniformCodec", "VQCodec", "make_codec"]


def make_codec(kind: str, heads: int, dim: int, *, dtype: torch.dtype | None = None, subvector_dim: int = 4,
               centroids: int = 4096, sharing: str = "layer", kmeans_iters: int = 12, axis: str = "token") -> Codec:
    """Build the codec a config names.

    ``none`` keeps rows in ``dtype`` (None: as given); ``fp16``/``bf16`` force that float type and
    ignore ``dtype``; ``vq`` uses the ``subvector_dim``/``centroids``/``sharing``/``kmeans_iters``
    knobs; ``int8/4/2`` quantize along ``axis`` (``token`` for values, ``channel`` for keys).
    Arguments a kind does not use are ignored, so callers can pass one set of knobs for every kind.
    """
    if kind == "none":
        return IdentityCodec(heads, dim, dtype=dtype)
    if kind == "fp16":
        return IdentityCodec(heads, dim, dtype=torch.float16)
    if kind == "bf16":
        return IdentityCodec(heads, dim, dtype=torch.bfloat16)
    if kind == "vq":
        return VQCodec(heads, dim, subvector_dim=subvector_dim, centroids=centroids, sharing=sharing,
                       kmeans_iters=kmeans_iters)
    if kind in ("int8", "int4", "int2"):
        return UniformCodec(heads, dim, bits=int(kind[3:]), axis=axis)
    raise ValueError(f"make_codec: kind={kind!r} is not valid; allowed values: {', '.join(map(repr, CODEC_KINDS))}")
