"""Checkpoints: exact round trips, refusals that change nothing, corruption, crashes, no pickle, the pool."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
import safetensors.torch
import torch

from hcmemory import HCConfig
from hcmemory.checkpoint import FORMAT_VERSION, CheckpointError, fingerprints
from hcmemory.context import HCContext
from hcmemory.pool import ContextPool
from hcmemory.stores import CheckpointNotFoundError, ContextStore
from hcmemory.stores import redacted, sqlite as sqlite_backend

from .conftest import tiny_model

DOC = ("The harbor office keeps its spare keys in the blue cabinet. The night ferry leaves at eleven. "
       "The vault code at the harbor office is 58213. The cafeteria closes at nine. ")
PROBE = " The"
ROOT = Path(__file__).resolve().parents[1]


def make_context(model, tokenizer, config: str | HCConfig = "full", text: str = DOC, repeat: int = 3,
                 context_id: str | None = None) -> HCContext:
    ctx = HCContext(model, tokenizer, HCConfig.preset(config) if isinstance(config, str) else config,
                    context_id=context_id)
    ctx.append(text * repeat)
    return ctx


def assert_same_context(loaded: HCContext, original: HCContext, reference: torch.Tensor) -> None:
    assert loaded.context_id == original.context_id
    assert loaded.token_ids == original.token_ids
    assert loaded.turn_open == original.turn_open
    assert loaded.config == original.config
    assert same_stats(loaded.stats(), original.stats())
    torch.testing.assert_close(loaded.next_logits(PROBE), reference, atol=1e-5, rtol=0)


def same_stats(a, b) -> bool:
    """Equal in everything the state holds (buffers of a loaded context are sized exactly, so the
    reserved bytes differ)."""
    return a.as_dict() | {"reserved_bytes": 0} == b.as_dict() | {"reserved_bytes": 0}


def rows(path: Path) -> dict[str, object]:
    """Every stored row, read with plain sqlite3 (what a failed call must leave untouched)."""
    with sqlite3.connect(path) as conn:
        found = {f"checkpoint/{ns}/{cid}/{tag}": rest for ns, cid, tag, *rest in
                 conn.execute("SELECT namespace, context_id, tag, checkpoint_id, version, header FROM checkpoints")}
        found.update((f"ref/{checkpoint_id}/{seq}", sha) for checkpoint_id, seq, sha in
                     conn.execute("SELECT checkpoint_id, seq, sha256 FROM checkpoint_chunks"))
        found.update((f"chunk/{ns}/{sha}", data) for ns, sha, data in
                     conn.execute("SELECT namespace, sha256, data FROM chunks"))
        found["version_counter"] = conn.execute("SELECT last FROM version_counter").fetchall()
    return found


def chunk_keys(path: Path) -> list[tuple[str | None, str, int]]:
    """(tag of the checkpoint it belongs to, or None when that checkpoint is gone; checkpoint id; seq) of
    every chunk reference."""
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("SELECT c.tag, k.checkpoint_id, k.seq FROM checkpoint_chunks k "
                                   "LEFT JOIN checkpoints c USING (checkpoint_id)"), key=str)


def orphans(path: Path) -> list[str]:
    """Chunks no checkpoint references (a collection that was missed)."""
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT sha256 FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM "
                                               "checkpoint_chunks k WHERE k.sha256 = c.sha256)")]


def chunk_sha(path: Path, checkpoint_id: str, seq: int) -> str:
    with sqlite3.connect(path) as conn:
        (sha,), = conn.execute("SELECT sha256 FROM checkpoint_chunks WHERE checkpoint_id = ? AND seq = ?",
                               (checkpoint_id, seq)).fetchall()
    return sha


def stored_header(path: Path) -> dict:
    """The (only) header of a store, read with plain sqlite3."""
    with sqlite3.connect(path) as conn:
        (value,), = conn.execute("SELECT header FROM checkpoints").fetchall()
    return json.loads(value)


def rewrite_header(path: Path, change) -> None:
    """Edit the (only) header of a store in place, bypassing ContextStore."""
    header = stored_header(path)
    change(header)
    set_header_text(path, json.dumps(header))


def set_header_text(path: Path, text: str) -> None:
    """Replace the (only) header of a store with ``text`` as it is, bypassing ContextStore."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE checkpoints SET header = ?", (text.encode(),))


