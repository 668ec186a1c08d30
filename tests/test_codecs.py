"""Codecs: K-means, VQ codes and lookup-table scores, packed uniform quantization, the factory."""

from __future__ import annotations

import pytest
import torch

from hcmemory.codecs import CODEC_KINDS, IdentityCodec, UniformCodec, VQCodec, make_codec
from hcmemory.codecs import kmeans as kmeans_module
from hcmemory.codecs import vq as vq_module
from hcmemory.codecs.kmeans import assign, kmeans
from hcmemory.codecs.uniform import hadamard, pack_bits, unpack_bits

HEADS, DIM = 3, 64


def _rows(n: int, seed: int = 0, heads: int = HEADS, dim: int = DIM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, dim, generator=gen)


def _outlier_keys(n: int, seed: int) -> torch.Tensor:
    """Heavy-tailed keys with a few stable outlier channels (large offsets, wider spread)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(HEADS, n, DIM, generator=gen) / torch.rand(HEADS, n, 1, generator=gen).clamp(min=0.2)
    channels = torch.tensor([3, 17, 40, 55])
    x[:, :, channels] = x[:, :, channels] * 3 + torch.tensor([8.0, -6.0, 5.0, -10.0])
    return x


def _sq_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b**2).sum())


# --- K-means ------------------------------------------------------------------------------------

def test_kmeans_beats_its_random_start_and_is_deterministic() -> None:
    x = _rows(2000, heads=2, dim=4)
    fitted = kmeans(x, 64, iters=10, seed=1)
    start = kmeans(x, 64, iters=1, seed=1)  # one step from the random sample
    err = lambda c: _sq_error(torch.gather(c, 1, assign(x, c).unsqueeze(-1).expand(-1, -1, 4)), x)  # noqa: E731
    random_points = x[:, torch.randperm(2000, generator=torch.Generator().manual_seed(5))[:64]]
    assert err(fitted) < 0.8 * err(random_points)
    assert err(fitted) < err(start)
    assert torch.equal(fitted, kmeans(x, 64, iters=10, seed=1))
    assert not torch.equal(fitted, kmeans(x, 64, iters=10, seed=2))


def test_kmeans_with_fewer_points_than_centroids_returns_the_points_padded() -> None:
    x = _rows(5, heads=2, dim=3)
    c = kmeans(x, 8, iters=3)
    assert c.shape == (2, 8, 3)
    assert torch.equal(c[:, :5], x) and torch.equal(c[:, 5:], x[:, :3])
    assert torch.equal(c[0, assign(x, c)[0]], x[0])


def test_kmeans_reseeds_empty_clusters() -> None:
    # 20 distinct points, one of them repeated 2,000 times: a random start is mostly copies of it,
    # so only re-seeding the empty clusters can reach the zero-error codebook.
    distinct = _rows(20, heads=1, dim=2)
    x = torch.cat([distinct[:, :1].expand(-1, 2000, -1), distinct], dim=1)
    c = kmeans(x, 20, iters=15)
    assert torch.allclose(c[0, assign(distinct, c)[0]], distinct[0])


def test_assign_matches_brute_force_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmeans_module, "_CHUNK_ELEMENTS", 2000)
    x, c = _rows(300, heads=2, dim=4), _rows(50, seed=1, heads=2, dim=4)
    assert torch.equal(assign(x, c), torch.cdist(x, c).argmin(dim=-1))


def test_kmeans_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k=0"):
        kmeans(_rows(10, dim=2), 0, iters=3)
    with pytest.raises(ValueError, match="iters=0"):
        kmeans(_rows(10, dim=2), 4, iters=0)


# --- VQ -----------------------------------------------------------------------------------------

def _fitted_vq(sharing: str = "layer", s: int = 4, c: int = 64, n: int = 400) -> tuple[VQCodec, torch.Tensor]:
    codec = VQCodec(HEADS, DIM, subvector_dim=s, centroids=c, sharing=sharing, kmeans_iters=4)
    codec.fit(_rows(n))
    return codec, _rows(300, seed=1)


@pytest.mark.parametrize("sharing", ["layer", "head", "group"])
@pytest.mark.parametrize("s", [2, 4])
def test_vq_score_equals_dot_product_with_decoded_keys(sharing: str, s: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vq_module, "_CHUNK_ELEMENTS", 4096)  # several chunks of keys
    codec, keys = _fitted_vq(sharing, s)
    codes = codec.encode(keys)
    decoded = codec.decode(codes)
    for m in (1, 5):  # the lookup table (one query) and decoded keys (several)
        queries = _rows(m, seed=2)
        torch.testing.assert_close(codec.score(queries, codes), queries @ decoded.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharing", ["layer", "head", "group"])
def test_vq_codes_are_nearest_centroids_of_the_right_codebook(sharing: str) -> None:
    codec, keys = _fitted_vq(sharing, c=32)
    books = codec.state_dict()["codebook"].float()
    g = codec.groups
    assert books.shape == {"layer": (1, 32, 4), "head": (HEADS, 32, 4), "group": (HEADS * g, 32, 4)}[sharing]
    sub = keys.view(HEADS, -1, g, 4)
    expected = torch.empty_like(sub)
    for h in range(HEADS):
        for j in range(g):
            book = books[{"layer": 0, "head": h, "group": h * g + j}[sharing]]
            expected[h, :, j] = book[torch.cdist(sub[h, :, j], book).argmin(dim=-1)]
    assert torch.equal(codec.decode(codec.encode(keys)), expected.view(HEADS, -1, DIM))


def test_vq_finer_sharing_fits_heads_of_different_scales_better() -> None:
    keys = _rows(400) * torch.tensor([0.1, 1.0, 10.0]).view(HEADS, 1, 1)
    errors = {}
    for sharing in ("layer", "head"):
        codec = VQCodec(HEADS, DIM, centroids=64, sharing=sharing, kmeans_iters=4)
        codec.fit(keys)
        decoded = codec.decode(codec.encode(keys))
        errors[sharing] = _sq_error(decoded[0], keys[0])
    assert errors["head"] < 0.5 * errors["layer"]


@pytest.mark.parametrize("c, dtype", [(2, torch.uint8), (256, torch.uint8), (257, torch.int16), (4096, torch.int16)])
def test_vq_code_width(c: int, dtype: torch.dtype) -> None:
    codec = VQCodec(HEADS, DIM, subvector_dim=4, centroids=c, kmeans_iters=2)
    codec.fit(_rows(100))
    codes = codec.encode(_rows(10, seed=1))
    assert codes.dtype == dtype and codes.shape == (HEADS, 10, 16)
    assert codes.nbytes == HEADS * 10 * 16 * dtype.itemsize
    assert codec.nbytes() == c * 4 * 2  # one fp16 codebook per layer


def test_vq_indices_above_32767_survive_int16() -> None:
    # 40,000 distinct grid points (exact in fp16): fewer points than centroids, so they are the codebook.
    axis = torch.arange(200) / 64
    points = torch.cartesian_prod(axis, axis).unsqueeze(0)
    codec = VQCodec(1, 2, subvector_dim=2, centroids=65536, kmeans_iters=1)
    codec.fit(points)
    tail = points[:, -100:]  # indices 39,900 … 39,999
    codes = codec.encode(tail)
    assert codes.dtype == torch.int16 and int(codes.max()) < 0  # stored as i − 65536
    assert torch.equal(codec.decode(codes), tail)
    query = _rows(1, seed=3, heads=1, dim=2)
    torch.testing.assert_close(codec.score(query, codes), query @ tail.transpose(1, 2))


def test_vq_state_round_trip_gives_identical_codes_and_scores() -> None:
    codec, keys = _fitted_vq("head", c=300)
    fresh = VQCodec(HEADS, DIM, centroids=300, sharing="head")
    assert fresh.needs_fit and not codec.needs_fit
    fresh.load_state_dict(codec.state_dict())
    assert not fresh.needs_fit
    codes = codec.encode(keys)
    assert torch.equal(fresh.encode(keys), codes)
    query = _rows(1, seed=2)
    assert torch.equal(fresh.score(query, codes), codec.score(query, codes))
    assert torch.equal(fresh.decode(codes), codec.decode(codes))


def test_vq_rejects_bad_arguments() -> None:
    for kwargs, field in [({"subvector_dim": 3}, "subvector_dim"), ({"centroids": 1}, "centroids"),
                          ({"centroids": 65537}, "centroids"), ({"sharing": "model"}, "sharing"),
                          ({"kmeans_iters": 0}, "kmeans_iters")]:
        with pytest.raises(ValueError, match=field):
            VQCodec(HEADS, DIM, **kwargs)
    codec = VQCodec(HEADS, DIM, centroids=16)
    with pytest.raises(ValueError, match="fit"):
        codec.encode(_rows(4))
    with pytest.raises(ValueError, match="codebook"):
        codec.load_state_dict({"codebook": torch.zeros(2, 16, 4)})
    with pytest.raises(ValueError, match="rows must be"):
        codec.fit(_rows(4, dim=32))


# --- uniform ------------------------------------------------------------------------------------

def test_pack_bits_layout_and_round_trip() -> None:
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 12]), 4).tolist() == [5 | 12 << 4]
    # int3: eight codes as one little-endian 24-bit word; codes 2 and 5 straddle a byte boundary
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(int(c) << 3 * i for i, c in enumerate(codes))
    assert pack_bits(codes, 3).tolist() == [word & 0xFF, word >> 8 & 0xFF, word >> 16]
    for bits in (8, 4, 3, 2):
        q = torch.randint(0, 1 << bits, (3, 7, 64))
        packed = pack_bits(q, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 7, 64 * bits // 8)
        assert torch.equal(unpack_bits(packed, bits), q.int())


def _params(codec: UniformCodec, codes: torch.Tensor) -> torch.Tensor:
    """Per-group (min, step) stored after the packed codes of each row."""
    heads, n, _ = codes.shape
    return codes[..., codec.code_bytes:].contiguous().view(torch.float16).view(heads, n, -1, 2).float()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_uniform_round_trip_within_half_a_step(bits: int, axis: str) -> None:
    codec = UniformCodec(HEADS, DIM, bits=bits, axis=axis)
    codec.fit(_outlier_keys(256, seed=0))
    x = _outlier_keys(200, seed=1)
    codes = codec.encode(x)
    assert codes.dtype == torch.uint8
    error = (codec.decode(codes) - x).abs().view(HEADS, 200, -1, 32)
    if axis == "token":
        normalized, scale = x, torch.ones(HEADS, 1, DIM)
    else:
        state = codec.state_dict()
        scale = state["scale"].unsqueeze(1)
        normalized = (x - state["shift"].unsqueeze(1)) / scale
    groups = normalized.view(HEADS, 200, -1, 32)
    ideal_step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    step = _params(codec, codes)[..., 1]
    assert torch.all(step <= ideal_step * 1.002 + 1e-6)  # fp16 rounding widens the step by < 0.2 %
    bound = step.unsqueeze(-1) / 2 * scale.view(HEADS, 1, -1, 32)
    assert torch.all(error <= bound + 1e-6 * (1 + x.abs().view_as(error)))


@pytest.mark.parametrize("bits, width", [(8, 64 + 8), (4, 32 + 8), (3, 24 + 8), (2, 16 + 8)])
def test_uniform_rows_are_packed(bits: int, width: int) -> None:
    codec = make_codec(f"int{bits}", HEADS, DIM)
    codes = codec.encode(_rows(10))
    assert codec.name == f"int{bits}" and not codec.exact
    assert codes.shape == (HEADS, 10, width) and codes.nbytes == HEADS * 10 * width
    assert UniformCodec(1, 16, bits=bits).encode(_rows(2, heads=1, dim=16)).shape[-1] == 16 * bits // 8 + 4


def test_uniform_constant_and_oversized_rows() -> None:
    codec = UniformCodec(HEADS, DIM, bits=4)
    constant = torch.full((HEADS, 3, DIM), 0.3)
    assert torch.allclose(codec.decode(codec.encode(constant)), constant, atol=1e-4)
    for bad in (-1e6, float("nan")):
        with pytest.raises(ValueError, match="float16"):
            codec.encode(torch.full((HEADS, 1, DIM), bad))


@pytest.mark.parametrize("bits", [4, 2])
def test_uniform_channel_axis_beats_token_axis_on_outlier_channels(bits: int) -> None:
    calibration, keys = _outlier_keys(512, seed=0), _outlier_keys(512, seed=1)
    errors = {}
    for axis in ("token", "channel"):
        codec = UniformCodec(HEADS, DIM, bits=bits, axis=axis)
        codec.fit(calibration)
        errors[axis] = _sq_error(codec.decode(codec.encode(keys)), keys)
    assert errors["channel"] < 0.5 * errors["token"]


def test_uniform_channel_axis_needs_calibration_and_round_trips_state() -> None:
    codec = UniformCodec(HEADS, DIM, bits=8, axis="channel")
    assert codec.needs_fit and codec.state_dict() == {}
    keys = _outlier_keys(64, seed=0)
    with pytest.raises(ValueError, match="fit"):
        codec.encode(keys)  # statistics taken from whatever arrives first would be kept for good
    codec.fit(keys)
    assert not codec.needs_fit
    codes = codec.encode(keys)
    state = codec.state_dict()
    assert set(state) == {"shift", "scale"} and state["shift"].shape == (HEADS, DIM)
    assert codec.nbytes() == 2 * HEADS * DIM * 4
    fresh = UniformCodec(HEADS, DIM, bits=8, axis="channel")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.decode(codes), codec.decode(codes))
    assert torch.equal(fresh.encode(keys), codes)
    # a single calibration row has no spread: the codec falls back to plain per-token steps
    single = UniformCodec(HEADS, DIM, bits=8, axis="channel")
    single.fit(keys[:, :1])
    assert torch.allclose(single.decode(single.encode(keys)), keys, atol=0.2)


def test_hadamard_is_orthonormal_for_any_head_size() -> None:
    for dim in (64, 128, 96, 80, 8):
        h = hadamard(dim)
        assert h.shape == (dim, dim) and torch.allclose(h @ h.T, torch.eye(dim), atol=1e-6)
    assert set(hadamard(64).abs().unique().tolist()) == {1 / 8}  # one dense block: every channel mixed


def _spiky_rows(n: int, seed: int) -> torch.Tensor:
    """Rows whose large channel changes from token to token (per-token outliers channel statistics
    cannot normalise away): each row's range is set by one channel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(HEADS, n, DIM, generator=gen)
    spike = torch.randint(0, DIM, (HEADS, n, 1), generator=gen)
    return x.scatter_add(-1, spike, torch.full((HEADS, n, 1), 12.0))


