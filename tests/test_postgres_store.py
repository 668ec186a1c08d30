"""Store backends against real databases: a PostgreSQL server started by the ``postgres`` fixture, and SQLite.

What both backends promise (round trips, damage refused, compare-and-set versions, content-addressed
chunks shared by common prefixes, appends that write only the new rows' chunks, namespaces that never
cross) runs on both, parametrized; what only a database server has (killed mid-commit, unreachable,
concurrent schema setup) runs on PostgreSQL.  Models are tiny random ones fed token ids, so every test is
fast; the embedded model runs once, for a round trip through PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from hcmemory.checkpoint import CheckpointError
from hcmemory.context import HCContext
from hcmemory.stores import CheckpointNotFoundError, ContextStore, StaleCheckpointError
from hcmemory.stores import chunking

from .conftest import tiny_model
from .postgres_server import PostgresServer

PROBE = [7, 11]
PREFIX = list(range(3, 163))


@pytest.fixture(scope="module")
def tiny(smollm2):
    """A tiny random model with the embedded tokenizer (whose fingerprint checkpoints record)."""
    return tiny_model("llama"), smollm2[1]


def context(tiny, tokens: list[int], context_id: str = "conv") -> HCContext:
    ctx = HCContext(*tiny, "full", context_id=context_id)
    ctx.append(tokens)
    return ctx


class Database:
    """Plain access to a store's tables, bypassing ContextStore: what a damaged disk or a curious admin sees."""

    def __init__(self, location: str | Path, namespace: str) -> None:
        self.location, self.namespace = location, namespace
        self.postgres = isinstance(location, str)
        self.prefix = "hcmemory_" if self.postgres else ""

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        sql = sql.replace("{p}", self.prefix)
        if self.postgres:
            import psycopg  # here, not at the top: the core tests collect this file where psycopg is absent

            with psycopg.connect(self.location, autocommit=True) as conn:
                cursor = conn.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        with sqlite3.connect(self.location) as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()

    def chunks(self) -> dict[str, bytes]:
        """sha256 -> bytes of every chunk the namespace holds."""
        return {sha: bytes(data) for sha, data in
                self.query("SELECT sha256, data FROM {p}chunks WHERE namespace = %s", (self.namespace,))}


