"""One conversation's memory belongs to it: ownership, isolation and races in ``ContextPool``.

Each test reproduces a failure of the earlier pool (a named conversation taken over by another
caller, a foreign or damaged checkpoint reused or fatal, a deadlock between a stream and a spill, a
race on token lists, a closed context kept live, a rejected request leaking a context, a window
overrun) and checks the behaviour that replaces it.  The last test runs two callers per engine, two
engines of different presets on one store, with streams and spills, and compares every answer with
a run of the same requests by one caller.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from hcmemory import ContextInUseError, ContextPool, ContextStore, HCConfig, HCContext
from hcmemory.engine import Engine
from hcmemory.pool import REUSE_TAG

from .conftest import tiny_model

DOC = ("The harbor office keeps its spare keys in the blue cabinet. The night ferry leaves at eleven. "
       "The vault code is 58213 and only the manager knows it.")
JOIN_SECONDS = 120


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def run_all(threads: list[threading.Thread]) -> None:
    """Start, join with a timeout, and fail (instead of hanging) when a thread is still blocked."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_SECONDS)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    assert not stuck, f"deadlock: {stuck} still running after {JOIN_SECONDS} s"


def worker(target, errors: list[BaseException], name: str) -> threading.Thread:
    def body() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    return threading.Thread(target=body, name=name, daemon=True)  # daemon: a deadlocked test still lets pytest exit


def stored_headers(path: Path) -> dict[str, dict]:
    """Every checkpoint header in a store file, by context id, read with plain sqlite3."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT context_id, header FROM checkpoints").fetchall()
    return {context_id: json.loads(header) for context_id, header in rows}


def write_header(path: Path, context_id: str, header: bytes) -> None:
    """Replace a checkpoint's header as it is, bypassing ContextStore."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE checkpoints SET header = ? WHERE context_id = ?", (header, context_id))


# --- 1. ownership -----------------------------------------------------------------------------------------


def test_a_named_context_is_never_taken_over(smollm2):
    model, tokenizer = smollm2
    pool = ContextPool(model, tokenizer, config="full")
    owned = pool.get("agent-thread")
    owned.metadata["owner"] = "alice"
    prompt = ids(tokenizer, DOC + " Question: when does the ferry leave?")
    pool.generate(prompt, context_id="agent-thread", max_new_tokens=3).text()
    held = list(owned.token_ids)

    other = pool.generate(ids(tokenizer, DOC + " Question: what is the vault code?"), max_new_tokens=3)
    other.text()
    assert other.info.context_id != "agent-thread" and other.info.tokens_reused == 0
    assert owned.token_ids == held and owned.metadata == {"owner": "alice"}
    assert pool.match(prompt)[0] == other.info.context_id  # the anonymous one, never the named one


def test_a_reused_checkpoint_is_forked_without_its_metadata(smollm2, tmp_path):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "kv.sqlite") as store:
        pool = ContextPool(model, tokenizer, store, config="full")
        original = HCContext(model, tokenizer, "full", context_id="someone")
        original.append(ids(tokenizer, DOC))
        original.metadata["owner"] = "alice"
        store.save(original, tag=REUSE_TAG)  # an anonymous context the pool spilled earlier
        answer = pool.generate(ids(tokenizer, DOC + " Question: what is the vault code?"), max_new_tokens=3)
        answer.text()
        assert answer.info.context_id != "someone" and answer.info.tokens_reused >= len(original) - 1
        assert pool.get(answer.info.context_id).metadata == {}
        assert store.token_ids("someone", REUSE_TAG) == original.token_ids  # the original is unchanged