# --- exact round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["full", "h2o", pytest.param("hc-12.5", marks=pytest.mark.slow)])
def test_save_load_round_trip_is_exact(smollm2, tmp_path, preset):
    """The loaded context answers exactly like the saved one, and nothing is prefilled again."""
    model, tokenizer = smollm2
    ctx = make_context(model, tokenizer, preset, repeat=8)
    if preset == "h2o":
        assert ctx.stats().tokens_kept < ctx.stats().tokens_seen * ctx.stats().layers, "eviction must have run"
    reference = ctx.next_logits(PROBE)
    with ContextStore(tmp_path / "store.sqlite", chunk_bytes=256 * 1024) as store:
        saved = store.save(ctx)
        loaded = store.load(ctx.context_id, model, tokenizer)
        assert store.checkpoints(ctx.context_id)[0]["id"] == saved.checkpoint_id
    assert_same_context(loaded, ctx, reference)
    assert loaded.stats().tokens_prefilled == ctx.stats().tokens_prefilled
    # the restored context keeps working like the original
    assert loaded.append(" Visitors sign the book at the gate.") == ctx.append(" Visitors sign the book at the gate.")
    torch.testing.assert_close(loaded.next_logits(PROBE), ctx.next_logits(PROBE), atol=1e-5, rtol=0)


def test_many_small_chunks_round_trip(smollm2, tmp_path):
    model, tokenizer = smollm2
    ctx = make_context(model, tokenizer, "full")
    reference = ctx.next_logits(PROBE)
    path = tmp_path / "store.sqlite"
    chunk_bytes = 4096
    with ContextStore(path, chunk_bytes=chunk_bytes) as store:
        store.save(ctx)
        tensors = len(ctx.cache.state()[0])
        keys = chunk_keys(path)
        assert len(keys) > 10 * tensors, "small chunks split every row store many times"
        for spec in stored_header(path)["tensors"].values():
            item = torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
            row_bytes = torch.Size(spec["shape"]).numel() // max(spec["shape"][spec["dim"]], 1) * item
            assert all(c["rows"] * row_bytes <= max(chunk_bytes, row_bytes) for c in spec["chunks"])
        assert_same_context(store.load(ctx.context_id, model, tokenizer), ctx, reference)


def test_empty_context_round_trips(smollm2, tmp_path):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    with ContextStore(tmp_path / "store.sqlite") as store:
        store.save(ctx)
        loaded = store.load(ctx.context_id, model, tokenizer)
    assert len(loaded) == 0 and same_stats(loaded.stats(), ctx.stats())
    loaded.append(DOC)
    ctx.append(DOC)
    torch.testing.assert_close(loaded.next_logits(PROBE), ctx.next_logits(PROBE), atol=1e-5, rtol=0)


def test_tags_replace_list_and_delete(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1, context_id="notes")
    with ContextStore(path, chunk_bytes=64 * 1024) as store:
        store.save(ctx, tag="v1")
        v1_logits = ctx.next_logits(PROBE)
        store.save(ctx)
        v1_chunks = [key for key in chunk_keys(path) if key[0] == "v1"]
        old_latest = {key[1:] for key in chunk_keys(path) if key[0] == "latest"}
        ctx.append(" The cafeteria opens at seven.")
        store.save(ctx)  # replaces "latest" and drops its old chunks, in one transaction
        assert [key for key in chunk_keys(path) if key[0] == "v1"] == v1_chunks
        assert not old_latest & {key[1:] for key in chunk_keys(path)}
        assert None not in {key[0] for key in chunk_keys(path)} and orphans(path) == [], "no orphan chunks"
        assert store.list() == ["notes"] and "notes" in store and "other" not in store
        assert sorted(c["tag"] for c in store.checkpoints("notes")) == ["latest", "v1"]
        assert store.load("notes", model, tokenizer).token_ids == ctx.token_ids
        v1 = store.load("notes", model, tokenizer, tag="v1")
        torch.testing.assert_close(v1.next_logits(PROBE), v1_logits, atol=1e-5, rtol=0)

        store.delete("notes", "v1")
        assert [c["tag"] for c in store.checkpoints("notes")] == ["latest"]
        assert all(key[0] == "latest" for key in chunk_keys(path)) and orphans(path) == []
        with pytest.raises(CheckpointNotFoundError, match="tags are"):
            store.load("notes", model, tokenizer, tag="v1")
        store.delete("notes")
        assert store.list() == [] and chunk_keys(path) == [] and orphans(path) == []
        with pytest.raises(CheckpointNotFoundError, match="empty"):
            store.delete("notes")


