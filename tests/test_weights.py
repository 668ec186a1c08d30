"""Weight formats (``load_model(weights=...)``): each loads, every preset decodes with it, ``full`` stays
exactly transformers' own cache under the same weights, and a bad choice is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig, HCContext, load_model, model_fingerprint
from hcmemory.config import PRESETS
from tests.test_cache_exact import run
from hcmemory.models.weights import (INT4_GROUP_SIZE, WEIGHT_FORMATS, Int4Linear, Int8Linear, check_weights,
                                     weights_dtype)

FORMATS = ("fp32", "bf16", "int8", "int4")
"""The CPU formats (fp16 is a GPU format; on a CPU it is only slower bf16)."""

TEXT = ("The vault passcode is 4471. The harbor master is Ada Lin, and the ferry leaves at noon. " * 5).strip()


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, object]]:
    return {weights: load_model(weights=weights, device="cpu") for weights in FORMATS}


@pytest.mark.parametrize("weights", FORMATS)
def test_format_loads_as_asked(models, weights):
    model, _ = models[weights]
    assert next(model.parameters()).dtype == weights_dtype(weights)
    linear = {"int8": Int8Linear, "int4": Int4Linear}.get(weights, nn.Linear)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))]
    assert layers and all(isinstance(m, linear) for m in layers)


def test_formats_have_their_own_fingerprints(models):
    """Checkpoints and codebook caches are keyed by the fingerprint: a state made under int8 weights must
    not load into the float32 model."""
    prints = {model_fingerprint(model) for model, _ in models.values()}
    assert len(prints) == len(FORMATS)


@pytest.mark.parametrize("weights", [w for w in FORMATS if w != "fp32"])  # fp32: the rest of the suite
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_decodes(models, weights, preset):
    model, tokenizer = models[weights]
    # codecs fitted on the context itself, in two k-means iterations: no per-format calibration run
    config = HCConfig.preset(preset, calibration="context", calibration_tokens=64, kmeans_iters=2)
    ctx = HCContext(model, tokenizer, config)
    ctx.append(TEXT)
    generation = ctx.generate(ctx.token_ids, max_new_tokens=4, commit=False)
    generation.text()
    assert generation.info.completion_tokens >= 1
    assert {layer.dtype for layer in ctx.cache.layers} == {weights_dtype(weights)}


@pytest.mark.parametrize("weights", FORMATS)
def test_full_matches_dynamic_cache_under_the_same_weights(models, weights):
    model, tokenizer = models[weights]
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    expected, expected_tokens = run(model, DynamicCache(config=model.config), ids, 8, ids.shape[1])
    actual, tokens = run(model, HCCache(model, "full"), ids, 8, ids.shape[1])
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= (1e-4 if weights == "fp32" else 1e-2), f"max relative error {err:.2e}"
    assert tokens == expected_tokens


@pytest.mark.parametrize("kind, tolerance", [(Int8Linear, 0.02), (Int4Linear, 0.25)])
def test_quantised_linear_tracks_the_float_one(kind, tolerance):
    torch.manual_seed(0)
    linear = nn.Linear(4 * INT4_GROUP_SIZE, 96, bias=True)
    x = torch.randn(3, 5, linear.in_features)
    expected = linear(x)
    actual = kind(linear)(x)
    assert actual.shape == expected.shape
    assert (actual - expected).norm() / expected.norm() <= tolerance


def test_bad_weights_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match="int3.*" + ", ".join(WEIGHT_FORMATS)):
        load_model(weights="int3")
    with pytest.raises(ValueError, match="contradicts"):
        load_model(weights="bf16", dtype=torch.float32)
    with pytest.raises(ValueError, match="contradicts"):
        load_model(weights="int8", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CPU weight-only kernels.*fp32, bf16, fp16"):
        check_weights("int4", torch.device("cuda"))