def test_reuse_never_changes_the_original_and_pinning_takes_a_context_out(smollm2):
    model, tokenizer = smollm2
    pool = ContextPool(model, tokenizer, config="full")
    first = pool.generate(ids(tokenizer, DOC + " Question: when does the ferry leave?"), max_new_tokens=3)
    first.text()
    source = first.info.context_id
    question = ids(tokenizer, DOC + " Question: what is the vault code?")
    assert pool.match(question)[0] == source
    fork = pool.generate(question, max_new_tokens=3)
    fork.text()
    assert fork.info.context_id != source and fork.info.tokens_reused > 0
    original = pool.get(source)  # pinned from now on: never a candidate again
    assert original.token_ids[:len(question)] != question
    assert tokenizer.decode(original.token_ids).startswith(DOC + " Question: when does the ferry leave?")
    assert pool.match(ids(tokenizer, DOC + " Question: when"))[0] != source


# --- 2. what the store holds ---------------------------------------------------------------------------------


def test_a_checkpoint_of_another_config_is_not_reused(smollm2, tmp_path):
    model, tokenizer = smollm2
    prompt = ids(tokenizer, DOC + " Question: when does the ferry leave?")
    with ContextStore(tmp_path / "kv.sqlite") as store:
        full = ContextPool(model, tokenizer, store, config="full")
        full.generate(prompt, max_new_tokens=3).text()
        full.close()
        compressed = ContextPool(model, tokenizer, store, config="hc-12.5")
        answer = compressed.generate(prompt + ids(tokenizer, " And the code?"), max_new_tokens=3)
        answer.text()
        assert answer.info.tokens_reused == 0
        assert compressed.get(answer.info.context_id).config.key_codec == compressed.config.key_codec


def test_a_checkpoint_of_another_model_is_not_reused(smollm2, tmp_path):
    model, tokenizer = smollm2
    other_model = tiny_model("llama", vocab_size=model.config.vocab_size)
    prompt = ids(tokenizer, DOC)
    with ContextStore(tmp_path / "kv.sqlite") as store:
        foreign = ContextPool(other_model, tokenizer, store, config="full")
        foreign.generate(prompt, max_new_tokens=2).text()
        foreign.close()
        pool = ContextPool(model, tokenizer, store, config="full")
        answer = pool.generate(prompt + ids(tokenizer, " Question: the code?"), max_new_tokens=3)
        answer.text()
        assert answer.info.tokens_reused == 0


def test_damaged_or_mislabelled_stored_entries_are_skipped_and_logged(smollm2, tmp_path, caplog):
    model, tokenizer = smollm2
    path = tmp_path / "kv.sqlite"
    prompts = [ids(tokenizer, text + " Question: when does it open?") for text in
               (DOC, "The museum on the hill opens at nine and its east wing is closed on Mondays for cleaning.")]
    with ContextStore(path) as store:
        writer = ContextPool(model, tokenizer, store, config="full")
        for prompt in prompts:
            writer.generate(prompt, max_new_tokens=2).text()
        writer.close()
    headers = stored_headers(path)
    assert len(headers) == 2
    damaged, mislabelled = sorted(headers)
    write_header(path, damaged, b'{"format_version": 6, "token_ids": [1, 2')
    headers[mislabelled]["model_fingerprint"] = "0" * 64  # claims to fit this pool, was made by another model
    write_header(path, mislabelled, json.dumps(headers[mislabelled]).encode())

    with ContextStore(path) as store, caplog.at_level(logging.INFO, logger="hcmemory"):
        pool = ContextPool(model, tokenizer, store, config="full")
        for prompt in prompts:
            answer = pool.generate(prompt + ids(tokenizer, " Answer:"), max_new_tokens=2)
            answer.text()
            assert answer.info.tokens_reused == 0
    skipped = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert any(damaged in message and "damaged" in message for message in skipped)
    assert any(mislabelled in message and "another configuration, model" in message for message in skipped)


