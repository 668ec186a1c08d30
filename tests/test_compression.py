"""The compressed path: select-then-exact, the paper's way, eviction guarantees, honest byte counts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig
from hcmemory.attention import attend
from hcmemory.layer import HCLayer
from hcmemory.prefill import prefill

from .conftest import tiny_model
from .test_cache_exact import assert_close, random_ids, run

pytestmark = pytest.mark.core

EXACT_HOST = dict(value_codec="none", rescore_keys="none")
"""Host copies at model precision, so re-scoring can be compared with full attention exactly."""


def calibrate(layer: HCLayer, keys: torch.Tensor) -> None:
    """Fit the layer's key codecs on ``keys (heads, n, dim)``, as the shipped calibration would."""
    codecs = layer._fresh_codecs()
    codecs.fit(keys)
    layer.load_codec_states({name: getattr(codecs, name).state_dict() for name in ("keys", "exact_keys")
                             if getattr(codecs, name) is not None})


def filled_layer(config: HCConfig, n: int = 120, heads: int = 2, dim: int = 16, seed: int = 0) -> tuple[HCLayer, ...]:
    torch.manual_seed(seed)
    layer = HCLayer(config, heads, dim, torch.device("cpu"), torch.float32)
    keys, values = torch.randn(1, heads, n, dim), torch.randn(1, heads, n, dim)
    calibrate(layer, keys[0])
    layer.update(keys, values)
    return layer, keys[0], values[0]


def reference_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
                        ) -> torch.Tensor:
    """Plain softmax attention of one query token ``(1, q_heads, 1, dim)`` over ``(heads, n, dim)``."""
    groups = query.shape[1] // keys.shape[0]
    k = keys.repeat_interleave(groups, dim=0)
    v = values.repeat_interleave(groups, dim=0)
    probs = torch.softmax((query[0] @ k.transpose(-1, -2)) * scaling, dim=-1)
    return (probs @ v)[None]


@pytest.mark.parametrize("codec", ["vq", "int4", "int2"])
def test_rescoring_with_top_p_one_is_exact_attention(codec):
    config = HCConfig(key_codec=codec, vq_centroids=16, vq_subvector_dim=2, top_p=1.0, rescore=True,
                      sink_tokens=4, recent_tokens=16, **EXACT_HOST)
    layer, keys, values = filled_layer(config)
    query = torch.randn(1, 4, 1, 16)
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))  # the query's own token
    keys_all, values_all = layer.exact_rows(0, len(layer))
    expected = reference_attention(query, keys_all, values_all, 0.25)
    assert_close(attend(layer, query, 0.25), expected, rel=1e-5)


def test_papers_way_is_exact_attention_over_dequantized_keys():
    config = HCConfig(key_codec="vq", vq_centroids=16, vq_subvector_dim=2, top_p=1.0, rescore=False,
                      sink_tokens=4, recent_tokens=16, **EXACT_HOST)
    layer, keys, values = filled_layer(config)
    query = torch.randn(1, 4, 1, 16)
    new_k, new_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    layer.update(new_k, new_v)
    codec = layer.key_codes.codec
    approx = codec.decode(codec.encode(torch.cat([keys, new_k[0]], 1)))  # no exact key copy without re-scoring
    expected = reference_attention(query, approx, torch.cat([values, new_v[0]], 1), 0.25)
    got = attend(layer, query, 0.25)
    assert_close(got, expected, rel=1e-5)
    exact = reference_attention(query, torch.cat([keys, new_k[0]], 1), torch.cat([values, new_v[0]], 1), 0.25)
    assert not torch.allclose(got, exact, atol=1e-4), "16 centroids must visibly perturb the weights"


@pytest.mark.parametrize("codec", ["vq", "int4"])
def test_without_rescoring_a_prefill_chunk_attends_causally_over_the_decoded_keys(codec):
    """kivi-style configs (``rescore=False``, ``top_p=1``) select nothing, so a chunk's attention is plain
    causal attention over the keys as the codes decode — computed by SDPA, no explicit score matrix."""
    config = HCConfig(key_codec=codec, value_codec="int4", vq_centroids=16, vq_subvector_dim=2, top_p=1.0,
                      rescore=False, sink_tokens=4, recent_tokens=16)
    layer, _, _ = filled_layer(config, n=200)
    chunk = 40
    layer.update(torch.randn(1, 2, chunk, 16), torch.randn(1, 2, chunk, 16))
    query = torch.randn(1, 4, chunk, 16)
    keys, values = (rows.repeat_interleave(2, dim=0) for rows in layer.exact_rows(0, len(layer)))
    scores = query[0] @ keys.mT * 0.25
    hidden = torch.arange(len(layer))[None, :] > torch.arange(len(layer) - chunk, len(layer))[:, None]
    expected = (torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ values)[None]
    assert_close(attend(layer, query, 0.25), expected, rel=1e-5)


