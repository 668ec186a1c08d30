"""``hcmemory serve --ray`` end to end: a real local Ray cluster, the ingress and two model replicas on
Ray Serve, driven through Serve's HTTP proxy on 127.0.0.1 by the real ``openai`` client.

Six conversations of three turns each must each stay on one replica; then the replica owning one of them
is killed: that conversation's next turn is answered by another replica, restored from the shared store
and prefilling only the new turn's tokens, with the same greedy answer as a single-process run; every
other conversation answers its next turn with nothing lost either (the same reuse and answers as if
nothing had happened).  The single-process run is computed first, in this process, with a plain
``ContextPool`` of the same preset: it gives the expected answers and the tokens a live continuation reuses.

The replicas share a PostgreSQL database (the ``postgres`` fixture), the store of a deployment on many
machines; the SQLite directory of a one-machine deployment goes through the same ``open_store`` and is
covered by the single-process server's tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hcmemory import ContextPool, load_model  # noqa: E402
from hcmemory.config import HCConfig  # noqa: E402
from hcmemory.serve import ServeSettings  # noqa: E402
from hcmemory.serve.cluster import APP_NAME, build  # noqa: E402
from hcmemory.serve.stores import open_store  # noqa: E402

from .ports import free_port  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 6
CONVERSATIONS = [f"conv-{i}" for i in range(6)]
QUESTIONS = ["Hi! My name is {name}.", "What is my name?", "Say a colour.", "Say a number."]
NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo"]
DEADLINE_S = 120.0
"""Longest wait for anything asynchronous (a checkpoint landing, a replacement replica): a bound on a
stuck test, not a timing assertion."""


@dataclass
class Reference:
    """One conversation run in a single process: the answers and what each turn reused and prefilled."""

    answers: list[str] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    prefilled: list[int] = field(default_factory=list)


def _messages(conversation: int, turns: int, answers: list[str]) -> list[dict[str, str]]:
    messages = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn].format(name=NAMES[conversation])})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": answers[turn]})
    return messages


@pytest.fixture(scope="module")
def reference() -> dict[str, Reference]:
    """Every conversation's four turns answered by one in-process pool, rendered as the server renders them."""
    model, tokenizer = load_model()
    pool = ContextPool(model, tokenizer, config=HCConfig.from_spec(ServeSettings().preset))
    found = {}
    for i, conversation in enumerate(CONVERSATIONS):
        ref = found[conversation] = Reference()
        for turn in range(len(QUESTIONS)):
            text = tokenizer.apply_chat_template(_messages(i, turn + 1, ref.answers), tokenize=False,
                                                 add_generation_prompt=True)
            generation = pool.generate(tokenizer(text, add_special_tokens=False).input_ids, conversation,
                                       max_new_tokens=MAX_TOKENS, temperature=0.0)
            ref.answers.append("".join(generation))
            ref.reused.append(generation.info.tokens_reused)
            ref.prefilled.append(generation.info.tokens_prefilled)
    pool.close()
    return found



