"""Regression tests for the hardening issue: no silent wrong answers, state that stays consistent.

Each test reproduces a failure of the earlier code (a wrong result without an error, a corrupted
or inconsistent state) and checks that it now computes the right thing or refuses loudly.
"""

from __future__ import annotations

import gc
import json
import logging
import threading

import pytest
import safetensors.torch
import torch
from transformers import DynamicCache

from hcmemory import ContextBusyError, HCCache, HCConfig, HCContext, cache_kwarg
from hcmemory.calibration import codebook_path
from hcmemory.checkpoint import OLDEST_READABLE, CheckpointError
from hcmemory.glue import hc_attention_forward
from hcmemory.layer import HCLayer
from hcmemory.pool import ContextPool
from hcmemory.prefill import prefill
from hcmemory.rows import RowBuffer
from hcmemory.stores import ContextStore

from .conftest import tiny_model
from .test_cache_exact import assert_close, random_ids, run
from .test_store import DOC, PROBE, same_stats

QUESTION = "What is the vault code at the harbor office?"


def snapshot(ctx: HCContext) -> tuple:
    """What must not change: tokens, stats, and the next-token distribution."""
    return list(ctx.token_ids), ctx.stats(), ctx.next_logits(PROBE)


def assert_unchanged(ctx: HCContext, before: tuple) -> None:
    ids, stats, logits = before
    assert ctx.token_ids == ids
    assert same_stats(ctx.stats(), stats)
    torch.testing.assert_close(ctx.next_logits(PROBE), logits, atol=1e-5, rtol=0)


# --- 1. silent wrong answers ----------------------------------------------------------------------


@pytest.mark.core
def test_switching_the_model_away_from_hcattention_refuses_instead_of_attending_to_the_chunk():
    model = tiny_model("llama")
    cache = HCCache(model)
    ids = random_ids(40, model.config.vocab_size)
    prefill(model, cache, ids)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="hcattention"), torch.no_grad():
            model(input_ids=ids[:, :1], use_cache=True, **cache_kwarg(model, cache))
    finally:
        model.set_attn_implementation("hcattention")


@pytest.mark.core
def test_a_layer_updated_outside_a_forward_is_not_taken_by_an_unrelated_forward():
    model = tiny_model("llama")
    ids = random_ids(30, model.config.vocab_size, seed=3)
    reference, _ = run(model, DynamicCache(config=model.config), ids, steps=2, chunk_size=30)
    cache = HCCache(model)
    keys = torch.randn(1, 2, 5, 16)
    cache.update(keys, torch.randn(1, 2, 5, 16), 0)  # nobody's attention takes this layer
    got, _ = run(model, DynamicCache(config=model.config), ids, steps=2, chunk_size=30)
    assert_close(got, reference, rel=1e-6)


@pytest.mark.core
def test_attention_given_other_keys_than_update_returned_raises():
    model = tiny_model("llama")
    layer = HCCache(model).layers[0]
    keys = torch.randn(1, 2, 3, 16)
    layer.update(keys, torch.randn(1, 2, 3, 16))
    other = keys.clone()
    with pytest.raises(RuntimeError, match="not the ones"):
        hc_attention_forward(model.model.layers[0].self_attn, torch.randn(1, 4, 3, 16), other, other, None,
                             hc_layer=layer)


@pytest.mark.core
def test_a_layer_whose_attention_never_ran_stops_the_forward():
    """What a model that changed the keys after the cache update (or another attention function)
    looks like on versions that hand layers over through the thread: the next layer refuses."""
    cache = HCCache(tiny_model("llama"))
    keys = torch.randn(1, 2, 3, 16)
    cache.update(keys, torch.randn(1, 2, 3, 16), 0)
    with pytest.raises(RuntimeError, match="never ran through hcattention"):
        cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 1)


@pytest.mark.core
def test_attention_wrappers_that_pass_dropout_positionally_still_work(monkeypatch):
    """kvpress wraps every registered attention function as ``f(module, q, k, v, mask, dropout, **kw)``."""
    from transformers import AttentionInterface

    model = tiny_model("llama")
    HCCache(model)  # registers hcattention
    inner = AttentionInterface._global_mapping["hcattention"]
    monkeypatch.setitem(AttentionInterface._global_mapping, "hcattention",
                        lambda module, q, k, v, mask, dropout, **kw: inner(module, q, k, v, mask, dropout, **kw))
    ids = random_ids(40, model.config.vocab_size)
    reference, _ = run(model, DynamicCache(config=model.config), ids, steps=4, chunk_size=40)
    got, _ = run(model, HCCache(model, HCConfig(eviction="h2o", budget=200)), ids, steps=4, chunk_size=16)
    assert_close(got, reference)