def test_top_p_selection_reads_fewer_rows_and_stays_close():
    config = HCConfig(key_codec="vq", vq_centroids=64, vq_subvector_dim=2, top_p=0.9, sink_tokens=4,
                      recent_tokens=16, **EXACT_HOST)
    layer, keys, values = filled_layer(config, n=400)
    # a query aligned with one stored key: the mass concentrates, so few rows are needed
    query = (keys[0, 200] * 3).repeat(4, 1)[None, :, None, :]
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    got = attend(layer, query, 0.25)
    keys_all, values_all = layer.exact_rows(0, len(layer))
    expected = reference_attention(query, keys_all, values_all, 0.25)
    assert layer.selected_rows < 0.5 * layer.selectable_rows
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_compact_scores_every_row_whatever_its_codes_say():
    """``compact`` selects nothing away: on text people wrote, 4-dim codes at top-p 0.9 dropped rows a
    copied number needed (docs/DESIGN-NOTES.md).  Every step attends over all its stored rows (codes plus
    int4 residuals, int4 values) as plain softmax would; the same layout at top-p 0.9 reads a subset."""
    for top_p in (1.0, 0.9):
        config = HCConfig.preset("compact", vq_centroids=16, top_p=top_p, recent_tokens=16)
        layer, _, _ = filled_layer(config, n=400)
        query = torch.randn(1, 4, 1, 16) * 0.3  # diffuse attention, as over prose
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        got = attend(layer, query, 0.25)
        if top_p == 1.0:
            assert top_p == HCConfig.preset("compact").top_p
            assert_close(got, reference_attention(query, *layer.exact_rows(0, len(layer)), 0.25), rel=1e-5)
        else:
            assert layer.selected_rows < layer.selectable_rows


def test_residual_rescoring_keys_refine_the_codes_in_the_same_bytes():
    """``rescore_residual``: the host copy holds ``key − decode(code)``, and every read of exact keys
    (a range, selected rows) adds the codes back."""
    base = dict(key_codec="vq", vq_centroids=64, vq_subvector_dim=2, rescore_keys="int4", sink_tokens=4,
                recent_tokens=16)
    errors, host = {}, {}
    for residual in (False, True):
        layer, keys, _ = filled_layer(HCConfig(**base, rescore_residual=residual), n=400)
        got = layer.exact_rows(0, len(layer))[0]
        errors[residual] = float(((got - keys) ** 2).sum() / (keys ** 2).sum())
        index = torch.stack([torch.randperm(400)[:50] for _ in range(2)])
        assert_close(layer.exact_keys_at(index), got.gather(1, index[..., None].expand(-1, -1, 16)), rel=1e-6)
        host[residual] = layer.host_bytes()
    assert host[True] == host[False]
    assert errors[True] < errors[False] / 3, errors