@pytest.fixture(scope="module")
def store(postgres) -> str:
    """The store the replicas share: a database of its own on the test server."""
    return postgres.database(f"ray_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def cluster(reference: dict[str, Reference], store: Path | str) -> Iterator[tuple[str, Path | str]]:
    """A local Ray cluster serving two model replicas and the ingress on 127.0.0.1; yields the base URL and
    the store."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(store=store, max_tokens_limit=32)
        serve.run(build(settings, replicas=2, replica_cpus=0.5, failover_timeout_s=DEADLINE_S), name=APP_NAME,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}", store
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(base: str, conversation: str) -> "openai.OpenAI":
    # max_retries=0: a failover must be handled by the server, not hidden by the client's retries
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S,
                         default_headers={"x-session-id": conversation})


@dataclass
class Answer:
    text: str
    replica: str
    cached: int
    prefilled: int
    restored: bool


def _turn(base: str, conversation: str, turn: int, ref: Reference) -> Answer:
    i = CONVERSATIONS.index(conversation)
    raw = _client(base, conversation).chat.completions.with_raw_response.create(
        model=MODEL, messages=_messages(i, turn + 1, ref.answers), max_tokens=MAX_TOKENS)
    body = raw.parse()
    return Answer(body.choices[0].message.content, raw.headers["x-replica-id"],
                  body.usage.prompt_tokens_details.cached_tokens, int(raw.headers["x-tokens-prefilled"]),
                  "x-restore-ms" in raw.headers)


def _health(base: str, conversation: str) -> dict:
    """The /health of the replica owning ``conversation`` (the ingress routes it by x-session-id)."""
    return httpx.get(f"{base}/health", headers={"x-session-id": conversation}, timeout=DEADLINE_S).json()


def _wait_checkpointed(base: str, conversations: list[str]) -> None:
    """Poll each owner's /health until its checkpoints have all been written."""
    deadline = time.monotonic() + DEADLINE_S
    for conversation in conversations:
        while (health := _health(base, conversation))["checkpoints_pending"]:
            assert time.monotonic() < deadline, f"checkpoints still pending: {health}"
            time.sleep(0.2)
        assert health["status"] == "ok", health


def test_failover_restores_from_the_store(cluster: tuple[str, Path | str], reference: dict[str, Reference]) -> None:
    base, location = cluster
    owners: dict[str, str] = {}
    for turn in range(3):
        for conversation in CONVERSATIONS:
            ref = reference[conversation]
            answer = _turn(base, conversation, turn, ref)
            assert answer.text == ref.answers[turn], (conversation, turn)
            assert owners.setdefault(conversation, answer.replica) == answer.replica, \
                f"{conversation} moved from {owners[conversation]} to {answer.replica} on turn {turn}"
            assert not answer.restored and answer.cached == ref.reused[turn], (conversation, turn, answer)
    before = set(owners.values())
    _wait_checkpointed(base, CONVERSATIONS)

    # Every conversation's three turns are in the shared store, as a single process holds them.
    store = open_store(location, "default")
    try:
        assert set(CONVERSATIONS) <= set(store.list())
    finally:
        store.close()

    victim = CONVERSATIONS[0]
    killed = owners[victim]
    ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)

    answer = _turn(base, victim, 3, reference[victim])
    ref = reference[victim]
    assert answer.replica != killed
    assert answer.restored, "the new owner should have loaded the conversation from the store"
    assert answer.text == ref.answers[3]
    # Restored from the last checkpoint: exactly what a live continuation reuses, only the new turn prefilled.
    assert (answer.cached, answer.prefilled) == (ref.reused[3], ref.prefilled[3])
    assert answer.prefilled < answer.cached

    for conversation in CONVERSATIONS[1:]:
        ref = reference[conversation]
        answer = _turn(base, conversation, 3, ref)
        assert answer.text == ref.answers[3], conversation
        assert (answer.cached, answer.prefilled) == (ref.reused[3], ref.prefilled[3]), (conversation, answer)
        if owners[conversation] == killed:
            assert answer.replica != killed and answer.restored, (conversation, answer)
        elif answer.replica == owners[conversation]:
            assert not answer.restored, f"{conversation} stayed on its replica and should have been live there"
        else:  # Ray's ring gives the replacement replica some of the survivor's conversations too
            assert answer.replica not in before and answer.restored, (conversation, answer)


def test_shutdown_saves_live_contexts(cluster: tuple[str, Path | str]) -> None:
    """A request without a session id is not checkpointed per turn; Serve's shutdown saves it (last test:
    it ends the deployment the module's cluster serves)."""
    base, location = cluster
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, max_tokens=MAX_TOKENS,
                                                           messages=[{"role": "user", "content": "Hello there."}])
    context_id = raw.headers["x-context-id"]
    store = open_store(location, "default")
    try:
        assert context_id not in store
        serve.shutdown()
        assert context_id in store
    finally:
        store.close()