# --- 3. lock order ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["spill", "close"])
def test_spill_and_close_wait_for_a_busy_context_without_the_pool_lock(smollm2, tmp_path, call):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "kv.sqlite") as store:
        pool = ContextPool(model, tokenizer, store, config="full")
        busy = pool.get("busy")
        busy.append(DOC)
        streaming, spilling, errors = threading.Event(), threading.Event(), []

        def stream() -> None:
            for _ in busy.stream("When does the ferry leave?", max_new_tokens=4):
                if not streaming.is_set():
                    streaming.set()
                    assert spilling.wait(timeout=60)
                    time.sleep(0.3)  # let the other thread reach the busy context
                    pool.get("from-inside")  # a pool call from inside the stream

        def spill() -> None:
            assert streaming.wait(timeout=60)
            spilling.set()
            pool.spill("busy") if call == "spill" else pool.close()

        run_all([worker(stream, errors, "stream"), worker(spill, errors, call)])
        assert not errors, errors
        assert "busy" not in pool.live_ids and store.exists("busy")
        assert len(store.token_ids("busy")) > len(ids(tokenizer, DOC))  # saved after the streamed turn


# --- 4. races on token ids --------------------------------------------------------------------------------


def test_match_is_safe_while_contexts_are_truncated_and_committed(smollm2):
    model, tokenizer = smollm2
    pool = ContextPool(model, tokenizer, config="full")
    text = ids(tokenizer, (DOC + " ") * 4)
    named = pool.get("named")
    named.append(text)
    prompt = text + ids(tokenizer, " Question: the code?")
    errors: list[BaseException] = []
    done = threading.Event()

    def churn_named() -> None:
        for _ in range(3):
            named.truncate(5)
            named.append(text[5:])

    def churn_anonymous() -> None:
        for n in range(3):
            pool.generate(text + ids(tokenizer, f" Question {n}:"), max_new_tokens=2).text()

    def matcher() -> None:
        while not done.is_set():
            context_id, shared = pool.match(prompt)
            assert shared <= len(prompt)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        churners = [worker(churn_named, errors, "truncate"), worker(churn_anonymous, errors, "commit")]
        reader = worker(matcher, errors, "match")
        reader.start()
        run_all(churners)
        done.set()
        reader.join(timeout=JOIN_SECONDS)
        assert not reader.is_alive()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors


# --- 5. closed contexts -----------------------------------------------------------------------------------


def test_a_context_closed_by_its_user_leaves_the_pool(smollm2):
    model, tokenizer = smollm2
    pool = ContextPool(model, tokenizer, max_host_bytes=0, config="full")
    closed = pool.get("a")
    closed.append(DOC)
    closed.close()
    assert "a" not in pool.live_ids and "a" not in pool
    fresh = pool.get("a")
    assert fresh is not closed and fresh.token_ids == []
    fresh.close()
    answer = pool.generate(ids(tokenizer, DOC + " Question: the code?"), max_new_tokens=2)  # the cap spills idle ones
    answer.text()
    assert pool.live_ids == [answer.info.context_id]


# --- 6. rejected requests -----------------------------------------------------------------------------------


def test_a_rejected_request_leaves_the_pool_as_it_was(smollm2, tmp_path):
    model, tokenizer = smollm2
    prompt = ids(tokenizer, DOC)
    window = model.config.max_position_embeddings
    with ContextStore(tmp_path / "kv.sqlite") as store:
        pool = ContextPool(model, tokenizer, store, config="full")
        pool.generate(prompt + ids(tokenizer, " Question: the code?"), context_id="named", max_new_tokens=2).text()
        anonymous = pool.generate(prompt + ids(tokenizer, " Question: the ferry?"), max_new_tokens=2)
        anonymous.text()
        pool.spill("named")
        before = (pool.live_ids, pool.live_bytes(), store.list(), pool.match(prompt))
        bad = [((), {}), (" ", {}), (["a"], {}), ([model.config.vocab_size], {}), (prompt, {"max_new_tokens": 0}),
               (prompt, {"temperature": -1.0}), (prompt, {"max_new_tokens": window})]
        for context_id in (None, "named", "unknown", anonymous.info.context_id):
            for _ in range(5):
                for token_ids, sampling in bad:
                    with pytest.raises((TypeError, ValueError)):
                        pool.generate(token_ids, context_id, **sampling)
        assert (pool.live_ids, pool.live_bytes(), store.list(), pool.match(prompt)) == before
        assert "unknown" not in pool


