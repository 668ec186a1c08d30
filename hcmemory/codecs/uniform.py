"""``int8`` / ``int4`` / ``int3`` / ``int2``: uniform scalar quantization into packed, fixed-width byte rows.

Every row (one token of one head) becomes one uint8 row: the ``bits``-bit codes packed densely (``8 /
bits`` to a byte; ``int3`` packs eight codes into three bytes), followed by each channel group's
minimum and step as float16 bytes.  Keeping the per-group parameters inside the row is what lets the
cache gather, append and evict rows without knowing the format, and makes ``nbytes`` of the stored
rows the real footprint: int4 of a 64-dim row with groups of 32 is 32 code bytes + 2 × 4 parameter
bytes = 40 bytes, against 128 in fp16.

The float16 parameters are rounded conservatively — the minimum down, the step up — so the
representable interval always covers the group and every element decodes within half a step of
its input (rows must stay inside the float16 range, which post-RoPE keys and values do).

Two options change what a row spends its levels on.  ``rotate`` quantizes each row in a fixed
orthogonal basis (a Hadamard matrix with random signs, QuaRot's trick): a row's few large channels are
spread over all of them, so its group range no longer stretches to fit them (SmolLM2, 2K and 4K eval text,
attention output error of int4 values 0.078 → 0.050, of int3 0.177 → 0.115).  ``symmetric`` stores only
the step of a group and centres its levels on zero — for rows that are centred already (the
channel-normalised residual of a key after its VQ code) the minimum is two wasted bytes a group.
"""

from __future__ import annotations

import math

import torch

from .base import Codec

BITS = (8, 4, 3, 2)
AXES = ("token", "channel")


def _word(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of the smallest whole-byte word holding whole codes: ``(8 / bits, 1)`` for
    8/4/2 bits, ``(8, 3)`` for 3 bits."""
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def _shifts(step: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, step * count, step, dtype=torch.int32, device=device)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``(..., d)`` in ``[0, 2**bits)`` into ``(..., d * bits / 8)`` uint8, little-endian
    within each word (the first code in the low bits); ``d`` must fill whole words."""
    if bits == 8:
        return q.to(torch.uint8)
    codes, nbytes = _word(bits)
    words = (q.to(torch.int32).unflatten(-1, (-1, codes)) << _shifts(bits, codes, q.device)).sum(-1)
    if nbytes == 1:
        return words.to(torch.uint8)
    return ((words.unsqueeze(-1) >> _shifts(8, nbytes, q.device)) & 0xFF).to(torch.uint8).flatten(-2)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``(..., d * bits / 8)`` → int32 codes ``(..., d)``."""
    if bits == 8:
        return packed.to(torch.int32)
    codes, nbytes = _word(bits)
    words = packed.to(torch.int32)
    if nbytes > 1:
        words = (words.unflatten(-1, (-1, nbytes)) << _shifts(8, nbytes, packed.device)).sum(-1)
    return ((words.unsqueeze(-1) >> _shifts(bits, codes, packed.device)) & ((1 << bits) - 1)).flatten(-2)


def hadamard(dim: int) -> torch.Tensor:
    """An orthonormal ``(dim, dim)`` Hadamard matrix: Sylvester blocks along the binary digits of
    ``dim`` (one block for a power of two, e.g. 64 or 128; 96 → 64 + 32), so any head size has one."""
    blocks, size = [], 1 << max(dim.bit_length() - 1, 0)
    while size:
        if dim & size:
            h = torch.ones(1, 1)
            while h.shape[0] < size:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
            blocks.append(h / size ** 0.5)
        size >>= 1
    return torch.block_diag(*blocks)


def _half_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` as float16, rounded toward ``direction`` (±inf) when not exactly representable."""
    h = x.half()
    off = h.float() < x if direction > 0 else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction)), h)


