"""The C++ CPU kernels against the torch reference: random shapes (odd lengths, not multiples of the row
block), strided code buffers, shared and per-group codebooks, 8- and 16-bit codes, flat and peaked mass."""

from __future__ import annotations

import pytest
import torch

from hcmemory import HCCache, HCConfig
from hcmemory.prefill import prefill
from hcmemory.codecs import VQCodec
from hcmemory.kernels import cpu_kernels
from hcmemory.kernels.dispatch import approx_scores, choose, top_p_impl
from hcmemory.selection import top_p_select

from .conftest import tiny_model

if cpu_kernels.module() is None:
    pytest.skip(f"the CPU kernels did not build: {cpu_kernels.failure()}", allow_module_level=True)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("subvector, centroids, sharing", [(1, 16, "head"), (2, 256, "layer"), (4, 300, "group"),
                                                           (2, 40000, "head")])
@pytest.mark.parametrize("n, queries", [(1, 1), (9, 2), (37, 3), (259, 4), (300, 5), (301, 8), (70, 16)])
def test_lut_scores_equal_the_reference(subvector, centroids, sharing, n, queries):
    torch.manual_seed(n + queries)
    heads, dim = 3, 16
    codec = VQCodec(heads, dim, subvector_dim=subvector, centroids=centroids, sharing=sharing)
    codec.load_state_dict({"codebook": torch.randn(codec.books, centroids, subvector)})
    indices = torch.randint(0, centroids, (heads, n, dim // subvector))  # 16-bit codes >= 32768 included
    buffer = torch.zeros(heads, n + 9, dim // subvector, dtype=codec.code_dtype)  # rows of a larger buffer
    buffer[:, :n] = torch.where(indices >= 32768, indices - 65536, indices).to(codec.code_dtype)
    codes = buffer[:, :n]
    q = torch.randn(heads, queries, dim)
    expected = codec._score_decoded(q, codes)
    got = cpu_kernels.lut_scores(q, codec.groupwise_books(), codes)
    assert got.shape == (heads, queries, n)
    assert relative_error(got, expected) < 1e-5
    assert relative_error(approx_scores(codec, q, codes, backend="cpp"), expected) < 1e-5


def test_lut_scores_of_no_rows_and_bad_shapes():
    codec = VQCodec(2, 8, subvector_dim=2, centroids=4, kmeans_iters=1)
    codec.fit(torch.randn(2, 50, 8))
    assert cpu_kernels.lut_scores(torch.randn(2, 3, 8), codec.groupwise_books(),
                                  torch.zeros(2, 0, 4, dtype=torch.uint8)).shape == (2, 3, 0)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        cpu_kernels.lut_scores(torch.randn(2, 3, 8), codec.groupwise_books(), torch.zeros(2, 5, 3, dtype=torch.uint8))


@pytest.mark.parametrize("n", [1, 5, 63, 517, 4099])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [1.0, 8.0])
@pytest.mark.parametrize("min_rows", [0, 40])
def test_top_p_rows_choose_the_reference_rows(n, top_p, temperature, min_rows):
    torch.manual_seed(n)
    mass = torch.softmax(torch.randn(3, n) * temperature, dim=-1)
    expected = top_p_select(mass, top_p, min_rows=min_rows)
    got = top_p_impl(mass, "cpp")(mass, top_p, 17, min_rows)
    assert got.shape == expected.shape
    for head in range(3):
        assert set(got[head].tolist()) == set(expected[head].tolist())
        assert got[head].tolist() == sorted(got[head].tolist()), "ascending, ready to gather"


def test_top_p_rows_with_ties_and_zeros():
    """Equal masses: exactly k rows, the first rows of a tie; an all-zero head needs one row, and like
    every head returns k."""
    mass = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.6, 0.1, 0.1, 0.1]])
    assert cpu_kernels.top_p_rows(mass, 0.5).tolist() == [[0, 1], [0, 1], [0, 1]]
    assert cpu_kernels.top_p_rows(mass, 0.5, min_rows=3).tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert cpu_kernels.top_p_rows(mass[2:], 0.5).tolist() == [[1]]


def test_top_p_rows_refuses_nan_mass_instead_of_choosing_quietly():
    mass = torch.softmax(torch.randn(2, 50), dim=-1)
    mass[1, 7] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        cpu_kernels.top_p_rows(mass, 0.9)


def test_auto_chooses_the_cpu_kernels_and_a_forced_kernel_that_cannot_build_raises(monkeypatch):
    assert choose(torch.zeros(1), "auto") == "cpp"
    assert choose(torch.zeros(1), "torch") == "torch"
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failure", "OSError: no compiler")
    assert choose(torch.zeros(1), "auto") == "torch"
    with pytest.raises(RuntimeError, match="CPU kernels did not build.*no compiler"):
        choose(torch.zeros(1), "cpp")