def test_max_new_tokens_beyond_the_window_is_refused(smollm2):
    model, tokenizer = smollm2
    window = model.config.max_position_embeddings
    prompt = ids(tokenizer, DOC)
    room = window - len(prompt)
    pool = ContextPool(model, tokenizer, config="full")
    with pytest.raises(ValueError, match=rf"max_new_tokens={room + 1}.*{len(prompt)}.*{window}"):
        pool.generate(prompt, max_new_tokens=room + 1)
    with pytest.raises(ValueError, match=rf"max_new_tokens={room + 1}.*{len(prompt)}.*{window}"):
        HCContext(model, tokenizer).generate(prompt, max_new_tokens=room + 1)
    assert pool.live_ids == []
    pool.generate(prompt, max_new_tokens=room).close()  # up to the window is accepted
    assert len(pool.live_ids) == 1


def test_an_answer_that_would_cross_the_window_is_refused_in_ask_chat_and_stream(smollm2):
    model, tokenizer = smollm2
    window = model.config.max_position_embeddings
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    before = list(ctx.token_ids)
    for call in (ctx.ask, ctx.chat, lambda q, **kw: "".join(ctx.stream(q, **kw))):
        with pytest.raises(ValueError, match=rf"max_new_tokens={window}.*runs past the model's window of {window}"):
            call("What is the vault code?", max_new_tokens=window)
    assert ctx.token_ids == before  # nothing was kept
    assert ctx.ask("What is the vault code?", max_new_tokens=2)


# --- two callers, two engines, one store ---------------------------------------------------------------------


PRESETS = ("full", "hc-12.5")
TURNS = ("When does the night ferry leave?", "And where are the spare keys?")
QUESTIONS = ("What is the vault code?", "Who knows the code?", "Where are the keys?")


def conversation_requests(engine: Engine, preset: str, answers: dict, pinned: bool) -> list:
    """The requests one caller makes, each built from the answers it already got (a chat history)."""
    if pinned:
        history = [{"role": "user", "content": DOC}]

        def turn(n: int):
            if n:
                history.append({"role": "assistant", "content": answers[(preset, "pinned", n - 1)]})
            history.append({"role": "user", "content": TURNS[n]})
            return engine.message_ids(history), f"{preset}-thread"

        return [lambda n=n: turn(n) for n in range(len(TURNS))]
    # The stateless caller repeats the pinned conversation's first message, then asks its own question.
    return [lambda q=q: (engine.message_ids([{"role": "user", "content": DOC},
                                             {"role": "user", "content": q}]), None) for q in QUESTIONS]


def run_caller(engine: Engine, preset: str, pinned: bool, answers: dict, seen: dict, inside=None) -> None:
    name = "pinned" if pinned else "stateless"
    for n, request in enumerate(conversation_requests(engine, preset, answers, pinned)):
        token_ids, context_id = request()
        generation = engine.generate(token_ids, context_id, max_new_tokens=4)
        pieces = []
        for piece in generation:  # a stream
            if inside is not None and not pieces:
                inside(engine)
            pieces.append(piece)
        answers[(preset, name, n)] = "".join(pieces)
        seen[(preset, name, n)] = generation.info.context_id, generation.info.tokens_reused


