"""Checkpoints read from untrusted bytes: bounded headers, allocations sized by stored bytes, private files,
and forks that share nothing mutable with their origin."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import safetensors.torch

from hcmemory.checkpoint import MAX_HEADER_BYTES, MAX_HEADER_DEPTH, CheckpointError
from hcmemory.context import HCContext
from hcmemory.files import HOME_ENV, atomic_path, cache_root
from hcmemory.stores import ContextStore

from .test_store import make_context, rewrite_header, rows, set_header_text


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def nested(depth: int) -> str:
    """A JSON header whose metadata is ``depth`` lists deep (written by hand: json.dumps would recurse)."""
    return '{"format_version": 6, "metadata": ' + "[" * depth + "]" * depth + "}"


# --- defect 9: a fork shares nothing mutable with its origin ---------------------------------------------------


def test_fork_metadata_is_a_deep_copy(smollm2):
    model, tokenizer = smollm2
    ctx = make_context(model, tokenizer, repeat=1)
    ctx.metadata["notes"] = {"tags": ["harbor"]}
    twin = ctx.fork()
    twin.metadata["notes"]["tags"].append("ferry")
    assert ctx.metadata == {"notes": {"tags": ["harbor"]}}
    assert twin.metadata == {"notes": {"tags": ["harbor", "ferry"]}}


# --- defect 10: header size and nesting are bounded ------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_HEADER_DEPTH + 1, 100_000])
def test_deeply_nested_store_header_is_refused_by_name(smollm2, tmp_path, depth):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path) as store:
        store.save(ctx)
    set_header_text(path, nested(depth))
    with ContextStore(path) as store:
        for call in (lambda: store.load(ctx.context_id, model, tokenizer), lambda: store.token_ids(ctx.context_id),
                     lambda: store.checkpoints(ctx.context_id)):
            with pytest.raises(CheckpointError, match=f"nested more than {MAX_HEADER_DEPTH} levels deep"):
                call()


def test_deeply_nested_file_header_is_refused_by_name(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "ctx.hcm"
    make_context(model, tokenizer, repeat=1).save(path)
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={"hcmemory": nested(100_000)})
    with pytest.raises(CheckpointError, match=f"nested more than {MAX_HEADER_DEPTH} levels deep"):
        HCContext.load(path, model, tokenizer)


def test_oversized_store_header_is_refused_by_name(smollm2, tmp_path):
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path) as store:
        store.save(ctx)
    set_header_text(path, '{"format_version": 6, "pad": "' + "x" * MAX_HEADER_BYTES + '"}')
    with ContextStore(path) as store, pytest.raises(CheckpointError, match=f"larger than {MAX_HEADER_BYTES}"):
        store.load(ctx.context_id, model, tokenizer)


def test_a_header_that_could_not_be_read_back_is_never_written(smollm2, tmp_path):
    """Metadata nested past the bound is refused at save time, and the stored checkpoint stays as it was."""
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path) as store:
        store.save(ctx)
        before = rows(path)
        deep: list = []
        for _ in range(MAX_HEADER_DEPTH):
            deep = [deep]
        ctx.metadata["deep"] = deep
        with pytest.raises(ValueError, match=f"nested more than {MAX_HEADER_DEPTH} levels deep"):
            store.save(ctx)
        with pytest.raises(ValueError, match=f"nested more than {MAX_HEADER_DEPTH} levels deep"):
            ctx.save(tmp_path / "ctx.hcm")
        assert rows(path) == before and not (tmp_path / "ctx.hcm").exists()
        assert store.load(ctx.context_id, model, tokenizer).metadata == {}


# --- defect 11: no allocation is sized by the header before the stored bytes are counted ---------------------


@pytest.mark.parametrize("claim", [[2**20, 2**20, 64], "rows"])
def test_claimed_tensor_size_is_checked_against_the_stored_bytes(smollm2, tmp_path, claim):
    """A header claiming a multi-TB tensor (or twice the rows its chunks hold) is refused by name, before any
    buffer of that size is asked for."""
    model, tokenizer = smollm2
    path = tmp_path / "store.sqlite"
    ctx = make_context(model, tokenizer, repeat=1)
    with ContextStore(path, chunk_bytes=4096) as store:
        store.save(ctx)

    def inflate(header):
        spec = next(iter(header["tensors"].values()))
        if claim == "rows":
            spec["shape"][spec["dim"]] *= 2
        else:
            spec["shape"] = claim

    rewrite_header(path, inflate)
    with ContextStore(path) as store, pytest.raises(CheckpointError, match=r"claims \d+ bytes.* hold only \d+"):
        store.load(ctx.context_id, model, tokenizer)


# --- defect 12: conversations are private files ----------------------------------------------------------------


def test_store_and_checkpoint_files_are_private(smollm2, tmp_path):
    model, tokenizer = smollm2
    old = os.umask(0o022)  # the usual default, which left files world-readable
    try:
        ctx = make_context(model, tokenizer, repeat=1)
        path = tmp_path / "store.sqlite"
        with ContextStore(path) as store:
            store.save(ctx)
            companions = [p for p in tmp_path.iterdir() if p.name.startswith("store.sqlite")]
            assert companions and all(mode(p) == 0o600 for p in companions), {p.name: oct(mode(p)) for p in companions}
        ctx.save(tmp_path / "ctx.hcm")
        assert mode(tmp_path / "ctx.hcm") == 0o600
    finally:
        os.umask(old)


@pytest.mark.core
def test_cache_root_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "cache" / "hcmemory"))
    old = os.umask(0o022)
    try:
        with atomic_path(cache_root() / "codebooks" / "x.safetensors") as tmp:
            tmp.write_bytes(b"data")
    finally:
        os.umask(old)
    for folder in (tmp_path / "cache", cache_root(), cache_root() / "codebooks"):
        assert mode(folder) == 0o700, folder
    assert mode(cache_root() / "codebooks" / "x.safetensors") == 0o600