def test_missing_context_is_a_clear_key_error(smollm2, tmp_path):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "store.sqlite") as store:
        store.save(make_context(model, tokenizer, repeat=1, context_id="kept"))
        with pytest.raises(KeyError) as info:
            store.load("missing", model, tokenizer)
    assert isinstance(info.value, CheckpointNotFoundError)
    assert "no context 'missing'" in str(info.value) and "'kept'" in str(info.value)


# --- refusals that change nothing ------------------------------------------------------------


def test_other_model_or_tokenizer_is_refused_and_nothing_changes(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path) as store:
        store.save(ctx)
    before = rows(path)
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<hcmemory-test-token>"])
    with ContextStore(path) as store:
        with pytest.raises(ValueError, match="checkpoint was made with model .*load it with that model"):
            store.load(ctx.context_id, tiny_model("llama"), tokenizer)
        with pytest.raises(ValueError, match="different tokenizer"):
            store.load(ctx.context_id, model, other_tokenizer)
    assert rows(path) == before
    with ContextStore(path) as store:
        assert store.load(ctx.context_id, model, tokenizer).token_ids == ctx.token_ids


def test_newer_format_asks_to_upgrade(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path) as store:
        store.save(ctx)
    rewrite_header(path, lambda header: header.update(format_version=FORMAT_VERSION + 1))
    before = rows(path)
    with ContextStore(path) as store, pytest.raises(CheckpointError, match="upgrade hcmemory"):
        store.load(ctx.context_id, model, tokenizer)
    assert rows(path) == before


def test_failed_save_leaves_the_previous_checkpoint(smollm2, tmp_path, monkeypatch):
    """A save that fails halfway through its chunks changes nothing: the previous version loads, unchanged."""
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    reference = ctx.next_logits(PROBE)
    with ContextStore(path, chunk_bytes=4096) as store:
        store.save(ctx)
        before = rows(path)
        saved_tokens = list(ctx.token_ids)
        ctx.append(" The cafeteria opens at seven.")
        real_sha256, calls = hashlib.sha256, []

        def failing_sha256(data=b""):
            calls.append(1)
            if len(calls) == 50:
                raise OSError("disk full (simulated)")
            return real_sha256(data)

        monkeypatch.setattr(hashlib, "sha256", failing_sha256)
        with pytest.raises(OSError, match="simulated"):
            store.save(ctx)
        monkeypatch.undo()
        assert len(calls) == 50, "the failure landed among the chunks"
        assert rows(path) == before, "the failed save is rolled back entirely"
        loaded = store.load(ctx.context_id, model, tokenizer)
        assert store.save(ctx) and store.load(ctx.context_id, model, tokenizer).token_ids == ctx.token_ids
    assert loaded.token_ids == saved_tokens
    torch.testing.assert_close(loaded.next_logits(PROBE), reference, atol=1e-5, rtol=0)


# --- damage ----------------------------------------------------------------------------------