SLIDING = [("mistral", dict(sliding_window=16)), ("phi3", dict(sliding_window=16)),
           ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1))]


@pytest.mark.core
@pytest.mark.parametrize("family, overrides", SLIDING, ids=[f for f, _ in SLIDING])
@pytest.mark.parametrize("config", [
    HCConfig(),
    HCConfig(eviction="h2o", budget=500),  # explicit softmax path
    HCConfig.preset("hc-12.5", calibration="context", calibration_tokens=20, top_p=1.0, sink_tokens=2,
                    recent_tokens=4, rescore_keys="none", value_codec="none", vq_centroids=16),
], ids=["full", "h2o", "hc-rescored"])
@pytest.mark.parametrize("chunk_size", [64, 10])
def test_sliding_window_models_match_transformers(family, overrides, config, chunk_size):
    model = tiny_model(family, **overrides)
    ids = random_ids(64, model.config.vocab_size)
    reference, tokens = run(model, DynamicCache(config=model.config), ids, steps=16, chunk_size=64)
    cache = HCCache(model, config)
    got, got_tokens = run(model, cache, ids, steps=16, chunk_size=chunk_size)
    assert_close(got, reference)
    assert got_tokens == tokens
    windowed = [layer for layer in cache.layers if len(layer) < cache.seen]
    assert windowed and all(len(layer) < 16 for layer in windowed), "rows outside the window are dropped"


@pytest.mark.core
def test_positions_past_the_trained_window_warn_once(caplog):
    model = tiny_model("llama", max_position_embeddings=64)
    cache = HCCache(model, HCConfig(eviction="streaming", budget=40, sink_tokens=4, recent_tokens=16))
    with caplog.at_level(logging.WARNING, logger="hcmemory.cache"):
        prefill(model, cache, random_ids(50, 256))
        assert not caplog.records
        prefill(model, cache, random_ids(50, 256, seed=2), chunk_size=10)
        prefill(model, cache, random_ids(50, 256, seed=3))
    warnings = [r for r in caplog.records if "max_position_embeddings=64" in r.getMessage()]
    assert len(warnings) == 1 and "bounded presets" in warnings[0].getMessage()


# --- 2. state that stays consistent --------------------------------------------------------------


@pytest.fixture()
def doc_context(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    return ctx


@pytest.mark.parametrize("call", ["append", "fork", "save", "reset", "stats", "ask"])
def test_calls_from_inside_a_stream_loop_raise_and_change_nothing(doc_context, tmp_path, call):
    ctx = doc_context
    before = snapshot(ctx)
    actions = {"append": lambda: ctx.append(" More text."), "fork": ctx.fork, "save": lambda: ctx.save(tmp_path / "x"),
               "reset": ctx.reset, "stats": ctx.stats, "ask": lambda: ctx.ask("Again?")}
    with pytest.raises(ContextBusyError, match="stream"):
        for _ in ctx.stream(QUESTION, commit=True, max_new_tokens=8):
            actions[call]()
    assert not (tmp_path / "x").exists()
    assert_unchanged(ctx, before)


def test_an_abandoned_stream_releases_the_context(doc_context):
    ctx = doc_context
    before = snapshot(ctx)
    stream = ctx.stream(QUESTION, max_new_tokens=8)
    next(stream)
    del stream
    gc.collect()
    assert ctx.append(" The ferry is late.") > 0  # would block forever if the stream still held the context
    stream = ctx.stream(QUESTION, max_new_tokens=8)
    next(stream)
    closer = threading.Thread(target=stream.close)  # e.g. a thread pool running LangChain's async stream
    closer.start()
    closer.join(timeout=30)
    done = threading.Event()
    threading.Thread(target=lambda: (ctx.stats(), done.set())).start()
    assert done.wait(timeout=30), "a stream closed by another thread must release the context"
    assert len(ctx) > len(before[0])


def test_a_fork_of_a_context_evicts_on_its_own(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, HCConfig.preset("streaming", budget=200, chunk_size=64))
    ctx.append(DOC)
    branch = ctx.fork()
    branch.append(DOC * 6)
    assert all(len(layer) <= 200 + 25 for layer in branch.cache.layers)


@pytest.mark.core
def test_fork_and_state_refuse_an_open_transaction():
    model = tiny_model("llama")
    cache = HCCache(model)
    prefill(model, cache, random_ids(20, 256))
    with cache.transaction(commit=False):
        prefill(model, cache, random_ids(5, 256, seed=2))
        with pytest.raises(RuntimeError, match="transaction"):
            cache.fork()
        with pytest.raises(RuntimeError, match="transaction"):
            cache.state()
        with pytest.raises(RuntimeError, match="nest"):
            with cache.transaction():
                pass
    assert cache.seen == 20


@pytest.mark.core
@pytest.mark.parametrize("failing", ["encode", "reserve"])
def test_a_failed_update_leaves_every_store_as_it_was(monkeypatch, failing):
    config = HCConfig.preset("hc-12.5", calibration="context", calibration_tokens=8, eviction="h2o", budget=0.5)
    layer = HCLayer(config, 2, 16, torch.device("cpu"), torch.float32)
    layer.update(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16))
    assert layer.calibrated and layer.exact_keys is not None and layer.mass is not None
    before = {name: store.codes().clone() if hasattr(store, "codes") else store.view().clone()
              for name, store in layer._all_stores().items()}
    if failing == "encode":
        monkeypatch.setattr(layer.values.codec, "encode", lambda rows: (_ for _ in ()).throw(ValueError("boom")))
    else:
        monkeypatch.setattr(layer.exact_keys, "reserve", lambda codes: (_ for _ in ()).throw(MemoryError("boom")))
    with pytest.raises((ValueError, MemoryError), match="boom"):
        layer.update(torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16))
    assert layer.seen == 20
    for name, store in layer._all_stores().items():
        now = store.codes() if hasattr(store, "codes") else store.view()
        assert torch.equal(now, before[name]), name


