"""The identity configuration is exactly transformers' own cache: same logits, same generations."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig, cache_kwarg
from hcmemory.prefill import prefill

from .conftest import tiny_model

pytestmark = pytest.mark.core


@torch.inference_mode()
def run(model, cache, ids: torch.Tensor, steps: int, chunk_size: int) -> tuple[torch.Tensor, list[int]]:
    """Chunked prefill then ``steps`` greedy decode steps; returns every step's logits and the tokens."""
    logits = prefill(model, cache, ids, chunk_size=chunk_size)
    all_logits, tokens = [logits], []
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        logits = model(input_ids=token, use_cache=True, **cache_kwarg(model, cache)).logits[:, -1]
        all_logits.append(logits)
    return torch.cat(all_logits), tokens


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= rel, f"max relative error {err:.2e} > {rel:.0e}"


def random_ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma", "gemma3"])
@pytest.mark.parametrize("placement", ["device", "host"])
def test_identity_matches_dynamic_cache_on_tiny_models(family, placement):
    model = tiny_model(family)
    ids = random_ids(300, model.config.vocab_size)
    ref_logits, ref_tokens = run(model, DynamicCache(config=model.config), ids, steps=32, chunk_size=300)
    cache = HCCache(model, HCConfig(value_placement=placement))
    logits, tokens = run(model, cache, ids, steps=32, chunk_size=300)
    assert_close(logits, ref_logits)
    assert tokens == ref_tokens
    assert cache.get_seq_length() == 300 + 32


@pytest.mark.parametrize("chunk_size", [64, 100, 299])
def test_chunked_prefill_equals_one_shot(chunk_size):
    model = tiny_model("qwen2")
    ids = random_ids(300, model.config.vocab_size, seed=2)
    one_shot, _ = run(model, HCCache(model), ids, steps=4, chunk_size=300)
    chunked, _ = run(model, HCCache(model), ids, steps=4, chunk_size=chunk_size)
    assert_close(chunked, one_shot)


def test_generate_with_hccache_matches_dynamic_cache():
    model = tiny_model("llama")
    ids = random_ids(50, model.config.vocab_size, seed=3)
    kwargs = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    expected = model.generate(ids, **cache_kwarg(model, DynamicCache(config=model.config)), **kwargs)
    got = model.generate(ids, **cache_kwarg(model, HCCache(model)), **kwargs)
    assert torch.equal(got, expected)


def test_model_still_works_with_other_caches_after_switch():
    """Switching the model to hcattention must not change what it computes with DynamicCache."""
    model = tiny_model("mistral")
    ids = random_ids(80, model.config.vocab_size, seed=4)
    before, _ = run(model, DynamicCache(config=model.config), ids, steps=3, chunk_size=40)
    HCCache(model)
    after, _ = run(model, DynamicCache(config=model.config), ids, steps=3, chunk_size=40)
    assert_close(after, before)


def test_identity_matches_dynamic_cache_on_smollm2(smollm2):
    model, tokenizer = smollm2
    text = "The lighthouse keeper wrote the passcode 48213 in the log. " * 20 + "What was the passcode?"
    ids = tokenizer(text, return_tensors="pt").input_ids
    ref_logits, ref_tokens = run(model, DynamicCache(config=model.config), ids, steps=32, chunk_size=ids.shape[1])
    logits, tokens = run(model, HCCache(model, HCConfig.preset("full", value_placement="host")), ids, steps=32,
                         chunk_size=128)
    assert_close(logits, ref_logits)
    assert tokens == ref_tokens


def test_stores_grow_by_amortized_chunks():
    model = tiny_model("llama")
    cache = HCCache(model, HCConfig(store_growth=64))
    ids = random_ids(10, model.config.vocab_size)
    prefill(model, cache, ids)
    reallocations, data = 0, cache.layers[0].values.rows.data
    with torch.inference_mode():
        for _ in range(200):
            model(input_ids=ids[:, :1], use_cache=True, **cache_kwarg(model, cache))
            if cache.layers[0].values.rows.data.data_ptr() != data.data_ptr():
                reallocations, data = reallocations + 1, cache.layers[0].values.rows.data
    assert len(cache.layers[0]) == 210
    assert reallocations <= 4, "stores must grow geometrically, not per step"


def test_gqa_is_not_materialized():
    model = tiny_model("llama")
    cache = HCCache(model)
    prefill(model, cache, random_ids(20, model.config.vocab_size))
    layer = cache.layers[0]
    assert layer.values.rows.view().shape[0] == model.config.num_key_value_heads
