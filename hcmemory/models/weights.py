"""Weight formats: how a loaded model's weights are stored and multiplied (``load_model(weights=...)``).

On a CPU a small model's decode step is bound by reading its weights, not by the KV cache: every step
reads every linear layer once for one token. Storing them smaller makes the step faster, at the price of
rounding the weights, which ``benchmarks/bench_llamacpp.py`` reports as the NLL gap of full attention's
answers against float32 weights (docs/PERFORMANCE.md, "Weight formats"):

- ``fp32`` / ``bf16`` / ``fp16``: the whole model in that dtype (activations, and so the keys and values
  the cache stores, too).
- ``int8``: every linear layer's weight as int8 with one scale per output channel, multiplied by
  PyTorch's own weight-only kernel (``aten._weight_int8pack_mm``) without de-quantising the matrix.
- ``int4``: every linear layer's weight as 4-bit codes with a scale and a minimum per group of 32
  input channels (the layout of llama.cpp's Q4_1), multiplied by ``aten._weight_int4pack_mm_for_cpu``.

The integer formats keep the rest of the model (embeddings, norms, attention, and so the cache's keys
and values) in float32 and hand the kernels bfloat16 inputs: with float32 inputs the kernels are several
times slower, and attention in bfloat16 (``full``'s SDPA) is slower on a CPU than in float32.

The integer formats use PyTorch's CPU kernels, so they are CPU-only here. Their packed weights are
registered as (frozen) parameters so that fingerprints, and with them checkpoints and codebook caches,
tell a quantised model from its float original.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

FLOAT_FORMATS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INTEGER_FORMATS: tuple[str, ...] = ("int8", "int4")
WEIGHT_FORMATS: tuple[str, ...] = (*FLOAT_FORMATS, *INTEGER_FORMATS)
"""Every value ``load_model(weights=...)`` accepts."""

INT4_GROUP_SIZE = 32
"""Input channels per int4 scale/minimum pair: llama.cpp's Q4_1 block, so the embedded model's Q4_1
GGUF weights round-trip almost unchanged."""

_KERNEL_INPUTS = torch.bfloat16
"""What the integer formats' kernels multiply: with float32 inputs they were 8-20x slower (one token
through SmolLM2's linear layers, one thread: int8 1,128 ms against 140 ms, int4 1,982 ms against 101 ms,
on a loaded 2-core AVX-512 VM where float32 dense took 371 ms)."""


def check_weights(weights: str, device: torch.device) -> None:
    """Refuse an unknown format, or an integer one off the CPU, naming the choices."""
    if not isinstance(weights, str) or weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r} is not a weight format; choose one of {', '.join(WEIGHT_FORMATS)}")
    if weights in INTEGER_FORMATS and device.type != "cpu":
        raise ValueError(f"weights={weights!r} uses PyTorch's CPU weight-only kernels; on {device.type} choose one "
                         f"of {', '.join(FLOAT_FORMATS)}")


def weights_dtype(weights: str) -> torch.dtype:
    """The dtype a model in this format computes in: the float format's own, float32 for the integer ones."""
    return FLOAT_FORMATS.get(weights, torch.float32)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one scale per output channel (symmetric, round to nearest)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter((weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8),
                                   requires_grad=False)
        self.scales = nn.Parameter(scales.to(_KERNEL_INPUTS), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(_KERNEL_INPUTS), self.weight,
                                                 self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights: per group of ``INT4_GROUP_SIZE`` input channels a scale and
    a minimum (asymmetric, round to nearest), packed for PyTorch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        groups = in_features // INT4_GROUP_SIZE
        weight = linear.weight.detach().float().reshape(out_features, groups, INT4_GROUP_SIZE)
        low, high = weight.amin(dim=-1), weight.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        codes = ((weight - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.reshape(out_features, in_features), 1), requires_grad=False)
        # the kernel computes (code - 8) * scale + zero, so zero is the value of the middle code
        self.scales_and_zeros = nn.Parameter(
            torch.stack([scales.t(), (low + 8 * scales).t()], dim=-1).contiguous().to(_KERNEL_INPUTS),
            requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(_KERNEL_INPUTS),
                                                         self.weight, INT4_GROUP_SIZE, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


def apply_weights(model: nn.Module, weights: str) -> nn.Module:
    """Convert a loaded float model to ``weights`` in place and return it.

    The integer formats replace every ``nn.Linear`` (the output head too: it is the largest matrix of a
    small model, tied embeddings or not; the embedding table itself stays in float32). A layer whose
    input width is not a multiple of ``INT4_GROUP_SIZE`` stays in float32 under ``int4``.
    """
    device = next(model.parameters()).device
    check_weights(weights, device)
    model.to(weights_dtype(weights))
    if weights in INTEGER_FORMATS:
        kind = Int8Linear if weights == "int8" else Int4Linear
        replaced = kept = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if kind is Int4Linear and child.in_features % INT4_GROUP_SIZE:
                    kept += 1
                    continue
                setattr(parent, name, kind(child))
                replaced += 1
        logger.info("weights: %d linear layers as %s%s", replaced, weights,
                    f", {kept} kept in float32 (input width not a multiple of {INT4_GROUP_SIZE})" if kept else "")
    return model


def default_weights(device: torch.device) -> str:
    """The format ``load_model`` uses when given neither ``weights`` nor ``dtype``.

    CPU: ``fp32``, though ``int4`` decodes 1.5-2x faster (docs/PERFORMANCE.md, "Weight
    formats"): it changes the wording of about a third of the answers, needs its own key codebooks, and
    every checkpoint is tied to the fingerprint of the weights that made it, so a new default would
    leave the states users saved unloadable. Faster weights stay a choice. CUDA: ``bf16``, or ``fp16``
    where the GPU has no bfloat16 (the integer formats' kernels here are CPU-only).
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_weights(weights: str | None, dtype: torch.dtype | None, device: torch.device
                    ) -> tuple[str | None, torch.dtype]:
    """``(format, dtype)`` for ``load_model``'s ``weights`` and ``dtype`` arguments.

    ``dtype`` alone keeps its old meaning (the whole model in that dtype; the format is then the
    dtype's, or ``None`` for a dtype no format names). Given both, they must agree, so that a caller
    never gets other weights than it asked for.
    """
    if weights is None:
        if dtype is None:
            weights = default_weights(device)
        else:
            return next((name for name, candidate in FLOAT_FORMATS.items() if candidate == dtype), None), dtype
    check_weights(weights, device)
    if dtype is not None and dtype != weights_dtype(weights):
        raise ValueError(f"dtype={dtype} contradicts weights={weights!r}, which computes in {weights_dtype(weights)}; "
                         "pass only one of them")
    return weights, weights_dtype(weights)