def test_generate_continues_from_a_context_cache(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    ids = torch.tensor([ctx.token_ids + tokenizer(" The vault", add_special_tokens=False).input_ids])
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=tokenizer.eos_token_id)
    expected = model.generate(ids, **cache_kwarg(model, DynamicCache(config=model.config)), **kwargs)
    got = model.generate(ids, **cache_kwarg(model, ctx.cache), **kwargs)  # under no_grad, after inference-mode use
    assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="used directly"):
        ctx.ask(QUESTION)


def _peak_rows(monkeypatch) -> list[int]:
    peaks = []
    original = HCLayer.after_attention

    def recording(self, window):
        peaks.append(len(self))
        original(self, window)

    monkeypatch.setattr(HCLayer, "after_attention", recording)
    return peaks


def test_bounded_is_bounded_inside_one_append_and_rolls_back_exactly(smollm2, monkeypatch):
    model, tokenizer = smollm2
    config = HCConfig.preset("hc-12.5-bounded", budget=256, chunk_size=128)
    ctx = HCContext(model, tokenizer, config)
    ctx.append(DOC * 4)
    before = snapshot(ctx)
    peaks = _peak_rows(monkeypatch)
    long_text = (DOC * 20)[:6000]
    calls, forward = {"n": 0}, model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        ctx.append(long_text)  # eviction ran inside the failed append...
    monkeypatch.setattr(model, "forward", forward)
    assert max(peaks) <= 256 + 32 + 128, "evicted per chunk, not at the end of the append"
    assert_unchanged(ctx, before)  # ...and the rollback brought back exactly what it dropped
    ctx.append(long_text)
    assert max(peaks) <= 256 + 32 + 128
    stats = ctx.stats()
    assert stats.tokens_kept <= (256 + 32) * stats.layers
    capacity = max(layer.values.rows.capacity for layer in ctx.cache.layers)
    assert capacity <= 2 * (256 + 32 + 128 + config.store_growth), "capacity beyond the budget is given back"
    assert stats.reserved_bytes >= stats.host_bytes + stats.device_bytes


def test_asking_a_bounded_context_leaves_it_exactly_as_it_was(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, HCConfig.preset("hc-12.5-bounded", budget=128, chunk_size=64))
    ctx.append(DOC * 4)
    before = snapshot(ctx)
    ctx.ask(QUESTION + " Answer in one long sentence.", max_new_tokens=48)
    assert_unchanged(ctx, before)


