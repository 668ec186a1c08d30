"""Key and value codecs behind one interface; ``make_codec`` builds one from config names and
``codecs_for`` the three a layer of a given ``HCConfig`` uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import CHOICES, HCConfig
from .base import Codec
from .identity import IdentityCodec
from .uniform import UniformCodec
from .vq import VQCodec

CODEC_KINDS = tuple(dict.fromkeys(CHOICES["key_codec"] + CHOICES["value_codec"]))
"""Every codec a config can name, for keys or for values."""

__all__ = ["CODEC_KINDS", "Codec", "IdentityCodec", "LayerCodecs", "UniformCodec", "VQCodec", "codecs_for",
           "make_codec"]


def make_codec(kind: str, heads: int, dim: int, *, dtype: torch.dtype | None = None, subvector_dim: int = 4,
               centroids: int = 4096, sharing: str = "layer", kmeans_iters: int = 12, axis: str = "token",
               group_size: int | None = None, rotate: bool = False, symmetric: bool = False,
               device: torch.device | str | None = None,
               nearest: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Codec:
    """Build the codec a config names.

    ``none`` keeps rows in ``dtype`` (None: as given); ``fp16``/``bf16`` force that float type and
    ignore ``dtype``; ``vq`` uses the ``subvector_dim``/``centroids``/``sharing``/``kmeans_iters``
    knobs; ``int8/4/3/2`` quantize along ``axis`` (``token`` for values, ``channel`` for keys) in groups of
    ``group_size`` channels (None: the codec's default), ``rotate``-d and ``symmetric`` as ``UniformCodec`` says.
    Arguments a kind does not use are ignored, so callers can pass one set of knobs for every kind.
    ``device`` is where the codec keeps its own tensors (codebooks, channel statistics); ``nearest`` is
    the VQ codec's assignment kernel (None: the torch reference).
    """
    if kind == "none":
        return IdentityCodec(heads, dim, dtype=dtype, device=device)
    if kind == "fp16":
        return IdentityCodec(heads, dim, dtype=torch.float16, device=device)
    if kind == "bf16":
        return IdentityCodec(heads, dim, dtype=torch.bfloat16, device=device)
    if kind == "vq":
        return VQCodec(heads, dim, subvector_dim=subvector_dim, centroids=centroids, sharing=sharing,
                       kmeans_iters=kmeans_iters, device=device, nearest=nearest)
    if kind in ("int8", "int4", "int3", "int2"):
        return UniformCodec(heads, dim, bits=int(kind[3:]), axis=axis, group_size=group_size, rotate=rotate,
                            symmetric=symmetric, device=device)
    raise ValueError(f"make_codec: kind={kind!r} is not valid; allowed values: {', '.join(map(repr, CODEC_KINDS))}")


@dataclass
class LayerCodecs:
    """The codecs of one layer's stores: key codes next to the model, the exact key copy used for
    re-scoring (None without re-scoring or without compressed keys), and values."""

    keys: Codec
    exact_keys: Codec | None
    values: Codec
    residual: bool = False
    """``exact_keys`` encodes ``key − keys.decode(code)``; the exact key is the sum of both decodings."""

    def exact_input(self, keys: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """What ``exact_keys`` encodes for ``keys`` whose key codes are ``codes``."""
        return keys.float() - self.keys.decode(codes).to(keys.device) if self.residual else keys

    def fit(self, keys: torch.Tensor) -> None:
        """Fit whichever key codecs still need it on ``keys (heads, n, dim)``: the codes first, since a
        residual copy is fitted on what the fitted codes miss."""
        if self.keys.needs_fit:
            self.keys.fit(keys)
        if self.exact_keys is not None and self.exact_keys.needs_fit:
            self.exact_keys.fit(self.exact_input(keys, self.keys.encode(keys)))


def codecs_for(config: HCConfig, heads: int, dim: int, dtype: torch.dtype, model_device: torch.device,
               host: torch.device, nearest: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
               ) -> LayerCodecs:
    """The codecs a layer of ``config`` uses, each created where its rows will live; ``nearest`` as in
    ``make_codec``."""
    group = min(config.quant_group_size, dim)
    if dim % group:
        raise ValueError(f"HCConfig.quant_group_size={config.quant_group_size} does not divide this model's head "
                         f"dimension ({dim}); use a divisor of {dim}, e.g. {dim // 2} or {dim}")
    rotate = config.quant_rotation
    keys = make_codec(config.key_codec, heads, dim, dtype=dtype, subvector_dim=config.vq_subvector_dim,
                      centroids=config.vq_centroids, sharing=config.vq_codebook, kmeans_iters=config.kmeans_iters,
                      axis="channel", group_size=group, rotate=rotate, device=model_device, nearest=nearest)
    exact = (make_codec(config.rescore_keys, heads, dim, dtype=dtype, axis="channel", group_size=group,
                        rotate=rotate, symmetric=config.residual_symmetric, device=host)
             if config.compressed_keys and config.rescore else None)
    values = make_codec(config.value_codec, heads, dim, dtype=dtype, axis="token", group_size=group, rotate=rotate,
                        device=host if config.value_placement == "host" else model_device)
    return LayerCodecs(keys, exact, values, config.rescore_residual)
