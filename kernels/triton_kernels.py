"""The Triton kernels (imported only when a Triton path is used: importing this module compiles nothing,
but ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so tests set it before the first use).

* ``lut_scores`` — the paper's lookup-table scoring.  The table ``T = q_split · Cᵀ`` (heads x groups x
  centroids x queries, a few hundred KB whatever the context length) is built by one small einsum
  and stays in cache; a program per (KV head, block of keys) gathers ``T[h, j, P[key, j], :]`` for
  every group ``j`` and sums, for all query heads of the KV head at once (GQA), and writes scaled
  scores.  Keys are never materialised.  8- and 16-bit codes; any sub-vector size.
* ``top_p_rows`` — per head, the smallest set of rows reaching ``p`` of the mass, found by bisection
  on a threshold (no sort), then the top-``k`` rows of every head for ``k`` = the largest such set:
  the same rectangular choice as ``selection.top_p_select``, with one device-to-host read (``k``).
* ``uniform_scores`` — packed int8/int4/int3/int2 rows unpacked, dequantised (per-group min/step, then the
  codec's per-channel shift/scale) and dotted with the queries in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_N = 64
"""Rows per program of the scoring kernels (a grid of many programs covers the context)."""
_SCAN_BLOCK = 1024
"""Rows per loop step of the top-p kernels: one program per head walks every row, so wide steps."""
_BISECTIONS = 40


@triton.jit
def _lut_gather(table, codes, out, n, stride_ch, stride_cn, scale,
                G: tl.constexpr, C: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, WIDE: tl.constexpr,
                BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    ms = tl.arange(0, MP)
    mlive = ms < M
    acc = tl.zeros((BLOCK_N, MP), dtype=tl.float32)
    for g in range(G):
        code = tl.load(codes + h * stride_ch + rows * stride_cn + g, mask=live, other=0).to(tl.int32)
        if WIDE:
            code = code & 0xFFFF  # 16-bit codes are stored as their two's complement
        base = ((h * G + g) * C + code) * M
        acc += tl.load(table + base[:, None] + ms[None, :], mask=live[:, None] & mlive[None, :], other=0.0)
    tl.store(out + h * M * n + ms[None, :] * n + rows[:, None], acc * scale, mask=live[:, None] & mlive[None, :])


def _prepared(codes: torch.Tensor, m: int, out: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """What both scoring kernels launch with: codes with unit stride along a row (rows may keep the
    buffer's stride), the float32 ``(heads, m, n)`` output, and one program per (head, block of rows)."""
    heads, n = codes.shape[:2]
    out = torch.empty(heads, m, n, dtype=torch.float32, device=codes.device) if out is None else out
    codes = codes if codes.stride(2) == 1 else codes.contiguous()
    return codes, out, (heads, triton.cdiv(n, _BLOCK_N))


def lut_scores(table: torch.Tensor, codes: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``table (heads, g, c, m)`` and codes ``(heads, n, g)`` (uint8 or int16, any row stride) ->
    scores ``(heads, m, n)`` float32, times ``scale`` (into ``out`` when given)."""
    heads, groups, centroids, m = table.shape
    codes, out, grid = _prepared(codes, m, out)
    n = codes.shape[1]
    if n == 0:
        return out
    _lut_gather[grid](table.contiguous(), codes, out, n, codes.stride(0), codes.stride(1), scale,
                      G=groups, C=centroids, M=m, MP=max(2, triton.next_power_of_2(m)),
                      WIDE=codes.dtype == torch.int16, BLOCK_N=_BLOCK_N)
    return out


@triton.jit
def _mass_above(mass, n, row, threshold, BLOCK_N: tl.constexpr):
    """(mass of the row's entries >= threshold, how many there are)."""
    total = 0.0
    count = 0
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        values = tl.load(mass + row * n + offs, mask=offs < n, other=-1.0)
        keep = values >= threshold
        total += tl.sum(tl.where(keep, values, 0.0))
        count += tl.sum(keep.to(tl.int32))
    return total, count


@triton.jit
def _threshold(mass, n, top_p, k, thresholds, counts, BY_COUNT: tl.constexpr, BISECTIONS: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Per row: the largest threshold keeping ``top_p`` of the mass (or, BY_COUNT, at least ``k`` rows)."""
    row = tl.program_id(0)
    high = 0.0
    total = 0.0
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        values = tl.load(mass + row * n + offs, mask=offs < n, other=0.0)
        high = tl.maximum(high, tl.max(values))
        total += tl.sum(values)
    low = 0.0
    for _ in range(BISECTIONS):  # invariant: the set at `low` is enough, the set above `high` is not
        middle = (low + high) * 0.5
        kept, count = _mass_above(mass, n, row, middle, BLOCK_N)
        enough = count >= k if BY_COUNT else kept >= top_p * total
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle)
    _, count = _mass_above(mass, n, row, low, BLOCK_N)
    tl.store(thresholds + row, low)
    tl.store(counts + row, count)


@triton.jit
def _compact(mass, n, thresholds, out, k, BLOCK_N: tl.constexpr):
    """The first ``k`` row indices (ascending) at or above the row's threshold, written compactly."""
    row = tl.program_id(0)
    threshold = tl.load(thresholds + row)
    written = 0
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        keep = (tl.load(mass + row * n + offs, mask=offs < n, other=-1.0) >= threshold) & (offs < n)
        slot = written + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out + row * k + slot, offs.to(tl.int64), mask=keep & (slot < k))
        written += tl.sum(keep.to(tl.int32))


def top_p_rows(mass: torch.Tensor, top_p: float, min_rows: int = 0) -> torch.Tensor:
    """Row indices ``(heads, k)`` (ascending per head) reaching ``top_p`` of each head's mass, ``k`` the
    largest count any head needs (at least ``min_rows``); ``mass (heads, n)`` non-negative."""
    heads, n = mass.shape
    mass = mass.float().contiguous()
    thresholds = torch.empty(heads, dtype=torch.float32, device=mass.device)
    counts = torch.empty(heads, dtype=torch.int32, device=mass.device)
    _threshold[(heads,)](mass, n, top_p, 0, thresholds, counts, BY_COUNT=False, BISECTIONS=_BISECTIONS,
                         BLOCK_N=_SCAN_BLOCK)
    k = min(n, max(int(counts.max()), min_rows))  # the one device-to-host read of the step
    _threshold[(heads,)](mass, n, top_p, k, thresholds, counts, BY_COUNT=True, BISECTIONS=_BISECTIONS,
                         BLOCK_N=_SCAN_BLOCK)
    out = torch.full((heads, k), -1, dtype=torch.int64, device=mass.device)
    _compact[(heads,)](mass, n, thresholds, out, k, BLOCK_N=_SCAN_BLOCK)
    return out


@triton.jit
def _uniform_dot(codes, qs, qsum, out, n, stride_ch, stride_cn, scale,
                 D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, CODE_BYTES: tl.constexpr,
                 M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    dims = tl.arange(0, D)
    bit = dims * BITS  # the codes are one little-endian bit stream
    row = codes + h * stride_ch + rows[:, None] * stride_cn
    word = tl.load(row + (bit // 8)[None, :], mask=live[:, None], other=0).to(tl.int32)
    if 8 % BITS != 0:  # int3: a code may straddle two bytes
        second = (bit // 8 + 1) < CODE_BYTES
        word |= tl.load(row + (bit // 8 + 1)[None, :], mask=live[:, None] & second[None, :],
                        other=0).to(tl.int32) << 8
    q = (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
    group = dims // GROUP
    param = h * stride_ch + rows[:, None] * stride_cn + CODE_BYTES + group[None, :] * 4
    low = (tl.load(codes + param, mask=live[:, None], other=0).to(tl.uint16)
           | (tl.load(codes + param + 1, mask=live[:, None], other=0).to(tl.uint16) << 8))
    step = (tl.load(codes + param + 2, mask=live[:, None], other=0).to(tl.uint16)
            | (tl.load(codes + param + 3, mask=live[:, None], other=0).to(tl.uint16) << 8))
    x = q.to(tl.float32) * step.to(tl.float16, bitcast=True).to(tl.float32) \
        + low.to(tl.float16, bitcast=True).to(tl.float32)
    for m in range(M):
        qm = tl.load(qs + (h * M + m) * D + dims)
        score = tl.sum(x * qm[None, :], axis=1) + tl.load(qsum + h * M + m)
        tl.store(out + (h * M + m) * n + rows, score * scale, mask=live)


def uniform_scores(queries: torch.Tensor, codes: torch.Tensor, bits: int, group_size: int,
                   shift: torch.Tensor | None, scale_: torch.Tensor | None, scale: float = 1.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``queries (heads, m, dim)`` · dequantised packed rows ``(heads, n, width)`` -> ``(heads, m, n)``.

    With per-channel ``shift``/``scale_`` (``(heads, dim)``, the key codec's channel axis) the queries
    are folded into them once: ``q · (x * scale_ + shift) = (q * scale_) · x + q · shift``."""
    heads, m, dim = queries.shape
    n = codes.shape[1]
    q = queries.float()
    qsum = torch.zeros(heads, m, dtype=torch.float32, device=q.device)
    if scale_ is not None:
        qsum = (q * shift[:, None, :]).sum(-1)
        q = q * scale_[:, None, :]
    codes, out, grid = _prepared(codes, m, out)
    if n == 0:
        return out
    _uniform_dot[grid](codes, q.contiguous(), qsum.contiguous(), out, n, codes.stride(0), codes.stride(1), scale,
                       D=dim, BITS=bits, GROUP=group_size, CODE_BYTES=dim * bits // 8, M=m, BLOCK_N=_BLOCK_N)
    return out