def test_corrupted_chunk_is_detected(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path, chunk_bytes=64 * 1024) as store:
        store.save(ctx)
    _, checkpoint_id, seq = chunk_keys(path)[len(chunk_keys(path)) // 2]
    sha = chunk_sha(path, checkpoint_id, seq)
    original = rows(path)[f"chunk//{sha}"]
    value = bytearray(original)
    value[-1] ^= 0xFF  # one flipped bit in the tensor data: the right size, wrong numbers
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE chunks SET data = ? WHERE sha256 = ?", (bytes(value), sha))
    with ContextStore(path) as store, pytest.raises(CheckpointError, match="corrupted"):
        store.load(ctx.context_id, model, tokenizer)
    longer = bytes(value) + b"extra"  # bytes of the wrong size with a matching sha: the size check must object
    # (identical chunks are stored once, so the first to object may be another seq sharing those bytes)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE chunks SET data = ? WHERE sha256 = ?", (longer, sha))
    rewrite_header(path, lambda h: [c.update(sha256=hashlib.sha256(longer).hexdigest())
                                    for t in h["tensors"].values() for c in t["chunks"] if c["seq"] == seq])
    with ContextStore(path) as store, pytest.raises(CheckpointError, match=f"chunk \\d+ .* holds {len(longer)} bytes"):
        store.load(ctx.context_id, model, tokenizer)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE chunks SET data = ? WHERE sha256 = ?", (original, sha))
        conn.execute("DELETE FROM checkpoint_chunks WHERE checkpoint_id = ? AND seq = ?", (checkpoint_id, seq))
    with ContextStore(path) as store, pytest.raises(CheckpointError, match=f"chunk {seq} .* is missing"):
        store.load(ctx.context_id, model, tokenizer)


KILLED_SAVE = textwrap.dedent("""
    import hashlib, sys, time
    import safetensors.torch
    import torch
    from hcmemory import HCConfig, load_model
    from hcmemory.context import HCContext
    from hcmemory import stores as store_module

    path, reference_path, doc = sys.argv[1], sys.argv[2], sys.argv[3]
    model, tokenizer = load_model()
    ctx = HCContext(model, tokenizer, "full", context_id="crash")
    ctx.append(doc * 3)
    store = store_module.ContextStore(path, chunk_bytes=2048)
    store.save(ctx)
    safetensors.torch.save_file({"logits": ctx.next_logits(" The"), "tokens": torch.tensor(ctx.token_ids)},
                                reference_path)
    ctx.append(doc * 3)
    real_sha256, calls = hashlib.sha256, []

    def hash_then_stall(data=b""):
        calls.append(1)
        if len(calls) == 2000:  # well into the second save: thousands of chunks already written
            print("saving", flush=True)
            time.sleep(600)
        return real_sha256(data)

    hashlib.sha256 = hash_then_stall
    store.save(ctx)
""")


def test_kill_during_save_keeps_the_previous_checkpoint(smollm2, tmp_path):
    model, tokenizer = smollm2
    path, reference_path = tmp_path / "store.sqlite", tmp_path / "reference.safetensors"
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path), str(reference_path), DOC],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = child.stdout.readline()
        assert line.strip() == "saving", f"child failed: {line}{child.stderr.read()}"
        with sqlite3.connect(path, timeout=0) as probe, pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")  # the kill must land inside the save's write transaction
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    reference = safetensors.torch.load_file(reference_path)
    with ContextStore(path) as store:
        (checkpoint,) = store.checkpoints("crash")
        loaded = store.load("crash", model, tokenizer)
        header_chunks = {c["seq"] for t in stored_header(path)["tensors"].values() for c in t["chunks"]}
    assert loaded.token_ids == reference["tokens"].tolist() and checkpoint["tokens"] == len(loaded)
    torch.testing.assert_close(loaded.next_logits(PROBE), reference["logits"], atol=1e-5, rtol=0)
    assert {(tag, seq) for tag, _, seq in chunk_keys(path)} == {("latest", seq) for seq in header_chunks}, \
        "the interrupted save left no orphan chunks"
    assert orphans(path) == []


# --- no pickle -------------------------------------------------------------------------------