@pytest.mark.parametrize("bits", [4, 3])
def test_rotated_rows_decode_within_half_a_step_and_spread_outliers(bits: int) -> None:
    rows = _spiky_rows(300, seed=0)
    plain = UniformCodec(HEADS, DIM, bits=bits, group_size=DIM)
    rotated = UniformCodec(HEADS, DIM, bits=bits, group_size=DIM, rotate=True)
    codes = rotated.encode(rows)
    assert codes.shape == plain.encode(rows).shape  # the same bytes
    step = _params(rotated, codes)[..., 1]  # (heads, n, 1): one group
    # the rotation is orthonormal, so a row's error norm is at most √dim half-steps
    assert torch.all((rotated.decode(codes) - rows).norm(dim=-1) <= step[..., 0] / 2 * DIM**0.5 * 1.001)
    assert _sq_error(rotated.decode(codes), rows) < 0.5 * _sq_error(plain.decode(plain.encode(rows)), rows)


@pytest.mark.parametrize("bits", [4, 3])
def test_symmetric_rows_keep_one_parameter_and_centre_their_levels(bits: int) -> None:
    codec = UniformCodec(HEADS, DIM, bits=bits, group_size=32, symmetric=True)
    rows = _rows(50, seed=3)
    codes = codec.encode(rows)
    assert codes.shape[-1] == UniformCodec(HEADS, DIM, bits=bits, group_size=32).width - 2 * 2
    step = codes[..., codec.code_bytes:].contiguous().view(torch.float16).float()  # (heads, n, groups)
    ideal = 2 * rows.view(HEADS, 50, 2, 32).abs().amax(-1) / (2**bits - 1)
    assert torch.all((step >= ideal) & (step <= ideal * 1.002))
    error = (codec.decode(codes) - rows).abs().view(HEADS, 50, 2, 32)
    assert torch.all(error <= step.unsqueeze(-1) / 2 + 1e-6)
    assert torch.equal(codec.decode(codec.encode(torch.zeros(HEADS, 2, DIM))), torch.zeros(HEADS, 2, DIM))


