"""``hcmemory serve --store postgresql://…``: the server on a real PostgreSQL (the ``postgres`` fixture).

* Tenants share one database, each in a namespace named by the sha256 of the tenant: a restarted server
  continues a conversation from its checkpoint, and no tenant is ever served another's rows.
* The database goes down: the server answers what it holds live, reports ``degraded`` and, once the
  database is back, writes the pending checkpoints and reports ``ok``.
* Compare-and-set: two pools owning one conversation (a failover between replicas) — the one whose copy
  is older is refused, drops its copy, and the stored checkpoint stays the other's.

Waits are bounded polls with deadlines, never timing assertions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("psycopg")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from hcmemory import ContextPool  # noqa: E402
from hcmemory.serve import ServeSettings, create_app  # noqa: E402
from hcmemory.serve.checkpoints import Checkpointer  # noqa: E402
from hcmemory.serve.stores import check_location, check_reachable, open_store  # noqa: E402
from hcmemory.stores import ContextStore, StaleCheckpointError  # noqa: E402

from .conftest import tiny_model  # noqa: E402
from .ports import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
DEADLINE_S = 120.0
"""Longest wait for anything asynchronous: a bound on a stuck test, not a timing assertion."""
DOCUMENT = " ".join(f"Record {i}: the ferry {name} leaves pier {i + 3} at {7 + i % 5} o'clock."
                    for i, name in enumerate(["Aster", "Birch", "Cedar", "Dahlia", "Elm", "Fern", "Gorse", "Hazel",
                                              "Iris", "Juniper", "Kale", "Larch", "Maple", "Nettle", "Olive"]))



@pytest.fixture(scope="module")
def database(postgres) -> str:
    """A database of this module's own (so its rows can be counted), failing fast while it is down."""
    return postgres.database("serve_tests") + "?connect_timeout=2"


@contextmanager
def _running(settings: ServeSettings) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-serve-postgres", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert thread.is_alive(), "the server ended before it was ready"
            assert time.monotonic() < deadline, f"{base} did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not shut down"


def _settings(database: str) -> ServeSettings:
    return ServeSettings(port=free_port(), store=database, checkpoint_each_turn=True, max_tokens_limit=16)


def _ask(base: str, tenant: str, session: str, messages: list[dict]) -> tuple[str, object, httpx.Headers]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S,
                           default_headers={"x-tenant-id": tenant, "x-session-id": session})
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=4)
    body = raw.parse()
    return body.choices[0].message.content, body.usage, raw.headers


def _health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=DEADLINE_S).json()