@pytest.fixture(params=["sqlite", "postgres"])
def place(request, tmp_path):
    """``(location, namespace)`` of an empty store on each backend: a new SQLite file, or a namespace of its
    own in the shared PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres").dsn, f"test-{uuid.uuid4().hex}"
    return tmp_path / "store.sqlite", ""


def manifest(header: dict) -> dict[str, list[dict]]:
    return {name: spec["chunks"] for name, spec in header["tensors"].items()}


def stored_header(db: Database, context_id: str, tag: str = "latest") -> dict:
    import json

    (raw,), = db.query("SELECT header FROM {p}checkpoints WHERE namespace = %s AND context_id = %s AND tag = %s",
                       (db.namespace, context_id, tag))
    return json.loads(bytes(raw))


# --- shared behaviour ----------------------------------------------------------------------------


def test_round_trip_is_exact_and_versions_grow(tiny, place):
    location, namespace = place
    ctx = context(tiny, PREFIX)
    reference = ctx.next_logits(PROBE)
    with ContextStore(location, namespace=namespace, chunk_bytes=2048) as store:
        first = store.save(ctx)
        assert first.version >= 1 and first.new_chunks == len(Database(location, namespace).chunks())
        second = store.save(ctx, tag="v1")
        assert second.version > first.version and second.new_chunks == 0, "the same bytes are not sent twice"
        loaded, version = store.load_versioned("conv", *tiny)
        assert version == first.version == store.version("conv") and store.version("conv", "v1") == second.version
        assert [c["version"] for c in store.checkpoints("conv")] == [first.version, second.version]
        assert store.index()["conv", "latest"].version == first.version
        with pytest.raises(ValueError, match="load it with that model"):
            store.load("conv", tiny_model("qwen2"), tiny[1])
        with pytest.raises(CheckpointNotFoundError, match="no context 'other'"):
            store.load("other", *tiny)
    assert loaded.token_ids == ctx.token_ids
    torch.testing.assert_close(loaded.next_logits(PROBE), reference, atol=1e-6, rtol=0)


def test_a_damaged_chunk_is_refused(tiny, place):
    location, namespace = place
    db = Database(location, namespace)
    with ContextStore(location, namespace=namespace, chunk_bytes=2048) as store:
        store.save(context(tiny, PREFIX))
        sha = sorted(db.chunks())[len(db.chunks()) // 2]
        data = bytearray(db.chunks()[sha])
        data[len(data) // 2] ^= 0x01
        db.query("UPDATE {p}chunks SET data = %s WHERE namespace = %s AND sha256 = %s",
                 (bytes(data), namespace, sha))
        with pytest.raises(CheckpointError, match="corrupted \\(sha256 mismatch\\)"):
            store.load("conv", *tiny)
        db.query("DELETE FROM {p}checkpoint_chunks WHERE sha256 = %s", (sha,))
        with pytest.raises(CheckpointError, match="is missing"):
            store.load("conv", *tiny)


def test_a_stale_writer_is_refused_and_nothing_changes(tiny, place):
    location, namespace = place
    db = Database(location, namespace)
    with ContextStore(location, namespace=namespace, chunk_bytes=2048) as store:
        base = store.save(context(tiny, PREFIX), expected_version=0)  # 0: nothing may be stored yet
        winner = store.save(context(tiny, PREFIX + [40, 41]), expected_version=base.version)
        before = (db.chunks(), stored_header(db, "conv"))
        with pytest.raises(StaleCheckpointError, match=f"expected version {base.version} but the store holds "
                                                      f"version {winner.version}") as info:
            store.save(context(tiny, PREFIX + [50, 51, 52]), expected_version=base.version)
        assert (info.value.expected, info.value.current) == (base.version, winner.version)
        with pytest.raises(StaleCheckpointError, match="expected no checkpoint"):
            store.save(context(tiny, PREFIX), expected_version=0)
        assert (db.chunks(), stored_header(db, "conv")) == before, "a refused save changes nothing"
        assert store.version("conv") == winner.version
        assert store.load("conv", *tiny).token_ids == PREFIX + [40, 41]
        with pytest.raises(ValueError, match="expected_version"):
            store.save(context(tiny, PREFIX), expected_version=-1)


def test_concurrent_writers_of_one_version_one_wins(tiny, place):
    """Two writers that both read version v (a failover's two owners) save at once: one commits, the other
    is refused, and the stored checkpoint is whole and the winner's."""
    location, namespace = place
    contexts = {n: context(tiny, PREFIX + [60 + n] * (n + 1)) for n in range(2)}
    with ContextStore(location, namespace=namespace, chunk_bytes=2048) as setup:
        base = setup.save(context(tiny, PREFIX)).version
    stores = [ContextStore(location, namespace=namespace, chunk_bytes=2048) for _ in contexts]
    start, outcomes = threading.Barrier(2), {}

    def write(n: int) -> None:
        start.wait()
        try:
            outcomes[n] = stores[n].save(contexts[n], expected_version=base)
        except StaleCheckpointError as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=write, args=(n,)) for n in contexts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [n for n, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    assert len(outcomes) == 2 and len(winners) == 1, outcomes
    (winner,) = winners
    assert isinstance(outcomes[1 - winner], StaleCheckpointError)
    assert stores[0].version("conv") == outcomes[winner].version
    assert stores[0].load("conv", *tiny).token_ids == contexts[winner].token_ids
    for store in stores:
        store.close()


def test_an_append_writes_only_the_new_rows_chunks(tiny, place):
    location, namespace = place
    db = Database(location, namespace)
    ctx = context(tiny, PREFIX)
    with ContextStore(location, namespace=namespace, chunk_bytes=2048) as store:
        store.save(ctx)
        before = manifest(stored_header(db, "conv"))
        ctx.append([90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102])
        saved = store.save(ctx)
        after_header = stored_header(db, "conv")
        after = manifest(after_header)
        for name, chunks in before.items():
            full = [(c["rows"], c["sha256"]) for c in chunks
                    if c["rows"] == after_header["tensors"][name]["rows_per_chunk"]]
            assert [(c["rows"], c["sha256"]) for c in after[name][:len(full)]] == full, \
                f"{name}: an earlier full chunk changed"
        old = {c["sha256"] for chunks in before.values() for c in chunks}
        new = {c["sha256"] for chunks in after.values() for c in chunks} - old
        stored = db.chunks()
        assert saved.new_chunks == len(new) < saved.chunks / 3
        assert saved.new_bytes == sum(len(stored[sha]) for sha in new)
        assert set(stored) == {c["sha256"] for chunks in after.values() for c in chunks}, \
            "the replaced checkpoint's partial chunks were collected, nothing else"
        torch.testing.assert_close(store.load("conv", *tiny).next_logits(PROBE), ctx.next_logits(PROBE),
                                   atol=1e-6, rtol=0)


def test_a_shared_prefix_is_stored_once(tiny, place):
    location, namespace = place
    db = Database(location, namespace)
    a, b = context(tiny, PREFIX + [200] * 9, "a"), context(tiny, PREFIX + [201] * 20, "b")
    b_logits = b.next_logits(PROBE)
    with ContextStore(location, namespace=namespace, chunk_bytes=2048) as store:
        store.save(a)
        saved = store.save(b)
        shas = {n: {c["sha256"] for chunks in manifest(stored_header(db, n)).values() for c in chunks} for n in "ab"}
        shared = shas["a"] & shas["b"]
        assert len(shared) > saved.chunks / 2, "the common prefix's chunks are the same"
        assert saved.new_chunks == len(shas["b"] - shas["a"])
        assert set(db.chunks()) == shas["a"] | shas["b"], "each distinct chunk once"
        store.delete("a")
        assert set(db.chunks()) == shas["b"], "a's own chunks went with it; the shared ones stayed"
        torch.testing.assert_close(store.load("b", *tiny).next_logits(PROBE), b_logits, atol=1e-6, rtol=0)
        store.delete("b")
        assert db.chunks() == {}


def test_namespaces_never_cross(tiny, place):
    location, namespace = place
    one, two = namespace + "one", namespace + "two"
    with ContextStore(location, namespace=one, chunk_bytes=2048) as first, \
            ContextStore(location, namespace=two, chunk_bytes=2048) as second:
        first.save(context(tiny, PREFIX))
        first.save(context(tiny, PREFIX), tag="v1")
        second.save(context(tiny, PREFIX + [77]))
        assert first.list() == second.list() == ["conv"], "the same id in two namespaces: two checkpoints"
        assert sorted(first.index()) == [("conv", "latest"), ("conv", "v1")]
        assert sorted(second.index()) == [("conv", "latest")] and not second.exists("conv", "v1")
        assert first.load("conv", *tiny).token_ids == PREFIX
        assert second.load("conv", *tiny).token_ids == PREFIX + [77]
        assert len(Database(location, two).chunks()) > 0, "identical bytes are stored per namespace"
        second.delete("conv")
        assert second.list() == [] and first.list() == ["conv"]
        with pytest.raises(CheckpointNotFoundError, match="empty"):
            second.delete("conv")
        with pytest.raises(CheckpointNotFoundError):
            second.load("conv", *tiny, tag="v1")
        assert first.load("conv", *tiny, tag="v1").token_ids == PREFIX
    with pytest.raises(ValueError, match="NUL"):
        ContextStore(location, namespace="a\0b")


# --- PostgreSQL only -----------------------------------------------------------------------------


def test_embedded_model_round_trip_through_postgres(smollm2, postgres):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "hc-12.5", context_id="embedded")
    ctx.append("The harbor office keeps its spare keys in the blue cabinet. The vault code is 58213. " * 4)
    reference = ctx.next_logits(" The")
    with ContextStore(postgres.dsn, namespace=f"test-{uuid.uuid4().hex}", chunk_bytes=256 * 1024) as store:
        store.save(ctx)
        loaded = store.load("embedded", model, tokenizer)
    assert loaded.token_ids == ctx.token_ids and loaded.config == ctx.config
    torch.testing.assert_close(loaded.next_logits(" The"), reference, atol=1e-5, rtol=0)


