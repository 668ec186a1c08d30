"""The Triton kernels against the torch reference: random shapes (odd lengths, not multiples of the block),
strided code buffers, poisoned outputs, fp32 and fp16.  Compiled on a GPU where there is one (the GPU
benchmark script runs this file there), else run on the CPU by Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hcmemory.codecs import UniformCodec, VQCodec  # noqa: E402
from hcmemory.kernels import triton_kernels  # noqa: E402
from hcmemory.kernels.dispatch import approx_scores, choose, top_p_impl  # noqa: E402
from hcmemory.selection import top_p_select  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def strided(codes: torch.Tensor, spare: int = 7) -> torch.Tensor:
    """The codes as rows of a larger buffer, like the cache's row buffers (capacity beyond the rows)."""
    heads, n, width = codes.shape
    buffer = torch.zeros(heads, n + spare, width, dtype=codes.dtype, device=codes.device)
    buffer[:, :n] = codes
    return buffer[:, :n]


@pytest.mark.parametrize("subvector, centroids, sharing", [(1, 16, "head"), (2, 256, "layer"), (4, 300, "group")])
@pytest.mark.parametrize("n, queries", [(1, 1), (37, 3), (130, 5), (70, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lut_scores_equal_the_reference(subvector, centroids, sharing, n, queries, dtype):
    torch.manual_seed(n + queries)
    heads, dim = 3, 16
    codec = VQCodec(heads, dim, subvector_dim=subvector, centroids=centroids, sharing=sharing, kmeans_iters=2,
                    device=DEVICE)
    codec.fit(torch.randn(heads, 400, dim, device=DEVICE))
    codes = strided(codec.encode(torch.randn(heads, n, dim, device=DEVICE)))
    q = torch.randn(heads, queries, dim, device=DEVICE).to(dtype)
    expected = codec._score_decoded(q.float(), codes)
    out = torch.full((heads, queries, n), float("nan"), device=DEVICE)
    got = triton_kernels.lut_scores(codec.lookup_table(q), codes, out=out)
    assert got is out and not torch.isnan(got).any(), "every score is written"
    assert relative_error(got, expected) < TOLERANCE[dtype]
    assert relative_error(approx_scores(codec, q, codes, backend="triton"), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("n, queries", [(1, 1), (45, 3), (129, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uniform_scores_equal_the_reference(bits, axis, n, queries, dtype):
    torch.manual_seed(bits * n)
    heads, dim = 2, 64
    codec = UniformCodec(heads, dim, bits=bits, axis=axis, device=DEVICE)
    codec.fit(torch.randn(heads, 300, dim, device=DEVICE) * 3 + 1)
    codes = strided(codec.encode(torch.randn(heads, n, dim, device=DEVICE) * 3 + 1))
    q = torch.randn(heads, queries, dim, device=DEVICE).to(dtype)
    expected = q.float() @ codec.decode(codes).transpose(-1, -2)
    out = torch.full((heads, queries, n), float("nan"), device=DEVICE)
    shift, scale = codec.channel_stats(codes.device) if axis == "channel" else (None, None)
    got = triton_kernels.uniform_scores(q, codes, bits, codec.group_size, shift, scale, out=out)
    assert got is out and not torch.isnan(got).any()
    assert relative_error(got, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("n", [5, 63, 64, 200, 517, 2500])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("min_rows", [0, 40])
def test_top_p_rows_choose_the_reference_rows(n, top_p, min_rows):
    torch.manual_seed(n)
    mass = torch.softmax(torch.randn(3, n, device=DEVICE) * 3, dim=-1)
    expected = top_p_select(mass, top_p, min_rows=min_rows)
    got = top_p_impl(mass, "triton")(mass, top_p, min_rows=min_rows)
    assert got.shape == expected.shape and (got >= 0).all()
    for head in range(3):
        assert set(got[head].tolist()) == set(expected[head].tolist())
        assert got[head].tolist() == sorted(got[head].tolist()), "ascending, ready to gather"
    reached = mass.gather(1, got).sum(-1)
    assert (reached >= top_p * mass.sum(-1) - 1e-6).all()


@pytest.mark.parametrize("rotate, symmetric", [(True, False), (False, True)])
def test_rows_the_uniform_kernel_cannot_read_are_scored_by_decoding(rotate, symmetric):
    """The Triton scorer knows plain min/step rows only; rotated or symmetric rows take the codec's own
    path rather than being misread."""
    torch.manual_seed(0)
    codec = UniformCodec(2, 64, bits=4, axis="channel", rotate=rotate, symmetric=symmetric, device=DEVICE)
    codec.fit(torch.randn(2, 300, 64, device=DEVICE) * 3 + 1)
    codes = codec.encode(torch.randn(2, 40, 64, device=DEVICE) * 3 + 1)
    q = torch.randn(2, 3, 64, device=DEVICE)
    expected = q @ codec.decode(codes).transpose(-1, -2)
    assert relative_error(approx_scores(codec, q, codes, backend="triton"), expected) < TOLERANCE[torch.float32]


def test_auto_leaves_triton_to_cuda_tensors():
    codec = VQCodec(1, 8, subvector_dim=2, centroids=4, kmeans_iters=1)
    assert choose(torch.zeros(1, 4), "auto") in ("cpp", "torch")
    assert top_p_impl(torch.zeros(1, 4), "torch") is None
    with pytest.raises(ValueError, match="kernel backend"):
        approx_scores(codec, torch.zeros(1, 1, 8), torch.zeros(1, 1, 4, dtype=torch.uint8), backend="cuda")