def _recorded_rows(monkeypatch) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Every ``(key, value)`` each layer was given, by position (what the window's copies must hold)."""
    given: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    update = HCLayer.update

    def recording(self, keys, values, *args, **kwargs):
        rows = given.setdefault(self.index, {})
        for i in range(keys.shape[2]):
            rows[self.seen + i] = (keys[0, :, i].clone(), values[0, :, i].clone())
        return update(self, keys, values, *args, **kwargs)

    monkeypatch.setattr(HCLayer, "update", recording)
    return given


def _assert_window_copies(cache: HCCache, given, expected_positions) -> None:
    for layer in cache.layers:
        window = layer.window
        positions = layer.positions.view()[0][window.rows].tolist()
        assert positions == expected_positions(layer), (layer.index, positions)
        for j, position in enumerate(positions):
            key, value = given[layer.index][position]
            assert torch.equal(window.keys[:, j], key.half()) and torch.equal(window.values[:, j], value.half())


def test_window_copies_follow_eviction_rollback_crop_and_forks(monkeypatch):
    """``full_precision_window`` copies stay the sinks' and the last rows' own keys and values through
    eviction (rows renumbered), a rolled-back transaction (exactly as before), a crop and a fork."""
    model = tiny_model("llama")
    config = HCConfig(key_codec="int4", value_codec="int4", calibration="context", calibration_tokens=64,
                      eviction="h2o", budget=120, sink_tokens=4, recent_tokens=16, chunk_size=32, top_p=0.9,
                      full_precision_window=True)
    given = _recorded_rows(monkeypatch)
    cache = HCCache(model, config)
    with torch.no_grad():
        prefill(model, cache, random_ids(300, model.config.vocab_size, seed=9), 32)
    edges = lambda layer: [0, 1, 2, 3] + list(range(layer.seen - 16, layer.seen))
    assert all(len(layer) < 300 for layer in cache.layers), "eviction must have run"
    _assert_window_copies(cache, given, edges)

    def state():
        return [(layer.window, *layer.exact_rows(0, len(layer))) for layer in cache.layers]

    before = state()
    with torch.no_grad(), cache.transaction(commit=False):
        prefill(model, cache, random_ids(40, model.config.vocab_size, seed=10), 32)
    for (window, keys, values), (window_after, keys_after, values_after) in zip(before, state()):
        assert window_after is window and torch.equal(keys_after, keys) and torch.equal(values_after, values)
    twin = cache.fork()
    with torch.no_grad():
        prefill(model, twin, random_ids(20, model.config.vocab_size, seed=11), 32)
    assert all(a is b for a, b in zip((s[0] for s in before), (layer.window for layer in cache.layers)))
    cache.crop(290)
    _assert_window_copies(cache, given, lambda layer: [0, 1, 2, 3] + list(range(284, 290)))


def test_context_calibration_waits_for_committed_tokens(smollm2):
    model, tokenizer = smollm2
    config = HCConfig.preset("hc-12.5", calibration="context", calibration_tokens=200)
    ctx = HCContext(model, tokenizer, config)
    ctx.append("Hi.")
    ctx.ask("What did I say? Please answer with a long and detailed explanation of everything.",
            max_new_tokens=40)
    layers = ctx.cache.layers
    assert not any(layer.calibrated for layer in layers)
    assert layers[0].codecs.keys.needs_fit, "needs_fit tells the truth"
    ctx.append(DOC * 6)
    assert len(ctx) >= 200 and all(layer.calibrated and layer.compressed for layer in layers)
    # the codebook describes the committed keys only: same as a context that never saw the question
    again = HCContext(model, tokenizer, config)
    again.append("Hi.")
    again.append(DOC * 6)
    for a, b in zip(layers, again.cache.layers):
        assert torch.equal(a.codecs.keys.state_dict()["codebook"], b.codecs.keys.state_dict()["codebook"])


def test_forks_calibrate_on_their_own_keys(smollm2):
    model, tokenizer = smollm2
    config = HCConfig.preset("kivi-4", calibration="context", calibration_tokens=100)
    ctx = HCContext(model, tokenizer, config)
    ctx.append("Hi.")
    branch = ctx.fork()
    assert branch.cache.layers[0].codecs.keys.needs_fit
    branch.append("Completely different words about gardening, soil, seeds and the weather in spring. " * 6)
    ctx.append(DOC * 2)
    a, b = ctx.cache.layers[3].codecs.keys.state_dict(), branch.cache.layers[3].codecs.keys.state_dict()
    assert not torch.equal(a["shift"], b["shift"])


# --- checkpoints: consistent, not just intact -----------------------------------------------------


def _edit_file(path, tmp_path, change_header=None, change_tensors=None):
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()["hcmemory"])
    if change_tensors:
        change_tensors(tensors)
    if change_header:
        change_header(header)
    from hcmemory.checkpoint import sha256, tensor_bytes

    header["tensors"] = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                "sha256": sha256(tensor_bytes(t))} for name, t in tensors.items()}
    out = tmp_path / "edited.hcm"
    safetensors.torch.save_file(tensors, out, metadata={"hcmemory": json.dumps(header)})
    return out