class UniformCodec(Codec):
    """Min/step quantization per (token, group of ``group_size`` channels), packed; ``symmetric`` and
    ``rotate`` as in the module docstring.

    ``axis="token"`` quantizes each token's channel groups with their own minimum and step —
    KIVI's choice for values, and a good one whenever channels have comparable ranges.

    ``axis="channel"`` is for keys, whose few outlier channels (large, stable offsets and spread)
    would otherwise set every token's range and starve the other channels of precision.  Rows
    are fixed-width and evicted one by one, so KIVI's per-channel groups spanning many tokens
    are not available; instead each channel is first normalized with a per-(head, channel)
    ``shift`` (mean) and ``scale`` (standard deviation) calibrated on sample rows, and the
    normalized row is then quantized per token as above.  Nothing is clamped, so a token outside
    the calibrated spread still decodes within half a step — its step is just coarser.  On
    heavy-tailed synthetic keys (Student-t, 4 of 64 channels offset by 5–10 and 3× wider), the
    relative squared error of this scheme vs plain per-token quantization was int8 9.8e-6 vs
    6.0e-5, int4 2.7e-3 vs 1.8e-2, int2 6.3e-2 vs 0.39; pure per-channel quantization with
    calibrated min/max and clamping (no per-token parameters, narrower rows) was far worse
    (int8 2.8e-2), because heavy tails make calibrated ranges wide.

    The channel statistics come from ``fit`` (the cache fits key codecs on the shipped calibration
    text or on the context's committed keys, like VQ codebooks); until then ``needs_fit`` is True
    and ``encode`` refuses, because statistics taken from whatever chunk arrives first — a
    two-token append, a question later rolled back — would be kept for good.  Scale is floored at a tenth of the head's mean
    scale so that a near-constant calibration channel cannot blow up later rows.
    """

    exact = False

    def __init__(self, heads: int, dim: int, bits: int = 8, axis: str = "token", group_size: int | None = None,
                 device: torch.device | str | None = None, rotate: bool = False, symmetric: bool = False) -> None:
        super().__init__(heads, dim, device)
        if bits not in BITS:
            raise ValueError(f"UniformCodec: bits={bits!r} is not valid; allowed values: {', '.join(map(str, BITS))}")
        if axis not in AXES:
            raise ValueError(f"UniformCodec: axis={axis!r} is not valid; allowed values: {', '.join(map(repr, AXES))}")
        group_size = min(32, dim) if group_size is None else group_size
        if not isinstance(group_size, int) or group_size < 1 or dim % group_size:
            raise ValueError(f"UniformCodec: group_size={group_size!r} must be a positive int dividing dim={dim}")
        per_word, _ = _word(bits)
        if dim % per_word:
            raise ValueError(f"UniformCodec: dim={dim} must be a multiple of {per_word} "
                             f"to pack {bits}-bit codes into whole bytes")
        self.name = f"int{bits}"
        self.bits = bits
        self.axis = axis
        self.group_size = group_size
        self.symmetric = symmetric
        self.levels = (1 << bits) - 1
        self.code_bytes = dim * bits // 8
        self._params = 1 if symmetric else 2  # float16 parameters per group: (minimum,) step
        self.width = self.code_bytes + (dim // group_size) * self._params * 2
        self._shift: torch.Tensor | None = None  # (heads, 1, dim) float32, channel axis only
        self._scale: torch.Tensor | None = None
        self._signs: torch.Tensor | None = None  # (dim,) ±1 float32 when rotating
        self._rotation: torch.Tensor | None = None
        if rotate:
            signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(dim)) * 2 - 1
            self._set_rotation(signs.float())

    @property
    def rotated(self) -> bool:
        return self._rotation is not None

    def _set_rotation(self, signs: torch.Tensor) -> None:
        if tuple(signs.shape) != (self.dim,) or not bool((signs.abs() == 1).all()):
            raise ValueError(f"UniformCodec: rotation signs must be {self.dim} values of ±1")
        self._signs = signs.float().to(self.device)
        self._rotation = self._signs[:, None] * hadamard(self.dim).to(self.device)

    @property
    def needs_fit(self) -> bool:
        return self.axis == "channel" and self._shift is None

    # --- channel calibration -----------------------------------------------------------------
    def fit(self, rows: torch.Tensor) -> None:
        """Channel axis: per-(head, channel) mean and (floored) standard deviation of ``rows``; token axis: nothing."""
        if self.axis == "token":
            return
        self._check_rows(rows)
        if rows.shape[1] == 0:
            raise ValueError("UniformCodec: fit needs at least one row to calibrate channels")
        x = rows.float()
        shift = x.mean(dim=1, keepdim=True)
        scale = x.std(dim=1, keepdim=True, correction=0)
        floor = 0.1 * scale.mean(dim=-1, keepdim=True)
        scale = torch.maximum(scale, floor)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self._shift, self._scale = shift.to(self.device), scale.to(self.device)

    # --- codes -------------------------------------------------------------------------------
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """``(heads, n, dim)`` float → ``(heads, n, width)`` uint8: packed codes, then per-group fp16 min (unless
        symmetric) and step."""
        self._check_rows(rows)
        heads, n, _ = rows.shape
        x = rows.float()
        if self.axis == "channel":
            shift, scale = self._channel_stats(x.device)
            x = (x - shift) / scale
        if self._rotation is not None:
            x = x @ self._rotation.to(x.device)
        groups = x.reshape(heads, n, -1, self.group_size)
        if self.symmetric:  # levels centred on zero: q * step - levels * step / 2
            step = _half_toward(2 * groups.abs().amax(dim=-1, keepdim=True) / self.levels, float("inf"))
            low = -0.5 * self.levels * step.float()
        else:
            low = _half_toward(groups.amin(dim=-1, keepdim=True), float("-inf"))
            step = _half_toward((groups.amax(dim=-1, keepdim=True) - low.float()) / self.levels, float("inf"))
        if not (torch.isfinite(low).all() and torch.isfinite(step).all()):
            raise ValueError("UniformCodec: rows hold non-finite values or exceed the float16 range of the "
                             "per-group parameters")
        safe_step = step.float().masked_fill(step == 0, 1.0)  # a zero step means a constant group: codes 0
        q = ((groups - low.float()) / safe_step).round_().clamp_(0, self.levels)
        params = (step if self.symmetric else torch.cat([low, step], dim=-1)).view(torch.uint8).reshape(heads, n, -1)
        return torch.cat([pack_bits(q.view(heads, n, self.dim), self.bits), params], dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        heads, n, _ = codes.shape
        groups = self.dim // self.group_size
        q = unpack_bits(codes[..., :self.code_bytes], self.bits).view(heads, n, groups, self.group_size)
        params = codes[..., self.code_bytes:].contiguous().view(torch.float16).view(heads, n, groups, self._params)
        step = params[..., -1:].float()
        low = -0.5 * self.levels * step if self.symmetric else params[..., :1].float()
        x = (q * step + low).view(heads, n, self.dim)
        if self._rotation is not None:
            x = x @ self._rotation.to(x.device).T
        if self.axis == "channel":
            shift, scale = self._channel_stats(codes.device)
            x = x * scale + shift
        return x

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Channel axis: ``{"shift", "scale"}`` of shape ``(heads, dim)`` float32 once calibrated; a rotating
        codec adds its ``rotation_signs`` ``(dim,)`` (seeded by ``dim``; kept with fitted state, so stored rows
        always decode in the basis they were encoded in)."""
        state = {} if self._signs is None else {"rotation_signs": self._signs}
        if self._shift is None or self._scale is None:
            return state
        return {**state, "shift": self._shift.squeeze(1), "scale": self._scale.squeeze(1)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if ("rotation_signs" in state) != self.rotated:
            raise ValueError(f"UniformCodec: state {'has' if 'rotation_signs' in state else 'lacks'} rotation signs "
                             f"but this codec {'rotates' if self.rotated else 'does not rotate'} its rows")
        if self.rotated:
            self._set_rotation(state.pop("rotation_signs").detach())
        if self.axis == "token":
            if state:
                raise ValueError(f"UniformCodec: axis='token' has no state, got keys {sorted(state)}")
            return
        for key in ("shift", "scale"):
            if key not in state or tuple(state[key].shape) != (self.heads, self.dim):
                got = tuple(state[key].shape) if key in state else None
                raise ValueError(f"UniformCodec: state {key!r} has shape {got}, expected {(self.heads, self.dim)}")
        self._shift = state["shift"].detach().float().unsqueeze(1).to(self.device)
        self._scale = state["scale"].detach().float().unsqueeze(1).to(self.device)

    # --- helpers -----------------------------------------------------------------------------
    def _check_rows(self, rows: torch.Tensor) -> None:
        if rows.dim() != 3 or rows.shape[0] != self.heads or rows.shape[2] != self.dim:
            raise ValueError(f"UniformCodec: rows must be (heads={self.heads}, n, dim={self.dim}), "
                             f"got {tuple(rows.shape)}")

    def channel_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel axis: ``(shift, scale)``, each ``(heads, dim)``, on ``device``."""
        shift, scale = self._channel_stats(device)
        return shift.squeeze(1), scale.squeeze(1)

    def _channel_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._shift is None or self._scale is None:
            raise ValueError("UniformCodec: axis='channel' needs its channel statistics before encoding or decoding; "
                             "call fit(rows) or load_state_dict(state) first")
        return self._shift.to(device), self._scale.to(device)
