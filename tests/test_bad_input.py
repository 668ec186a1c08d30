"""Bad input gets a clear TypeError/ValueError naming the argument, raised at the API boundary,
and changes nothing already stored."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from hcmemory import ContextPool, ContextStore, HCCache, HCConfig, HCContext, load_model

from .conftest import tiny_model
from .test_store import DOC, rows


@pytest.fixture()
def world(smollm2, tmp_path):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full", context_id="kept")
    ctx.append(DOC)
    store = ContextStore(tmp_path / "store.sqlite")
    store.save(ctx)
    pool = ContextPool(model, tokenizer, store, max_host_bytes=10**9, config="full")
    yield dict(model=model, tokenizer=tokenizer, ctx=ctx, store=store, pool=pool, tmp=tmp_path)
    store.close()


def _calls(w):
    m, t, ctx, store, pool, tmp = w["model"], w["tokenizer"], w["ctx"], w["store"], w["pool"], w["tmp"]
    return {
        # configs, models, tokenizers
        "config int": (lambda: HCContext(m, t, 123), TypeError, "config must be a preset name"),
        "config unknown field": (lambda: HCContext(m, t, {"colour": "red"}), ValueError, "colour"),
        "config unknown preset": (lambda: HCCache(m, "hc-3"), ValueError, "available presets"),
        "cache config float": (lambda: HCCache(m, 0.125), TypeError, "config must be"),
        "model of the wrong type": (lambda: HCContext("SmolLM2", t), TypeError, "model must be a transformers"),
        "tokenizer of the wrong type": (lambda: HCContext(m, "tok"), TypeError, "tokenizer must be"),
        "context_id empty": (lambda: HCContext(m, t, context_id=""), ValueError, "context_id"),
        "context_id int": (lambda: HCContext(m, t, context_id=7), TypeError, "context_id"),
        "fork id empty": (lambda: ctx.fork(""), ValueError, "context_id"),
        # append / ask
        "append None": (lambda: ctx.append(None), TypeError, "append"),
        "append int": (lambda: ctx.append(123), TypeError, "append"),
        "append bytes": (lambda: ctx.append(b"bytes"), TypeError, "bytes"),
        "append bytearray": (lambda: ctx.append(bytearray(b"ab")), TypeError, "bytes"),
        "append mixed list": (lambda: ctx.append(["a", 1]), TypeError, "str"),
        "append ids outside vocab": (lambda: ctx.append([1, 10**9]), ValueError, "vocabulary"),
        "ask None": (lambda: ctx.ask(None), TypeError, "string"),
        "ask blank": (lambda: ctx.ask("  "), ValueError, "empty"),
        "max_new_tokens str": (lambda: ctx.ask("Q?", max_new_tokens="5"), TypeError, "max_new_tokens"),
        "max_new_tokens float": (lambda: ctx.ask("Q?", max_new_tokens=2.0), TypeError, "max_new_tokens"),
        "max_new_tokens bool": (lambda: ctx.ask("Q?", max_new_tokens=True), TypeError, "max_new_tokens"),
        "max_new_tokens 0": (lambda: ctx.ask("Q?", max_new_tokens=0), ValueError, "max_new_tokens"),
        "temperature nan": (lambda: ctx.ask("Q?", temperature=float("nan")), ValueError, "temperature"),
        "temperature inf": (lambda: ctx.ask("Q?", temperature=float("inf")), ValueError, "temperature"),
        "temperature str": (lambda: ctx.ask("Q?", temperature="hot"), TypeError, "temperature"),
        "stop plain string": (lambda: ctx.ask("Q?", stop="\n"), TypeError, "list of strings"),
        "stop with empty": (lambda: ctx.ask("Q?", stop=["", "x"]), ValueError, "empty string"),
        "stop with int": (lambda: ctx.ask("Q?", stop=[1]), TypeError, "stop"),
        "stream bad args fail at the call": (lambda: ctx.stream("Q?", max_new_tokens=-1), ValueError,
                                             "max_new_tokens"),
        # files
        "load a directory": (lambda: HCContext.load(tmp, m, t), ValueError, "directory"),
        "load a missing file": (lambda: HCContext.load(tmp / "missing.hcm", m, t), FileNotFoundError, "missing"),
        "save to a non-path": (lambda: ctx.save(3), TypeError, "path"),
        "store on a directory": (lambda: ContextStore(tmp), ValueError, "directory"),
        "store path int": (lambda: ContextStore(5), TypeError, "path"),
        # store and pool ids
        "store save non-context": (lambda: store.save("kept"), TypeError, "HCContext"),
        "store save empty id": (lambda: store.save(ctx, context_id=""), ValueError, "context_id"),
        "store save int tag": (lambda: store.save(ctx, tag=5), TypeError, "tag"),
        "store load int id": (lambda: store.load(5, m, t), TypeError, "context_id"),
        "store exists None": (lambda: store.exists(None), TypeError, "context_id"),
        "store delete int": (lambda: store.delete(3), TypeError, "context_id"),
        "store checkpoints int": (lambda: store.checkpoints(1), TypeError, "context_id"),
        "pool get int": (lambda: pool.get(5), TypeError, "context_id"),
        "pool get empty": (lambda: pool.get(""), ValueError, "context_id"),
        "pool negative cap": (lambda: ContextPool(m, t, store, -1), ValueError, "max_host_bytes"),
        "pool bool cap": (lambda: ContextPool(m, t, store, True), ValueError, "max_host_bytes"),
        "pool store str": (lambda: ContextPool(m, t, "store.sqlite", 10), TypeError, "store"),
        "pool bad config": (lambda: ContextPool(m, t, store, 10, config=1), TypeError, "config"),
    }


CASES = list(_calls({k: None for k in ("model", "tokenizer", "ctx", "store", "pool", "tmp")}))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_by_name_and_changes_nothing(world, case):
    ctx, store = world["ctx"], world["store"]
    before_ids, before_rows = list(ctx.token_ids), rows(store.path)
    call, error, match = _calls(world)[case]
    with pytest.raises(error, match=match):
        call()
    assert ctx.token_ids == before_ids and ctx.cache.seen == len(before_ids)
    assert rows(store.path) == before_rows


@pytest.mark.core
@pytest.mark.parametrize("field", ["top_p", "vq_subvector_dim", "vq_centroids", "kmeans_iters", "chunk_size",
                                   "selection_queries", "calibration_tokens", "sink_tokens"])
def test_config_refuses_booleans_for_numbers(field):
    with pytest.raises(ValueError, match=rf"HCConfig\.{field}=True"):
        HCConfig(**{field: True})
    with pytest.raises(ValueError, match="budget"):
        HCConfig(eviction="hc", budget=True)


@pytest.mark.core
def test_config_dict_is_accepted_and_a_stored_config_must_be_complete():
    model = tiny_model("llama")
    assert HCCache(model, {"eviction": "streaming", "budget": 128}).config.budget == 128
    data = HCConfig.preset("hc-12.5").to_dict()
    del data["selection_queries"]
    with pytest.raises(ValueError, match="selection_queries"):
        HCConfig.from_dict(data, complete=True)


@pytest.mark.core
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu9"])
def test_load_model_refuses_a_device_that_is_not_there(device):
    with pytest.raises(ValueError, match="device"):
        load_model(device=device)


@pytest.mark.core
def test_a_store_refuses_a_database_with_other_tables(tmp_path):
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ada')")
    with pytest.raises(ValueError, match="other tables.*users"):
        ContextStore(path)
    with sqlite3.connect(path) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["users"], "nothing was added to the user's database"