def _wait_health(base: str, done: Callable[[dict], bool], what: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while not done(health := _health(base)):
        assert time.monotonic() < deadline, f"{what}: {health}"
        time.sleep(0.2)
    return health


def _namespace(tenant: str) -> str:
    return hashlib.sha256(f"tenant:{tenant}".encode()).hexdigest()


def _rows(database: str) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        return conn.execute("SELECT namespace, context_id FROM hcmemory_checkpoints").fetchall()


# --- settings --------------------------------------------------------------------------------------


def test_store_urls_are_checked_and_unreachable_databases_named(database):
    assert check_location(database) == database  # kept as given, connected to nowhere yet
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL"):
        ServeSettings(store="postgresql://hcmemory@127.0.0.1:5432/db?nonsense=1")
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL") as malformed:  # psycopg quotes the URL
        ServeSettings(store="postgresql://hcmemory:secret@[::1/db")
    assert "secret" not in str(malformed.value) and malformed.value.__cause__ is None
    with pytest.raises(ValueError, match="only postgresql:// URLs and directories"):
        ServeSettings(store="redis://127.0.0.1/0")
    nowhere = f"postgresql://hcmemory:secret@127.0.0.1:{free_port()}/postgres?connect_timeout=2"
    settings = ServeSettings(store=nowhere, api_keys=("sk-private",))  # checked before anything starts
    assert "secret" not in repr(settings) and "sk-private" not in repr(settings)  # reprs reach logs and Ray
    with pytest.raises(ConnectionError, match="cannot be reached") as refused:
        check_reachable(settings.store)
    assert "secret" not in str(refused.value) and "hcmemory:***@" in str(refused.value)
    # the command says so and ends before loading anything, rather than serve nothing but 503s
    command = subprocess.run([sys.executable, "-m", "hcmemory.cli", "serve", "--store", nowhere], cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert command.returncode == 1 and "cannot be reached" in command.stderr and "secret" not in command.stderr


# --- tenants in one database, across a restart -----------------------------------------------------


def test_a_restarted_server_continues_from_the_shared_database(database):
    session = f"ferries-{uuid.uuid4().hex[:8]}"
    history = {tenant: [{"role": "user", "content": f"{DOCUMENT}\n\nRemember the word {word}. Which ferry leaves "
                                                    "pier 3?"}]
               for tenant, word in (("red", "TANGERINE"), ("blue", "ZUCCHINI"))}
    with _running(_settings(database)) as base:
        for tenant, messages in history.items():
            answer, usage, _ = _ask(base, tenant, session, messages)
            assert usage.prompt_tokens_details.cached_tokens == 0  # the same session id, two conversations
            messages.append({"role": "assistant", "content": answer})
        _wait_health(base, lambda h: h["checkpoints_pending"] == 0 and h["checkpoints_written"] >= 2,
                     "checkpoints still pending")

    # Each tenant's rows sit in its own namespace, the hash of the tenant: the name itself is never stored.
    rows = [row for row in _rows(database) if row[1] == session]
    assert sorted(rows) == sorted([(_namespace("red"), session), (_namespace("blue"), session)])

    with _running(_settings(database)) as base:  # a new server: nothing live, everything from the database
        for tenant, other in (("red", "ZUCCHINI"), ("blue", "TANGERINE")):
            messages = history[tenant] + [{"role": "user", "content": "And pier 4?"}]
            _, usage, headers = _ask(base, tenant, session, messages)
            assert "x-restore-ms" in headers, "the conversation should have been loaded from its checkpoint"
            cached = usage.prompt_tokens_details.cached_tokens
            assert 0.95 * usage.prompt_tokens <= cached < usage.prompt_tokens, (tenant, usage)
            text = httpx.get(f"{base}/v1/contexts/{session}", params={"include_text": "true"},
                             headers={"x-tenant-id": tenant}, timeout=DEADLINE_S).json()["text"]
            assert other not in text, f"{tenant} was served another tenant's rows"
        # a tenant that never wrote sees nothing of the others, though they share the database
        missing = httpx.get(f"{base}/v1/contexts/{session}", headers={"x-tenant-id": "green"}, timeout=DEADLINE_S)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "context_not_found"


# --- the database down ------------------------------------------------------------------------------


def test_the_server_answers_from_memory_while_the_database_is_down(database, postgres):
    session = f"outage-{uuid.uuid4().hex[:8]}"
    messages = [{"role": "user", "content": f"{DOCUMENT}\n\nWhich ferry leaves pier 5?"}]
    with _running(_settings(database)) as base:
        answer, _, _ = _ask(base, "red", session, messages)
        _wait_health(base, lambda h: h["checkpoints_pending"] == 0 and h["status"] == "ok", "first checkpoint")
        written = _health(base)["checkpoints_written"]
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And pier 6?"}]

        postgres.stop("immediate")
        try:
            answer, usage, _ = _ask(base, "red", session, messages)  # live here: no database needed
            assert usage.prompt_tokens_details.cached_tokens >= 0.95 * usage.prompt_tokens
            held = usage.prompt_tokens + usage.completion_tokens
            health = _wait_health(base, lambda h: h["status"] == "degraded", "not reported degraded")
            assert "cannot be reached" in health["store_error"] and health["checkpoints_pending"] >= 1
            assert "127.0.0.1" not in health["store_error"]  # /health needs no key: no address of the store
            # a conversation that is not live needs the store: refused as such, not as a server error
            chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            refused = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=DEADLINE_S,
                                 headers={"x-tenant-id": "red", "x-session-id": "new"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable", refused.text
            message = refused.json()["error"]["message"]  # a caller is told what to do, not where the store is
            assert "127.0.0.1" not in message and str(postgres.port) not in message, message
        finally:
            postgres.start()
        health = _wait_health(base, lambda h: h["status"] == "ok" and h["checkpoints_pending"] == 0,
                              "pending checkpoints not written after the database came back")
        assert health["store_error"] is None and health["checkpoints_written"] > written

    with ContextStore(database, namespace=_namespace("red")) as store:
        assert len(store.token_ids(session)) == held  # the turn answered during the outage is stored


# --- compare-and-set between two owners --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(smollm2):
    return tiny_model("llama"), smollm2[1]


def _turn(pool: ContextPool, context_id: str, tokens: list[int]) -> None:
    held = list(pool.get(context_id).token_ids)
    list(pool.generate(held + tokens, context_id, max_new_tokens=2))


def test_a_stale_owner_is_refused_and_drops_its_copy(database, tiny, caplog):
    conversation = f"moved-{uuid.uuid4().hex[:8]}"
    namespace = f"cas-{uuid.uuid4().hex[:8]}"
    with ContextStore(database, namespace=namespace) as store_a, ContextStore(database, namespace=namespace) as store_b:
        a = ContextPool(*tiny, store=store_a, config="full")
        b = ContextPool(*tiny, store=store_b, config="full")
        _turn(a, conversation, list(range(5, 40)))
        assert a.version(conversation) == 0  # new: its first save expects nothing stored
        first = a.save(conversation)
        assert first is not None and a.version(conversation) == first.version

        _turn(b, conversation, list(range(40, 60)))  # the conversation moved: B loads A's checkpoint...
        assert b.version(conversation) == first.version
        _turn(a, conversation, list(range(60, 70)))  # ...while A, not knowing, answers another turn
        newer = b.save(conversation)
        assert newer is not None and newer.version > first.version

        # A's per-turn checkpoint, through the server's writer: refused, not retried, A's copy dropped.
        model_thread = ThreadPoolExecutor(max_workers=1)

        def snapshot(tenant: str, context_id: str):
            return a, a.get(context_id).to_state(), a.version(context_id)

        writer = Checkpointer(snapshot, lambda job: model_thread.submit(job))
        try:
            with caplog.at_level(logging.WARNING, logger="hcmemory"):
                writer.mark("tenant", conversation)
                deadline = time.monotonic() + DEADLINE_S
                while (status := writer.status()).pending or status.written + status.refused == 0:
                    assert time.monotonic() < deadline, status
                    time.sleep(0.05)
        finally:
            writer.close()
            model_thread.shutdown()
        assert status.store == "ok" and status.written == 0 and status.refused == 1
        assert conversation not in a.live_ids
        assert any("refused" in r.getMessage() and conversation in r.getMessage() for r in caplog.records)
        assert store_a.version(conversation) == newer.version
        assert store_a.token_ids(conversation) == list(b.get(conversation).token_ids)

        # A's next turn loads B's checkpoint and goes on from it: its own saves are accepted again.
        again = a.get(conversation)
        assert list(again.token_ids) == store_a.token_ids(conversation) and a.version(conversation) == newer.version

        # Now B is the stale one: an explicit save raises and keeps the copy; a spill drops it, logged.
        _turn(a, conversation, list(range(70, 80)))
        latest = a.save(conversation)
        _turn(b, conversation, list(range(80, 90)))
        held = list(b.get(conversation).token_ids)
        with pytest.raises(StaleCheckpointError):
            b.save(conversation)
        assert list(b.get(conversation).token_ids) == held  # a refused save changed nothing
        b.spill(conversation)
        assert conversation not in b.live_ids
        assert store_b.version(conversation) == latest.version
        assert store_b.token_ids(conversation) == list(a.get(conversation).token_ids)
        a.close()
        b.close()


def test_the_default_server_store_keeps_one_sqlite_file_per_tenant(tmp_path):
    red, blue = open_store(tmp_path, "tenant:red"), open_store(tmp_path, "tenant:blue")
    try:
        assert red.path != blue.path and red.path.parent == blue.path.parent == tmp_path
        assert red.namespace == blue.namespace == ""  # the file is the tenant's own
    finally:
        red.close()
        blue.close()