def test_quant_group_size_trades_host_bytes_for_precision_in_every_int_codec():
    """Wider groups store fewer min/step pairs (4 B each) in the re-scoring keys and the values, and err more."""
    base = dict(key_codec="vq", vq_centroids=64, vq_subvector_dim=2, rescore_keys="int4", rescore_residual=True,
                value_codec="int4", value_placement="host", sink_tokens=4, recent_tokens=16)
    host, errors = {}, {}
    for group in (4, 16, 64):  # 64 > the 16-dim head: one group per row, as 16 does
        layer, keys, values = filled_layer(HCConfig(**base, quant_group_size=group), n=400)
        got_keys, got_values = layer.exact_rows(0, len(layer))
        host[group] = layer.host_bytes()
        errors[group] = [float(((got - want) ** 2).sum() / (want ** 2).sum())
                         for got, want in ((got_keys, keys), (got_values, values))]
    rows = 2 * 400  # heads x rows, in each of the two int4 stores
    assert host[4] - host[16] == 2 * rows * (16 // 4 - 1) * 4, "three fewer 4-byte groups per row and store"
    assert host[64] == host[16]
    assert all(e16 > e4 for e16, e4 in zip(errors[16], errors[4])), errors
    with pytest.raises(ValueError, match=r"HCConfig\.quant_group_size=12 does not divide .* head dimension \(16\)"):
        filled_layer(HCConfig(**base, quant_group_size=12))


def test_rotated_and_centred_int_rows_read_back_through_every_path():
    """``quant_rotation`` and ``residual_symmetric`` change only how rows are coded: ranges and gathered rows
    decode alike, rotated rows are as long, symmetric residual rows one float16 (2 B) shorter, and all stay
    accurate."""
    base = dict(key_codec="vq", vq_centroids=64, vq_subvector_dim=2, rescore_keys="int4", rescore_residual=True,
                value_codec="int4", value_placement="host", sink_tokens=4, recent_tokens=16, quant_group_size=16)
    host, errors = {}, {}
    for rotate, symmetric in ((False, False), (True, False), (True, True)):
        layer, keys, values = filled_layer(HCConfig(**base, quant_rotation=rotate, residual_symmetric=symmetric),
                                           n=400)
        got_keys, got_values = layer.exact_rows(0, len(layer))
        index = torch.stack([torch.randperm(400)[:50] for _ in range(2)])
        assert_close(layer.exact_keys_at(index), got_keys.gather(1, index[..., None].expand(-1, -1, 16)), rel=1e-6)
        host[rotate, symmetric] = layer.host_bytes()
        errors[rotate, symmetric] = [float(((got - want) ** 2).sum() / (want ** 2).sum())
                                     for got, want in ((got_keys, keys), (got_values, values))]
    assert host[True, False] - host[False, False] == 2 * 16 * 4, "the same rows; each codec keeps its 16 signs"
    assert host[True, False] - host[True, True] == 2 * 400 * 2, "one float16 fewer per residual row"
    assert all(e < 0.01 for pair in errors.values() for e in pair), errors


WINDOWED = dict(key_codec="vq", vq_centroids=16, vq_subvector_dim=2, rescore_keys="int4", rescore_residual=True,
                value_codec="int4", sink_tokens=4, recent_tokens=16, full_precision_window=True)


def test_full_precision_window_reads_the_rows_read_exactly_as_given_at_a_fixed_cost():
    layer, keys, values = filled_layer(HCConfig(**WINDOWED))
    half = lambda t: t.half().float()  # a float32 model's copies are float16
    assert all(torch.equal(got, half(want)) for got, want in zip(layer.exact_rows(0, 120), (keys, values))), \
        "the chunk being attended is read as the model gave it"
    layer.after_attention(None)  # the step is over: the next one reads the sinks and the last 16 rows exactly
    got_keys, got_values = layer.exact_rows(0, 120)
    exact = torch.zeros(120, dtype=torch.bool)
    exact[:4] = exact[104:] = True
    keys, values = half(keys), half(values)
    assert torch.equal(got_keys[:, exact], keys[:, exact]) and torch.equal(got_values[:, exact], values[:, exact])
    assert bool(((got_values - values)[:, ~exact].abs().amax(dim=(0, 2)) > 0).all()), "the rest are int4 rows"
    index = torch.stack([torch.randperm(120)[:60] for _ in range(2)])
    pick = index[..., None].expand(-1, -1, 16)
    assert torch.equal(layer.values_at(index), got_values.gather(1, pick))
    assert torch.equal(layer.exact_keys_at(index), got_keys.gather(1, pick))
    plain, _, _ = filled_layer(HCConfig(**{**WINDOWED, "full_precision_window": False}))
    total = lambda layer: layer.host_bytes() + layer.device_bytes()
    assert layer.device_bytes() - plain.device_bytes() == 20 * 2 * 16 * 2 * 2, "sinks + recent fp16 rows, beside values"
    assert total(layer) - total(plain) == 20 * 2 * 16 * 2 * 2
    key, value = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    layer.update(key, value)  # the next step reads the 16 rows before it and itself exactly
    got_values = layer.exact_rows(0, 121)[1]
    assert torch.equal(got_values[:, 120], half(value[0, :, 0]))
    assert torch.equal(got_values[:, 104:120], values[:, 104:])
    layer.after_attention(None)
    assert not torch.equal(layer.exact_rows(104, 105)[1][:, 0], values[:, 104]), "row 104 left: read from its codes"


KIVI_LIKE = dict(key_codec="int4", value_codec="int4", rescore=False, top_p=1.0, sink_tokens=4, recent_tokens=16)


@pytest.mark.parametrize("layout", [{**WINDOWED, "top_p": 0.9}, KIVI_LIKE], ids=["residual-rescoring", "kivi"])
def test_full_precision_window_makes_a_chunk_attend_to_itself_exactly(layout):
    """With int4 values and int4 residual keys — or KIVI's int4 keys scored directly — a single-chunk
    prefill is full attention up to float16 rounding when the chunk reads its own rows from the
    copies; later chunks stay closer to it too."""
    model = tiny_model("llama")
    ids = random_ids(300, model.config.vocab_size, seed=8)
    with torch.no_grad():
        expected = model(ids).logits[0]
    errors = {}
    for window in (False, True):
        config = HCConfig(**{**layout, "full_precision_window": window}, calibration="context",
                          calibration_tokens=100, value_placement="host")
        with torch.no_grad():
            one_chunk = prefill(model, HCCache(model, config), ids, 300)
            cache = HCCache(model, config)
            chunked = torch.cat([prefill(model, cache, ids[:, i:i + 50], 50) for i in range(0, 300, 50)])
        errors[window] = (float((one_chunk[0] - expected[-1]).abs().max()),
                          float((chunked - expected[49::50]).abs().max()))
    assert errors[True][0] < errors[False][0] / 10, errors
    assert errors[True][1] < errors[False][1], errors


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("residual", [False, True])
def test_rescored_model_logits_equal_full(family, residual):
    model = tiny_model(family)
    ids = random_ids(400, model.config.vocab_size, seed=5)
    expected, tokens = run(model, DynamicCache(config=model.config), ids, steps=8, chunk_size=100)
    config = HCConfig(key_codec="vq", vq_centroids=32, vq_subvector_dim=2, calibration="context",
                      calibration_tokens=100, top_p=1.0, value_placement="host", rescore_residual=residual,
                      **EXACT_HOST)
    cache = HCCache(model, config)
    got, got_tokens = run(model, cache, ids, steps=8, chunk_size=100)
    assert all(layer.compressed for layer in cache.layers), "the codes must have been used"
    assert_close(got, expected)
    assert got_tokens == tokens


def test_exact_prefill_equals_full_attention_and_selection_starts_with_the_question():
    """The presets' ``prefill_top_p=1.0``: a document's chunks attend to every row exactly (a selection
    from sampled queries during prefill is what lost answers on unseen text), while a short step — a
    question, a decode step — selects."""
    model = tiny_model("llama")
    ids = random_ids(400, model.config.vocab_size, seed=7)
    with torch.no_grad():
        expected = prefill(model, DynamicCache(config=model.config), ids, 100)
    base = dict(key_codec="vq", vq_centroids=32, vq_subvector_dim=2, calibration="context", calibration_tokens=100,
                top_p=0.3, value_placement="host", **EXACT_HOST)
    logits = {}
    for prefill_top_p in (1.0, None):
        cache = HCCache(model, HCConfig(**base, prefill_top_p=prefill_top_p))
        with torch.no_grad():
            logits[prefill_top_p] = prefill(model, cache, ids, 100)
        assert all(layer.compressed for layer in cache.layers)
        if prefill_top_p == 1.0:
            assert all(layer.selectable_rows == 0 for layer in cache.layers), "no prefill step selected"
            with torch.no_grad():
                prefill(model, cache, torch.tensor([[5, 6, 7]]), 100)  # a question's few tokens select
            assert all(0 < layer.selected_rows < layer.selectable_rows for layer in cache.layers)
    assert_close(logits[1.0], expected)
    assert (logits[None] - expected).abs().max() > 1e-3, "selecting during prefill reads fewer rows"


@pytest.mark.parametrize("policy", ["hc", "mean", "h2o", "streaming", "window"])
def test_eviction_bounds_rows_and_keeps_sinks_and_recent(policy):
    model = tiny_model("llama")
    config = HCConfig(eviction=policy, budget=120, sink_tokens=4, recent_tokens=32, chunk_size=64)
    cache = HCCache(model, config)
    ids = random_ids(600, model.config.vocab_size, seed=6)
    prefill(model, cache, ids, chunk_size=64)
    slack = min(64, 120 // 8)
    for layer in cache.layers:
        positions = layer.positions.view()[0].tolist()
        assert len(layer) <= 120 + slack
        assert positions == sorted(positions)
        assert set(range(600 - 32, 600)) <= set(positions), "the recent window is never evicted"
        if policy != "window":
            assert {0, 1, 2, 3} <= set(positions), "sinks are never evicted"
        assert layer.seen == 600
    assert cache.get_seq_length() == 600


def test_eviction_reuses_memory():
    model = tiny_model("llama")
    cache = HCCache(model, HCConfig(eviction="streaming", budget=100, chunk_size=50))
    prefill(model, cache, random_ids(300, model.config.vocab_size), chunk_size=50)
    capacity = cache.layers[0].values.rows.capacity
    prefill(model, cache, random_ids(2000, model.config.vocab_size, seed=9), chunk_size=50)
    assert cache.layers[0].values.rows.capacity == capacity, "freed rows must be reused, not reallocated"


def test_h2o_keeps_the_rows_that_received_attention():
    layer = HCLayer(HCConfig(eviction="h2o", budget=40, sink_tokens=2, recent_tokens=8), 2, 8,
                    torch.device("cpu"), torch.float32)
    layer.update(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8))
    heavy = torch.zeros(2, 100)
    heavy[:, 10:40] = 1.0
    layer.observe(heavy, queries=1)
    layer.after_attention(None)
    kept = set(layer.positions.view()[0].tolist())
    assert set(range(10, 40)) <= kept


@pytest.mark.parametrize("policy, survivors", [("h2o", range(10, 40)), ("hc", range(10, 40)), ("mean", range(60, 90))])
def test_mean_policy_compares_rows_of_every_age(policy, survivors):
    """Older rows received more attention in total but less per query that saw them: cumulative
    scores keep them, the mean score keeps the younger rows that were attended more."""
    layer = HCLayer(HCConfig(eviction=policy, budget=40, sink_tokens=2, recent_tokens=8), 2, 8,
                    torch.device("cpu"), torch.float32)
    layer.update(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8))  # positions 0..99
    mass = torch.zeros(2, 100)
    mass[:, 10:40] = 20.0  # seen by 90..61 queries: at most 0.33 per query
    mass[:, 60:90] = 15.0  # seen by 40..11 queries: at least 0.375 per query
    layer.observe(mass, queries=1)
    layer.after_attention(None)
    assert set(layer.positions.view()[0].tolist()) == {0, 1, *survivors, *range(92, 100)}