def test_no_pickle_anywhere(smollm2, tmp_path, monkeypatch):
    """Statically: the persistence modules never import pickle nor call torch.load; at run time: loading
    works with every unpickling entry point booby-trapped."""
    modules = ["checkpoint.py", "calibration.py"] + [f"stores/{p.name}" for p in
                                                                 (ROOT / "hcmemory" / "stores").glob("*.py")]
    for module in modules:
        tree = ast.parse((ROOT / "hcmemory" / module).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if "pickle" in name or name == "dill"}, module
        assert not [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "load"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"], module

    model, tokenizer = smollm2
    ctx = make_context(model, tokenizer, repeat=1)
    reference = ctx.next_logits(PROBE)
    path, file_path = tmp_path / "store.sqlite", tmp_path / "ctx.hcm"
    with ContextStore(path, chunk_bytes=64 * 1024) as store:
        store.save(ctx)
    assert stored_header(path)["context_id"] == ctx.context_id, "headers are plain JSON"
    ctx.save(file_path)

    def trap(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for target in ("pickle.load", "pickle.loads", "pickle.Unpickler", "pickle._Unpickler", "pickle._loads",
                   "torch.load"):
        module, name = target.rsplit(".", 1)
        monkeypatch.setattr({"pickle": pickle, "torch": torch}[module], name, trap)
    with ContextStore(path) as store:
        loaded = store.load(ctx.context_id, model, tokenizer)
    assert_same_context(loaded, ctx, reference)
    assert_same_context(HCContext.load(file_path, model, tokenizer), ctx, reference)


# --- one context, one file -------------------------------------------------------------------


def test_single_file_round_trip_and_damage(smollm2, tmp_path):
    model, tokenizer = smollm2
    ctx = make_context(model, tokenizer, "full", repeat=2)
    reference = ctx.next_logits(PROBE)
    path = tmp_path / "ctx.hcm"
    ctx.save(path)
    ctx.save(path)  # replacing goes through a temporary file and a rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx.hcm"], "no temporary file is left behind"
    assert_same_context(HCContext.load(path, model, tokenizer), ctx, reference)

    with pytest.raises(ValueError, match="load it with that model"):
        HCContext.load(path, tiny_model("llama"), tokenizer)

    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()["hcmemory"])
    newer = tmp_path / "newer.hcm"
    safetensors.torch.save_file(tensors, newer, metadata={"hcmemory": json.dumps(
        {**header, "format_version": FORMAT_VERSION + 1})})
    with pytest.raises(CheckpointError, match="upgrade hcmemory"):
        HCContext.load(newer, model, tokenizer)

    flipped = tmp_path / "flipped.hcm"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        HCContext.load(flipped, model, tokenizer)

    truncated = tmp_path / "truncated.hcm"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        HCContext.load(truncated, model, tokenizer)


# --- the pool --------------------------------------------------------------------------------


def test_pool_spills_least_recently_used_and_reloads_exactly(smollm2, tmp_path):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "store.sqlite") as store:
        probe = make_context(model, tokenizer, repeat=1)
        one = probe.stats().reserved_bytes
        pool = ContextPool(model, tokenizer, store, max_host_bytes=int(1.5 * one), config="full")

        a = pool.get("a")
        a.append(DOC)
        a_logits = a.next_logits(PROBE)
        b = pool.get("b")
        b.append(DOC + " The night ferry is late today.")
        assert pool.live_ids == ["a", "b"] and not store.exists("a")
        pool.get("c")  # a and b together exceed the cap: a, the least recently used, goes to the store
        assert pool.live_ids == ["b", "c"] and "a" in pool and store.exists("a")
        assert pool.live_bytes() <= pool.max_host_bytes

        again = pool.get("a")  # reloaded, not re-prefilled; b is now the least recently used
        assert pool.live_ids == ["c", "a"] and store.exists("b")
        assert again is not a and again.token_ids == a.token_ids
        torch.testing.assert_close(again.next_logits(PROBE), a_logits, atol=1e-5, rtol=0)

        with pytest.raises(KeyError, match="not live"):
            pool.spill("b")
        pool.close()
        assert pool.live_ids == [] and store.list() == ["a", "b", "c"]
        assert "zzz" not in pool


# --- the store file itself -------------------------------------------------------------------