def _set_seen(header, seen):
    for layer in header["layers"]:
        layer["seen"] = seen


def _shuffle_positions(tensors):
    positions = tensors["0.rows.positions"]
    tensors["0.rows.positions"] = positions.flip(-1).contiguous()


INCONSISTENT = {
    "codebook missing": (None, lambda t: t.pop("0.codec.keys.codebook")),
    "huge seen": (lambda h: _set_seen(h, 10**6), None),
    "token ids vs seen": (lambda h: h["token_ids"].pop(), None),
    "prefilled beyond tokens": (lambda h: h.update(tokens_prefilled=10**6), None),
    "positions out of order": (None, _shuffle_positions),
    "codes beyond the codebook": (None, lambda t: t["1.rows.key_codes"].fill_(255)),
    "config field missing": (lambda h: h["config"].pop("top_p"), None),
    "older format": (lambda h: h.update(format_version=OLDEST_READABLE - 1), None),
    "rows of another shape": (None, lambda t: t.update({"2.rows.values": t["2.rows.values"][:, :, :32].contiguous()})),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_an_inconsistent_checkpoint_is_refused(smollm2, tmp_path, case):
    model, tokenizer = smollm2
    config = HCConfig.preset("hc-12.5", vq_centroids=64)
    ctx = HCContext(model, tokenizer, config)
    ctx.append(DOC * 2)
    path = tmp_path / "ctx.hcm"
    ctx.save(path)
    assert HCContext.load(path, model, tokenizer).token_ids == ctx.token_ids
    change_header, change_tensors = INCONSISTENT[case]
    edited = _edit_file(path, tmp_path, change_header, change_tensors)
    with pytest.raises(CheckpointError):
        HCContext.load(edited, model, tokenizer)


WINDOW_DAMAGE = {
    "a row the next step reads from its codes": lambda t: t["0.window.rows"].add_(-t["0.window.rows"][-1] // 2),
    "copies of another dtype": lambda t: t.update({"1.window.keys": t["1.window.keys"].float()}),
    "copies without their rows": lambda t: t.pop("2.window.rows"),
}


def test_window_copies_round_trip_and_inconsistent_ones_are_refused(smollm2, tmp_path):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, HCConfig.preset("compact", vq_centroids=64))
    ctx.append(DOC * 2)
    path = tmp_path / "ctx.hcm"
    ctx.save(path)
    loaded = HCContext.load(path, model, tokenizer)
    for a, b in zip(loaded.cache.layers, ctx.cache.layers):
        assert len(a.window) == 4 + 64 and all(torch.equal(x, y) for x, y in zip(
            (a.window.rows, a.window.keys, a.window.values), (b.window.rows, b.window.keys, b.window.values)))
    torch.testing.assert_close(loaded.next_logits(PROBE), ctx.next_logits(PROBE), atol=1e-5, rtol=0)
    for damage in WINDOW_DAMAGE.values():
        with pytest.raises(CheckpointError, match="window"):
            HCContext.load(_edit_file(path, tmp_path, None, damage), model, tokenizer)


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_an_older_checkpoint_loads_with_the_configuration_it_ran(smollm2, tmp_path, version):
    """Format 3 added ``rescore_residual``, format 4 ``quant_group_size``, format 5 ``residual_symmetric``
    and ``quant_rotation``, format 6 ``full_precision_window``; an older file lacks them and ran with
    ``rescore_residual=False``, groups of 32, plain rows and no window copies — and rows of other groups do
    not fit it."""
    model, tokenizer = smollm2

    def as_older(header):
        header.update(format_version=version)
        for field, added in (("rescore_residual", 3), ("quant_group_size", 4), ("residual_symmetric", 5),
                             ("quant_rotation", 5), ("full_precision_window", 6)):
            if added > version:
                header["config"].pop(field)

    for group in (32, 64):
        ctx = HCContext(model, tokenizer, HCConfig.preset("compact", vq_centroids=64, rescore_residual=False,
                                                          residual_symmetric=False, quant_rotation=False,
                                                          full_precision_window=False, quant_group_size=group))
        ctx.append(DOC)
        path = tmp_path / f"ctx-{group}.hcm"
        ctx.save(path)
        edited = _edit_file(path, tmp_path, as_older, None)
        if group == 32 or version >= 4:  # format 4 stores the group size itself
            loaded = HCContext.load(edited, model, tokenizer)
            assert loaded.config == ctx.config and loaded.token_ids == ctx.token_ids
        else:
            with pytest.raises(CheckpointError, match="does not fit its own header"):
                HCContext.load(edited, model, tokenizer)


def test_a_saved_state_is_a_copy_taken_under_the_lock(doc_context):
    state = doc_context.to_state()
    live = {t.untyped_storage().data_ptr() for layer in doc_context.cache.layers
            for t in (layer.values.rows.data, layer.key_codes.rows.data, layer.positions.data)}
    assert not {t.untyped_storage().data_ptr() for t in state.tensors.values()} & live
    frozen = {name: t.clone() for name, t in state.tensors.items()}
    doc_context.append(" Later text that must not leak into the saved state.")
    assert all(torch.equal(state.tensors[name], frozen[name]) for name in frozen)


def test_the_pool_and_a_stream_do_not_deadlock(smollm2, tmp_path):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "store.sqlite") as store:
        pool = ContextPool(model, tokenizer, store, max_host_bytes=0, config="full")
        busy = pool.get("busy")
        busy.append(DOC)
        streaming, other_done, errors = threading.Event(), threading.Event(), []

        def streamer():
            try:
                for _ in busy.stream(QUESTION, max_new_tokens=6):
                    streaming.set()
                    assert other_done.wait(timeout=60)
                    pool.get("from-inside")  # takes the pool while holding the context
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def other():
            assert streaming.wait(timeout=60)
            pool.get("other")  # wants to spill "busy", which is held by the stream
            other_done.set()

        threads = [threading.Thread(target=streamer), threading.Thread(target=other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
        pool.close()


# --- 3. placement -------------------------------------------------------------------------------


@pytest.mark.core
@pytest.mark.parametrize("placement", ["host", "device"])
def test_codebooks_from_the_disk_cache_go_where_the_model_is(tmp_path, monkeypatch, placement):
    """On a GPU the codes, codebooks (and device-placed values) live on the model's device and the
    exact keys and host values in CPU memory; "meta" stands in for the accelerator here."""
    monkeypatch.setenv("HCMEMORY_HOME", str(tmp_path))
    model = tiny_model("llama").to("meta")
    config = HCConfig.preset("hc-12.5", value_placement=placement)
    books = {f"{i}.keys.codebook": torch.randn(2, 256, 2).half() for i in range(2)}
    path = codebook_path(model, config)
    path.parent.mkdir(parents=True)
    safetensors.torch.save_file(books, path)  # what an earlier process calibrated, on the CPU
    cache = HCCache.for_model(model, config)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    for layer in cache.layers:
        assert layer.key_codes.codec.state_dict()["codebook"].device == meta
        assert layer.key_codes.device == meta and layer.exact_keys.device == cpu
        assert layer.values.device == (cpu if placement == "host" else meta)
        assert layer.positions.device == cpu
        assert layer.exact_keys.codec.device == cpu


# --- 4. transformers -------------------------------------------------------------------------------


@pytest.mark.core
def test_the_cache_argument_follows_the_installed_transformers():
    import inspect

    model = tiny_model("llama")
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert list(cache_kwarg(model, None)) == [expected]


@pytest.mark.core
def test_a_chunk_mask_built_in_inference_mode_serves_a_forward_that_autograd_records():
    """A chunk's causal mask is built once and shared by later calls of the same shape (autograd
    refuses to save an inference tensor for backward)."""
    model = tiny_model("llama")
    ids = random_ids(32, model.config.vocab_size)
    for mode in (torch.inference_mode, torch.enable_grad):
        cache = HCCache(model, HCConfig())
        with mode():
            model(input_ids=ids[:, :16], use_cache=True, **cache_kwarg(model, cache))
            logits = model(input_ids=ids[:, 16:], use_cache=True, **cache_kwarg(model, cache)).logits
    assert logits.requires_grad


# --- memory accounting --------------------------------------------------------------------------


@pytest.mark.core
def test_row_buffers_are_ordinary_tensors_even_when_filled_in_inference_mode():
    buffer = RowBuffer(2, (4,), torch.float32, "cpu", growth=8)
    with torch.inference_mode():
        buffer.append(torch.randn(2, 20, 4))
    assert not buffer.data.is_inference()
    with torch.no_grad():
        buffer.append(torch.randn(2, 3, 4))
    assert len(buffer) == 23