@pytest.mark.parametrize("b, n, s, c", [(3, 1, 2, 256), (2, 1000, 1, 13), (1, 513, 4, 4096), (3, 77, 8, 300),
                                        (2, 5, 2, 1)])
def test_nearest_centroids_equal_the_reference(b, n, s, c):
    torch.manual_seed(n + c)
    points, centroids = torch.randn(b, n, s), torch.randn(b, c, s)
    centroids[:, -1] = centroids[:, 0]  # a duplicated centroid: the lower index wins
    got = cpu_kernels.nearest_centroids(points, centroids)
    assert got.dtype == torch.int64 and got.shape == (b, n)
    assert c == 1 or not (got == c - 1).any()
    distance = torch.cdist(points.double(), centroids.double())
    best = distance.gather(-1, got[..., None])[..., 0]
    assert torch.allclose(best, distance.amin(-1), rtol=0, atol=1e-5)


def test_vq_encode_is_the_same_with_the_assignment_kernel():
    codec, reference = (VQCodec(3, 64, subvector_dim=2, centroids=256, sharing="head", nearest=nearest)
                        for nearest in (cpu_kernels.nearest_centroids, None))
    state = {"codebook": torch.randn(3, 256, 2)}
    codec.load_state_dict(state)
    reference.load_state_dict(state)
    for n in (1, 1000):  # a decode step, a prefill chunk; the two may part only on float near-ties
        keys = torch.randn(3, n, 64)
        assert (codec.encode(keys) == reference.encode(keys)).float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, m, dim, capacity, k", [(3, 3, 64, 700, 150), (2, 1, 16, 50, 1), (1, 5, 24, 300, 300),
                                                        (8, 4, 128, 2000, 333)])
def test_gather_attention_equals_attention_over_the_gathered_rows(dtype, heads, m, dim, capacity, k):
    torch.manual_seed(capacity + k)
    keys, values = (torch.randn(heads, capacity, dim).to(dtype) * 3 for _ in range(2))
    index = torch.stack([torch.randperm(capacity)[:k] for _ in range(heads)])
    queries = torch.randn(heads, m, dim)
    rows = [torch.stack([buffer[h, index[h]] for h in range(heads)]).double() for buffer in (keys, values)]
    expected = torch.softmax(queries.double() @ rows[0].mT * 0.125, dim=-1) @ rows[1]
    got = cpu_kernels.gather_attention(queries, keys, values, index, 0.125)
    assert got.dtype == torch.float32 and got.shape == (heads, m, dim)
    assert float((got.double() - expected).abs().max() / expected.abs().max()) < 1e-5


def test_gather_attention_refuses_rows_outside_the_buffers():
    keys = torch.randn(2, 10, 8)
    with pytest.raises(RuntimeError, match="outside the row buffers"):
        cpu_kernels.gather_attention(torch.randn(2, 1, 8), keys, keys.clone(), torch.tensor([[0, 10], [1, 2]]), 1.0)


def test_hc_attention_is_the_same_with_either_cpu_path(monkeypatch):
    """Decoding over a compressed cache picks the same rows and gives the same logits with the C++
    kernels (the fused attention over the selected rows included) as with the torch reference."""
    fused_steps = []
    kernel_fn = cpu_kernels.gather_attention
    monkeypatch.setattr(cpu_kernels, "gather_attention", lambda *args: fused_steps.append(1) or kernel_fn(*args))
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    outputs = []
    for kernel in ("torch", "cpp"):
        config = HCConfig.preset("hc-12.5", kernel=kernel, sink_tokens=4, recent_tokens=16, calibration="context",
                                 calibration_tokens=128, vq_centroids=16, top_p=0.5)
        cache = HCCache(model, config)
        with torch.no_grad():
            prefill(model, cache, ids[:, :290], 100)
            steps = [prefill(model, cache, ids[:, i:i + 1], 100) for i in range(290, 300)]
        outputs.append((torch.cat(steps), [layer.selected_rows for layer in cache.layers],
                        [layer.selectable_rows for layer in cache.layers]))
    (torch_logits, torch_rows, selectable), (cpp_logits, cpp_rows, _) = outputs
    assert torch_rows == cpp_rows and all(0 < r < s for r, s in zip(cpp_rows, selectable))
    assert len(fused_steps) == 10 * model.config.num_hidden_layers, "every decode step of the C++ path was fused"
    torch.testing.assert_close(cpp_logits, torch_logits, rtol=1e-5, atol=1e-5)