def test_stats_bytes_are_the_tensors_real_sizes():
    model = tiny_model("llama")
    config = HCConfig.preset("hc-12.5", calibration="context", calibration_tokens=64)
    cache = HCCache(model, config)
    prefill(model, cache, random_ids(300, model.config.vocab_size))
    stats = cache.stats()
    device = host = 0
    for layer in cache.layers:
        codes = layer.key_codes.rows.view()
        device += codes.numel() * codes.element_size() + sum(
            t.numel() * t.element_size() for t in layer.key_codes.codec.state_dict().values())
        for store in (layer.exact_keys, layer.values):
            rows = store.rows.view()
            host += rows.numel() * rows.element_size() + sum(
                t.numel() * t.element_size() for t in store.codec.state_dict().values())
    assert stats.device_bytes == device and stats.host_bytes == host
    heads, dim, layers = 2, 16, 2
    assert stats.full_fp16_bytes == 300 * 2 * 2 * heads * dim * layers
    # 8-bit codes of 2-dim sub-vectors: a quarter of fp16 keys, an eighth of fp16 KV (plus codebooks)
    codes_only = 300 * heads * (dim // 2) * layers
    assert math.isclose(codes_only / stats.full_fp16_bytes, 0.125)
    assert stats.tokens_seen == 300 and stats.tokens_kept == 300 * layers


def test_kivi_codes_shrink_the_bytes():
    model = tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    ids = random_ids(200, model.config.vocab_size)
    sizes = {}
    for preset in ("full", "kivi-4", "kivi-2"):
        cache = HCCache(model, HCConfig.preset(preset, calibration="context", calibration_tokens=32,
                                               full_precision_window=False))  # the codes alone
        prefill(model, cache, ids)
        sizes[preset] = cache.stats().device_bytes + cache.stats().host_bytes
    assert sizes["kivi-4"] < sizes["full"] / 4 and sizes["kivi-2"] < sizes["kivi-4"] * 0.7


def test_where_a_step_attends_changes_nothing(monkeypatch):
    """A prefill chunk attends next to the model and a decode step where the values live (the GPU path's
    split); on a CPU both are the CPU, so the choice is forced both ways here to keep every transfer in
    that code path running: the logits and the rows each step selects must not move."""
    import hcmemory.attention as attention

    model = tiny_model("llama")
    ids = random_ids(300, model.config.vocab_size, seed=9)
    config = HCConfig.preset("hc-12.5", kernel="torch", calibration="context", calibration_tokens=100,
                             vq_centroids=16, top_p=0.5, recent_tokens=16)
    assert attention._compute_device(HCCache(model, config).layers[0], 100).type == "cpu"
    outputs = {}
    for forced in ("model", "values"):
        monkeypatch.setattr(attention, "_compute_device",
                            lambda layer, chunk, forced=forced: layer.device if forced == "model" else layer.value_device)
        cache = HCCache(model, config)
        logits, tokens = run(model, cache, ids, steps=6, chunk_size=100)
        outputs[forced] = logits, tokens, [layer.selected_rows for layer in cache.layers]
    assert outputs["model"][1:] == outputs["values"][1:] and all(outputs["model"][2])
    assert_close(outputs["model"][0], outputs["values"][0])