def test_concurrent_saves_from_threads(smollm2, tmp_path):
    """Two threads saving into one store object, and two store objects on one file (two connections, as two
    processes would have): every save lands whole and every checkpoint loads exactly."""
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    contexts = {name: make_context(model, tokenizer, repeat=1 + i, context_id=name) for i, name in enumerate("ab")}
    references = {name: ctx.next_logits(PROBE) for name, ctx in contexts.items()}
    errors: list[BaseException] = []
    shared, second = ContextStore(path, chunk_bytes=8192), ContextStore(path, chunk_bytes=8192)

    def saver(name: str, store: ContextStore) -> None:
        try:
            for round_ in range(6):
                store.save(contexts[name], tag=f"t{round_ % 3}")
                store.save(contexts[name])
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=("a", shared)), threading.Thread(target=saver, args=("b", shared)),
               threading.Thread(target=saver, args=("a", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    second.close()
    with shared:
        assert sorted(shared.index()) == [(n, t) for n in "ab" for t in ("latest", "t0", "t1", "t2")]
        for name, ctx in contexts.items():
            for tag in ("latest", "t0", "t1", "t2"):
                loaded = shared.load(name, model, tokenizer, tag=tag)
                assert loaded.token_ids == ctx.token_ids
                torch.testing.assert_close(loaded.next_logits(PROBE), references[name], atol=1e-5, rtol=0)
    assert None not in {tag for tag, _, _ in chunk_keys(path)} and orphans(path) == [], "no orphan chunks"


def test_index_reads_headers_only_and_skips_damaged_entries(smollm2, tmp_path, caplog):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    good = make_context(model, tokenizer, "h2o", repeat=1, context_id="good")
    bad = make_context(model, tokenizer, repeat=1, context_id="bad")
    with ContextStore(path) as store:
        store.save(good)
        store.save(good, tag="v1")
        store.save(bad)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE checkpoints SET header = ? WHERE context_id = 'bad'", (b'{"format_version": 6, "tok',))
    with ContextStore(path) as store:
        with caplog.at_level("WARNING", logger="hcmemory.stores.context_store"):
            index = store.index()
        assert sorted(index) == [("good", "latest"), ("good", "v1")]
        assert "'bad'" in caplog.text and "damaged" in caplog.text
        entry = index["good", "latest"]
        assert entry.token_ids == tuple(good.token_ids) and entry.config == good.config.to_dict()
        assert (entry.model_fingerprint, entry.tokenizer_fingerprint) == fingerprints(model, tokenizer)
        assert entry.checkpoint_id in {c["id"] for c in store.checkpoints("good")}
        assert list(store.index(tag="v1")) == [("good", "v1")]
        with pytest.raises(AttributeError):
            entry.token_ids = ()  # frozen: an index entry is a snapshot, not a handle


def write_legacy_store(path: Path, ctx: HCContext) -> None:
    """A store as hcmemory wrote it through sqlitedict: one key/value table, a JSON header under
    ``meta/<id>/<tag>`` and each row chunk as a one-tensor safetensors blob under the key its manifest names."""
    state, checkpoint_id = ctx.to_state(), "0" * 32
    header, manifest, index = state.header("latest", checkpoint_id), {}, 0
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "hcmemory" (key TEXT PRIMARY KEY, value BLOB)')
        for name, tensor in state.tensors.items():
            dim = 1 if tensor.dim() >= 2 else 0
            pieces = [tensor] if tensor.dim() == 0 or tensor.numel() == 0 else list(tensor.split(7, dim))
            chunks = []
            for piece in pieces:
                blob = safetensors.torch.save({"rows": piece.contiguous()})
                key = f"chunk/{quote(ctx.context_id, safe='')}/latest/{checkpoint_id}/{index:08d}"
                conn.execute('INSERT INTO "hcmemory" VALUES (?, ?)', (key, blob))
                chunks.append({"key": key, "rows": int(piece.shape[dim]) if piece.dim() else 1, "bytes": len(blob),
                               "sha256": hashlib.sha256(blob).hexdigest()})
                index += 1
            manifest[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                              "dim": dim, "chunks": chunks}
        conn.execute('INSERT INTO "hcmemory" VALUES (?, ?)', (f"meta/{quote(ctx.context_id, safe='')}/latest",
                                                             json.dumps({**header, "tensors": manifest}).encode()))


def legacy_rows(path: Path) -> list[tuple[str, bytes]]:
    with sqlite3.connect(path) as conn:
        return conn.execute('SELECT key, value FROM "hcmemory" ORDER BY key').fetchall()


def test_an_earlier_store_layout_is_converted_on_open_and_kept_as_a_copy(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "old.sqlite"
    ctx = make_context(model, tokenizer, "h2o", repeat=2, context_id="old conversation")
    reference = ctx.next_logits(PROBE)
    write_legacy_store(path, ctx)
    original = legacy_rows(path)
    with ContextStore(path) as store:
        assert store.list() == ["old conversation"]
        assert_same_context(store.load("old conversation", model, tokenizer), ctx, reference)
        assert store.save(ctx).new_chunks == 0, "converted chunks are the store's own chunking of the same rows"
    backup = tmp_path / "old.sqlite.v0.bak"
    assert legacy_rows(backup) == original and backup.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as conn:
        assert "hcmemory" not in {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    with ContextStore(path) as store:  # converted once: opening again reads the new layout
        assert store.load("old conversation", model, tokenizer).token_ids == ctx.token_ids


@pytest.mark.core
def test_an_earlier_store_that_cannot_be_converted_is_left_untouched(tmp_path):
    """A damaged entry refuses the whole conversion: the file stays as it was and no copy is left behind."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "hcmemory" (key TEXT PRIMARY KEY, value BLOB)')
        conn.execute('INSERT INTO "hcmemory" VALUES (?, ?)', ("meta/a/latest", b"{}"))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"meta/a/latest.*cannot be converted.*left as it was"):
        ContextStore(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.sqlite"]
    (tmp_path / "old.sqlite.v0.bak").write_bytes(b"someone's copy")
    with pytest.raises(CheckpointError, match=r"old.sqlite.v0.bak .* is in the way; move it away"):
        ContextStore(path)
    assert path.read_bytes() == before and (tmp_path / "old.sqlite.v0.bak").read_bytes() == b"someone's copy"


def test_a_layout_1_store_migrates_into_the_namespace_it_is_opened_with(smollm2, tmp_path):
    """Layout 1 (one namespace, chunks per checkpoint) is migrated on open, in one transaction; its
    checkpoints land in the namespace the file is opened with, since the file held one namespace."""
    model, tokenizer = smollm2
    ctx = make_context(model, tokenizer, repeat=1, context_id="kept")
    reference = ctx.next_logits(PROBE)
    with ContextStore(tmp_path / "new.sqlite", chunk_bytes=8192) as store:
        store.save(ctx)
    with sqlite3.connect(tmp_path / "new.sqlite") as new:
        (checkpoint_id, header), = new.execute("SELECT checkpoint_id, header FROM checkpoints").fetchall()
        chunks = new.execute("SELECT k.seq, c.data FROM checkpoint_chunks k JOIN chunks c USING (namespace, sha256)"
                             ).fetchall()
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as conn:
        for statement in sqlite_backend.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO checkpoints VALUES ('kept', 'latest', ?, ?)", (checkpoint_id, header))
        conn.executemany("INSERT INTO chunks VALUES (?, ?, ?)", [(checkpoint_id, seq, data) for seq, data in chunks])
        conn.execute(f"PRAGMA application_id = {sqlite_backend._APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
    with ContextStore(path, namespace="tenant", chunk_bytes=8192) as store:
        loaded, version = store.load_versioned("kept", model, tokenizer)
        assert version >= 1 and store.save(ctx, expected_version=version).new_chunks == 0
    assert_same_context(loaded, ctx, reference)
    with ContextStore(path) as store:
        assert store.list() == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_backend.SCHEMA_VERSION


@pytest.mark.core
def test_busy_and_disk_errors_are_told_apart_from_damage_without_error_codes(tmp_path):
    """Python 3.10's sqlite3 errors carry no result code: the message decides, so a busy database is never
    reported as damaged."""
    for message, code in [("database is locked", 5), ("database table is locked", 6),
                          ("database or disk is full", 13), ("attempt to write a readonly database", 8),
                          ("file is not a database", 0)]:
        assert sqlite_backend.primary_code(sqlite3.OperationalError(message)) == code
    path = tmp_path / "store.sqlite"
    ContextStore(path).close()
    with sqlite3.connect(path) as holder, sqlite3.connect(path, timeout=0) as other:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as info:
            other.execute("BEGIN IMMEDIATE")
        holder.execute("ROLLBACK")
    assert sqlite_backend.primary_code(info.value) == 5


@pytest.mark.core
def test_store_locations(tmp_path):
    with ContextStore(f"sqlite:///{tmp_path}/url.sqlite", namespace="t") as store:
        assert store.path == tmp_path / "url.sqlite" and store.list() == [] and "namespace='t'" in repr(store)
    with pytest.raises(ValueError, match="redis:// stores are not supported"):
        ContextStore("redis://localhost/0")
    with pytest.raises(TypeError, match="namespace must be a string"):
        ContextStore(tmp_path / "x.sqlite", namespace=None)
    assert redacted("postgresql://app:pw@db:5432/mem?password=pw2&sslmode=require") == \
        "postgresql://app:***@db:5432/mem?password=***&sslmode=require"


@pytest.mark.core
def test_a_newer_store_layout_asks_to_upgrade(tmp_path):
    path = tmp_path / "store.sqlite"
    ContextStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(CheckpointError, match="layout version 99 is newer.*upgrade hcmemory"):
        ContextStore(path)