def test_killing_the_database_mid_commit_keeps_the_last_committed_version(tiny, monkeypatch):
    """The server dies while a save is streaming its chunks: the save fails with ConnectionError, and after
    a restart the previous version loads, whole, through the same store object (its pool reconnects)."""
    server = PostgresServer().start()
    try:
        url = server.dsn + "?connect_timeout=3"
        ctx = context(tiny, PREFIX)
        reference = ctx.next_logits(PROBE)
        store = ContextStore(url, chunk_bytes=1024)
        committed = store.save(ctx)
        ctx.append(list(range(100, 180)))
        blocked, release, calls = threading.Event(), threading.Event(), []
        real_tensor_bytes = chunking.tensor_bytes

        def stalling_tensor_bytes(tensor):
            if threading.current_thread().name == "saver":
                calls.append(1)
                if len(calls) == 30:  # well into the chunks, inside the save's transaction
                    blocked.set()
                    release.wait(60)
            return real_tensor_bytes(tensor)

        monkeypatch.setattr(chunking, "tensor_bytes", stalling_tensor_bytes)
        errors: list[BaseException] = []

        def save() -> None:
            try:
                store.save(ctx, expected_version=committed.version)
            except BaseException as exc:
                errors.append(exc)

        saver = threading.Thread(target=save, name="saver")
        saver.start()
        assert blocked.wait(60), "the save never reached its chunks"
        server.kill()
        release.set()
        saver.join(60)
        assert len(errors) == 1 and isinstance(errors[0], ConnectionError), errors
        assert "cannot be reached" in str(errors[0]) and f"127.0.0.1:{server.port}" in str(errors[0])
        monkeypatch.undo()
        server.start()
        loaded, version = store.load_versioned("conv", *tiny)
        assert version == committed.version and loaded.token_ids == PREFIX
        torch.testing.assert_close(loaded.next_logits(PROBE), reference, atol=1e-6, rtol=0)
        assert store.save(ctx, expected_version=committed.version).version > committed.version
        store.close()
    finally:
        server.remove()