def test_two_callers_two_engines_one_store_match_a_one_caller_run(smollm2, tmp_path):
    def engines(path: Path) -> dict[str, Engine]:
        return {preset: Engine(None, preset, path, max_host_bytes=0) for preset in PRESETS}

    alone, alone_seen = {}, {}
    single = engines(tmp_path / "single.sqlite")
    for preset, engine in single.items():
        for pinned in (True, False):
            run_caller(engine, preset, pinned, alone, alone_seen)
    alone_tokens = {preset: list(engine.pool.get(f"{preset}-thread").token_ids) for preset, engine in single.items()}

    shared = engines(tmp_path / "shared.sqlite")
    answers, seen, errors = {}, {}, []
    finished = threading.Event()

    def look_around(engine: Engine) -> None:  # pool calls from inside a stream
        engine.pool.live_ids, engine.pool.live_bytes(), engine.pool.match([1, 2, 3])

    def janitor() -> None:
        for _ in range(40):
            if finished.is_set():
                return
            for engine in shared.values():
                for context_id in engine.pool.live_ids[:1]:
                    try:
                        engine.pool.spill(context_id)
                    except (KeyError, RuntimeError):  # already gone, or in use by a generation
                        pass
            time.sleep(0.02)

    callers = [worker(lambda e=engine, p=preset, pin=pinned: run_caller(e, p, pin, answers, seen, look_around),
                      errors, f"{preset}-{'pinned' if pinned else 'stateless'}")
               for preset, engine in shared.items() for pinned in (True, False)]
    sweeper = worker(janitor, errors, "janitor")
    sweeper.start()
    run_all(callers)
    finished.set()
    sweeper.join(timeout=JOIN_SECONDS)
    assert not sweeper.is_alive() and not errors, errors

    assert answers == alone
    for (preset, name, n), (context_id, reused) in seen.items():
        assert (context_id == f"{preset}-thread") == (name == "pinned")
        assert (reused > 0) == (n > 0)  # every later request was served from memory (live, or reloaded)
    for preset, engine in shared.items():
        assert engine.pool.get(f"{preset}-thread").token_ids == alone_tokens[preset]
        engine.pool.close()
    for engine in single.values():
        engine.pool.close()


# --- registering and deleting contexts ------------------------------------------------------------------------


def test_add_registers_a_named_context_and_refuses_to_replace_one(smollm2, tmp_path):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "s.sqlite") as store:
        pool = ContextPool(model, tokenizer, store, config="full")
        mine = HCContext(model, tokenizer, "hc-12.5", context_id="mine")
        mine.append(DOC)
        pool.add(mine)
        assert pool.get("mine") is mine
        prompt = list(mine.token_ids) + ids(tokenizer, " Question: when does the ferry leave?")
        gen = pool.generate(prompt, max_new_tokens=2)
        gen.text()
        assert gen.info.context_id != "mine" and gen.info.tokens_reused == 0  # a named context is no candidate
        with pytest.raises(ValueError, match="already exists"):
            pool.add(HCContext(model, tokenizer, "full", context_id="mine"))
        pool.spill("mine")
        with pytest.raises(ValueError, match="already exists"):  # stored counts too
            pool.add(HCContext(model, tokenizer, "full", context_id="mine"))
        again = pool.get("mine")
        assert again.token_ids == mine.token_ids and again.config.to_dict() == HCConfig.preset("hc-12.5").to_dict()


def test_delete_forgets_live_and_stored_state_and_never_brings_it_back(smollm2, tmp_path):
    model, tokenizer = smollm2
    with ContextStore(tmp_path / "s.sqlite") as store:
        pool = ContextPool(model, tokenizer, store, config="full")
        prompt = ids(tokenizer, DOC + " Question: when does the ferry leave?")
        gen = pool.generate(prompt, max_new_tokens=2)
        gen.text()
        anonymous = gen.info.context_id
        pool.spill(anonymous)
        named = pool.get("named")
        named.append(DOC)
        held = pool.generate(prompt, context_id="named", max_new_tokens=2)
        with pytest.raises(ContextInUseError):
            pool.delete("named")
        held.text()
        pool.delete("named")
        pool.delete(anonymous)
        assert named.closed and pool.live_ids == [] and store.list() == []
        with pytest.raises(KeyError, match="neither live nor stored"):
            pool.delete("named")
        again = pool.generate(prompt, max_new_tokens=2)
        again.text()
        assert again.info.tokens_reused == 0  # the deleted candidate is not matched any more