def test_rotation_signs_travel_with_the_state() -> None:
    codec = UniformCodec(HEADS, DIM, bits=4, axis="channel", rotate=True, symmetric=True)
    keys = _outlier_keys(64, seed=0)
    codec.fit(keys)
    state = codec.state_dict()
    assert set(state) == {"shift", "scale", "rotation_signs"} and set(state["rotation_signs"].tolist()) == {-1.0, 1.0}
    codes = codec.encode(keys)
    fresh = UniformCodec(HEADS, DIM, bits=4, axis="channel", rotate=True, symmetric=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.decode(codes), codec.decode(codes))
    with pytest.raises(ValueError, match="lacks rotation signs"):
        UniformCodec(HEADS, DIM, bits=4, rotate=True).load_state_dict({})
    with pytest.raises(ValueError, match="does not rotate"):
        UniformCodec(HEADS, DIM, bits=4).load_state_dict({"rotation_signs": state["rotation_signs"]})
    with pytest.raises(ValueError, match="±1"):
        UniformCodec(HEADS, DIM, bits=4, rotate=True).load_state_dict({"rotation_signs": torch.zeros(DIM)})


def test_uniform_rejects_bad_arguments() -> None:
    for kwargs, field in [({"bits": 5}, "bits"), ({"axis": "row"}, "axis"), ({"group_size": 24}, "group_size")]:
        with pytest.raises(ValueError, match=field):
            UniformCodec(HEADS, DIM, **kwargs)
    with pytest.raises(ValueError, match="dim=6 must be a multiple of 4"):
        UniformCodec(HEADS, 6, bits=2, group_size=6)
    with pytest.raises(ValueError, match="dim=12 must be a multiple of 8"):  # int3 packs 8 codes per 3 bytes
        UniformCodec(HEADS, 12, bits=3, group_size=12)
    with pytest.raises(ValueError, match="'shift'"):
        UniformCodec(HEADS, DIM, axis="channel").load_state_dict({"scale": torch.ones(HEADS, DIM)})


# --- factory ------------------------------------------------------------------------------------

def test_make_codec_kinds() -> None:
    assert set(CODEC_KINDS) == {"none", "fp16", "bf16", "vq", "int8", "int4", "int3", "int2"}
    none = make_codec("none", HEADS, DIM, dtype=torch.bfloat16)
    assert isinstance(none, IdentityCodec) and none.dtype == torch.bfloat16
    assert make_codec("fp16", HEADS, DIM, dtype=torch.float32).dtype == torch.float16
    assert make_codec("bf16", HEADS, DIM).dtype == torch.bfloat16
    vq = make_codec("vq", HEADS, DIM, subvector_dim=2, centroids=512, sharing="group", kmeans_iters=3)
    assert isinstance(vq, VQCodec) and (vq.groups, vq.centroids, vq.sharing, vq.kmeans_iters) == (32, 512, "group", 3)
    int4 = make_codec("int4", HEADS, DIM, axis="channel")
    assert isinstance(int4, UniformCodec) and (int4.bits, int4.axis) == (4, "channel")
    assert make_codec("int3", HEADS, DIM).bits == 3
    with pytest.raises(ValueError, match="kind='int5'.*'int2'"):
        make_codec("int5", HEADS, DIM)