def test_an_unreachable_database_is_a_clear_connection_error(tiny):
    """Down before opening, and down while open: ConnectionError naming the URL without its password,
    within the connect timeout, never a hang."""
    server = PostgresServer()
    try:
        password_url = f"postgresql://hcmemory:s3cret@127.0.0.1:{server.port}/postgres?connect_timeout=2"
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=f"hcmemory:\\*\\*\\*@127.0.0.1:{server.port}.*cannot be reached"
                           ) as info:
            ContextStore(password_url)
        assert "s3cret" not in str(info.value) and time.monotonic() - started < 10
        server.start()
        store = ContextStore(server.dsn + "?connect_timeout=2")
        store.save(context(tiny, PREFIX[:20]))
        server.kill()
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{server.port}.*cannot be reached"):
            store.list()
        assert time.monotonic() - started < 15
        store.close()
    finally:
        server.remove()


def test_schema_setup_is_safe_from_two_processes_at_once_and_a_newer_schema_is_refused(postgres):
    """Two connections set up one empty database at the same moment: the advisory lock makes them take
    turns, so the tables are created once and both succeed.  A schema newer than this code is refused."""
    import psycopg

    from hcmemory.stores import postgres as postgres_backend

    name = f"fresh_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
    start, errors = threading.Barrier(2), []

    def setup() -> None:
        start.wait()
        try:
            postgres_backend.migrate(url, url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=setup) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM hcmemory_schema").fetchall() == [(postgres_backend.SCHEMA_VERSION,)]
        conn.execute("UPDATE hcmemory_schema SET version = 99")
    with pytest.raises(CheckpointError, match="schema version 99 is newer.*upgrade hcmemory"):
        ContextStore(url)
