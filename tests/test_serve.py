"""``hcmemory serve`` end to end: real uvicorn servers on 127.0.0.1 driven by the real ``openai`` client,
LangChain's ``ChatOpenAI`` and LlamaIndex's ``OpenAILike``, on the embedded model.

Two servers share one model in this process: ``open_server`` names tenants by ``x-tenant-id`` and
``keyed_server`` by API key.  Both have small limits so that refusals are cheap to provoke.  Prompts are
short and answers a few tokens long; a conversation's first turn carries a ~400-token document, so that
a short second turn is almost all history and must come from memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from hcmemory.serve import ServeSettings, create_app  # noqa: E402

from .ports import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
KEYS = ("sk-tenant-a", "sk-tenant-b")
LIMITS = dict(max_tokens_limit=64, max_body_bytes=64 * 1024)
DOCUMENT = " ".join(
    f"Record {i}: the ferry {name} leaves pier {i + 3} at {7 + i % 5} o'clock and carries {20 + 3 * i} passengers."
    for i, name in enumerate(["Aster", "Birch", "Cedar", "Dahlia", "Elm", "Fern", "Gorse", "Hazel", "Iris", "Juniper",
                              "Kale", "Larch", "Maple", "Nettle", "Olive"]))



def _wait_ready(base: str, alive=lambda: True) -> None:
    for _ in range(1200):  # bounded: the model loads once per process, in seconds
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not alive():
            raise RuntimeError("the server ended before it was ready")
        time.sleep(0.1)
    raise RuntimeError(f"{base} did not become ready")


@contextmanager
def _running(settings: ServeSettings) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-serve", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    try:
        _wait_ready(base, thread.is_alive)
        yield base
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory) -> Iterator[str]:
    with _running(ServeSettings(port=free_port(), store=tmp_path_factory.mktemp("open"), **LIMITS)) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[str]:
    settings = ServeSettings(port=free_port(), store=tmp_path_factory.mktemp("keyed"), api_keys=KEYS, **LIMITS)
    with _running(settings) as base:
        yield base


def _client(base: str, key: str = "unused", **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, default_headers=headers or None, max_retries=0)


def _ask(client: openai.OpenAI, messages: list[dict], max_tokens: int = 6, **extra):
    """A chat completion and its x-context-id header."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                           **extra)
    return raw.parse(), raw.headers["x-context-id"]


def _context(base: str, context_id: str, **headers: str) -> dict:
    response = httpx.get(f"{base}/v1/contexts/{context_id}", params={"include_text": "true"}, headers=headers,
                         timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response) -> dict:
    """The OpenAI error shape, checked: every field present."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# --- conversations served from memory ----------------------------------------------------------------


def test_second_turn_is_served_from_memory(open_server):
    client = _client(open_server, **{"x-session-id": "ferries-1"})
    history = [{"role": "user", "content": f"{DOCUMENT}\n\nWhich ferry leaves pier 3?"}]
    first, context_id = _ask(client, history)
    assert context_id == "ferries-1"
    assert first.usage.prompt_tokens > 300
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nothing held it before

    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And pier 4?"}]
    second, _ = _ask(client, history)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.95 * second.usage.prompt_tokens, (cached, second.usage.prompt_tokens)
    assert cached < second.usage.prompt_tokens  # and the new message was really prefilled
    # the turn and its answer are what the context now holds
    assert _context(open_server, "ferries-1")["tokens"] == second.usage.prompt_tokens + second.usage.completion_tokens


def test_streaming_through_openai_matches_the_plain_answer(open_server):
    client = _client(open_server)
    messages = [{"role": "user", "content": "Name three colours."}]
    plain, _ = _ask(client, messages, extra_body={"session_id": f"plain-{uuid.uuid4().hex}"})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"session_id": f"streamed-{uuid.uuid4().hex}"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # greedy: the same answer, streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason

    completion = list(client.completions.create(model=MODEL, prompt="The ferry leaves at", max_tokens=4,
                                                stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in completion if c.choices)
    assert completion[-1].usage.prompt_tokens > 0


def test_concurrent_requests_decode_together_and_answer_as_sequential_ones(open_server, smollm2):
    """Requests in flight at once share each decode step's forward (the model's batcher runs steps of several
    answers in one forward) and get exactly the answers each gets alone, streamed or not."""
    from hcmemory.batching import shared_batcher

    prompts = [f"Count from {start}: {start}, {start + 1}, {start + 2}," for start in (1, 10, 20, 30)]

    def complete(prompt: str, stream: bool) -> str:
        client = _client(open_server, **{"x-session-id": f"together-{uuid.uuid4().hex}"})
        if stream:
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stream=True)
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24).choices[0].text

    alone = [complete(prompt, False) for prompt in prompts]
    counts = shared_batcher(smollm2[0]).counts
    steps, forwards = counts.steps, counts.forwards
    together: list[str | None] = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, complete(prompts[i], i % 2 == 1)))
               for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
        assert not thread.is_alive()
    assert together == alone
    assert counts.steps - steps > counts.forwards - forwards, "some forward ran several answers' steps"


def test_langchain_chat_openai_invokes_and_streams_from_memory(open_server):
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{open_server}/v1", api_key="unused", max_tokens=6, temperature=0,
                     max_retries=0, stream_usage=True, default_headers={"x-session-id": "langchain-1"})
    history = [HumanMessage(f"{DOCUMENT}\n\nWhich ferry leaves pier 5?")]
    first = llm.invoke(history)
    assert first.content and first.usage_metadata["input_token_details"].get("cache_read", 0) == 0
    history += [AIMessage(first.content), HumanMessage("And pier 6?")]
    streamed = None
    for chunk in llm.stream(history):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.content
    usage = streamed.usage_metadata
    assert usage["input_token_details"]["cache_read"] >= 0.95 * usage["input_tokens"], usage


def test_llamaindex_openai_like_chats_and_completes(open_server):
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    common = dict(model=MODEL, api_base=f"{open_server}/v1", api_key="unused", max_tokens=5, max_retries=0,
                  context_window=8192)
    chat = OpenAILike(is_chat_model=True, **common)
    assert chat.chat([ChatMessage(role="user", content="Say hello.")]).message.content
    plain = OpenAILike(is_chat_model=False, **common)
    assert plain.complete("The ferry Aster leaves").text


# --- tenants --------------------------------------------------------------------------------------


def test_tenants_never_share_memory(keyed_server):
    alice, bob = _client(keyed_server, KEYS[0]), _client(keyed_server, KEYS[1])
    question = f"{DOCUMENT}\n\nWhich ferry leaves pier 7? Answer for ALPHAFOX."
    first_a, context_a = _ask(alice, [{"role": "user", "content": question}])
    assert first_a.usage.prompt_tokens_details.cached_tokens == 0
    # the same document from another tenant: nothing reused across tenants
    first_b, context_b = _ask(bob, [{"role": "user", "content": question.replace("ALPHAFOX", "BRAVOWOLF")}])
    assert first_b.usage.prompt_tokens_details.cached_tokens == 0
    # the same tenant again: its own document is reused
    again, context_again = _ask(alice, [{"role": "user", "content": question.replace("ALPHAFOX", "CHARLIEOWL")}])
    assert again.usage.prompt_tokens_details.cached_tokens > 300

    a_text = _context(keyed_server, context_a, authorization=f"Bearer {KEYS[0]}")["text"]
    again_text = _context(keyed_server, context_again, authorization=f"Bearer {KEYS[0]}")["text"]
    b_text = _context(keyed_server, context_b, authorization=f"Bearer {KEYS[1]}")["text"]
    # reuse continues a copy-on-write fork: the first conversation is left as it was
    assert "ALPHAFOX" in a_text and "CHARLIEOWL" not in a_text and "BRAVOWOLF" not in a_text
    assert "CHARLIEOWL" in again_text and "BRAVOWOLF" not in again_text
    assert "BRAVOWOLF" in b_text and "ALPHAFOX" not in b_text and "CHARLIEOWL" not in b_text
    # a tenant cannot even name the other's context
    response = httpx.get(f"{keyed_server}/v1/contexts/{context_a}", headers={"authorization": f"Bearer {KEYS[1]}"})
    assert response.status_code == 404 and _error(response)["code"] == "context_not_found"


def test_the_same_session_id_in_two_tenants_is_two_conversations(open_server):
    session = f"shared-{uuid.uuid4().hex[:8]}"
    red = _client(open_server, **{"x-tenant-id": "red", "x-session-id": session})
    blue = _client(open_server, **{"x-tenant-id": "blue", "x-session-id": session})
    _ask(red, [{"role": "user", "content": "Remember the word TANGERINE."}], max_tokens=3)
    response = httpx.get(f"{open_server}/v1/contexts/{session}", headers={"x-tenant-id": "blue"})
    assert response.status_code == 404
    _ask(blue, [{"role": "user", "content": "Remember the word ZUCCHINI."}], max_tokens=3)
    assert "ZUCCHINI" not in _context(open_server, session, **{"x-tenant-id": "red"})["text"]
    assert "TANGERINE" not in _context(open_server, session, **{"x-tenant-id": "blue"})["text"]


def test_api_keys_are_required_when_configured(keyed_server):
    assert httpx.get(f"{keyed_server}/health").status_code == 200  # health stays open
    missing = httpx.get(f"{keyed_server}/v1/models")
    assert missing.status_code == 401 and _error(missing)["code"] == "invalid_api_key"
    wrong = httpx.post(f"{keyed_server}/v1/chat/completions", headers={"authorization": "Bearer sk-wrong"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert wrong.status_code == 401 and "wrong API key" in _error(wrong)["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(keyed_server, "sk-wrong").models.list()
    assert [m.id for m in _client(keyed_server, KEYS[1]).models.list().data] == [MODEL]


# --- bad input ------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    ("malformed JSON", "post", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, None),
    ("wrong type", "post", "/v1/chat/completions", {**CHAT, "max_tokens": "2"}, 422, "max_tokens"),
    ("wrong nested type", "post", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]},
     422, "messages[0].content"),
    ("missing field", "post", "/v1/completions", {"model": MODEL}, 422, "prompt"),
    ("unknown model", "post", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("empty messages", "post", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("huge max_tokens", "post", "/v1/chat/completions", {**CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    ("several answers", "post", "/v1/chat/completions", {**CHAT, "n": 3}, 400, "n"),
    ("an image", "post", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]"),
    ("bad session id", "post", "/v1/chat/completions", {**CHAT, "session_id": "../etc"}, 400, "session_id"),
    ("unknown context", "get", "/v1/contexts/no-such-context", None, 404, "context_id"),
    ("unknown context ask", "post", "/v1/contexts/no-such-context/ask", {"question": "hi"}, 404, "context_id"),
    ("bad preset", "post", "/v1/contexts", {"preset": "nonsense"}, 400, "preset"),
    ("body too large", "post", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}, 413, None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_openai_errors_naming_the_field(open_server, case):
    _, method, path, body, status, param = case
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body} if body is not None else {}
    response = httpx.request(method.upper(), f"{open_server}{path}", timeout=120, **kwargs)
    assert response.status_code == status, response.text
    assert _error(response)["param"] == param


def test_the_server_keeps_serving_after_bad_input(open_server):
    client = _client(open_server)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    answer, _ = _ask(client, [{"role": "user", "content": "Say yes."}], max_tokens=2)
    assert answer.choices[0].message.content


# --- the memory endpoints ---------------------------------------------------------------------------


def test_context_endpoints_round_trip(open_server):
    base, tenant = f"{open_server}/v1/contexts", {"x-tenant-id": "library"}

    def call(method: str, path: str = "", body: dict | None = None, status: int = 200) -> dict:
        response = httpx.request(method, base + path, json=body, headers=tenant, timeout=120)
        assert response.status_code == status, response.text
        return response.json()

    created = call("POST", body={"id": "manual", "preset": "full"}, status=201)
    assert created["tokens"] == 0 and created["preset"] == "full"
    assert _error(httpx.post(base, json={"id": "manual"}, headers=tenant)).get("code") == "context_exists"

    added = call("POST", "/manual/documents", {"text": "The secret harbour code is 4471. The ferry Aster is blue."})
    assert added["tokens_added"] > 10 and added["tokens"] == added["tokens_added"] == added["tokens_prefilled"]
    answer = call("POST", "/manual/ask", {"question": "What is the secret harbour code?", "max_tokens": 12})
    assert "4471" in answer["answer"]
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == added["tokens"]  # the document, not re-read
    assert call("GET", "/manual")["tokens"] == added["tokens"]  # asking changed nothing

    fork = call("POST", "/manual/fork", {"id": "manual-branch"}, status=201)
    assert fork["tokens"] == added["tokens"] and fork["preset"] == "full"
    call("POST", "/manual-branch/documents", {"text": "The ferry Birch is green."})
    assert call("GET", "/manual")["tokens"] == added["tokens"]  # the branch is independent

    saved = call("POST", "/manual/checkpoint")
    assert [c["tokens"] for c in saved["checkpoints"]] == [added["tokens"]]
    assert httpx.get(f"{base}/manual").status_code == 404  # the default tenant has no such context
    assert call("DELETE", "/manual") == {"id": "manual", "object": "context", "deleted": True}
    assert _error(httpx.get(f"{base}/manual", headers=tenant))["code"] == "context_not_found"
    assert call("GET", "/manual-branch")["tokens"] > added["tokens"]  # deleting one left its fork alone


def test_a_closed_stream_ends_the_generation_and_keeps_nothing(open_server):
    session = f"counting-{uuid.uuid4().hex[:8]}"
    client = _client(open_server, **{"x-session-id": session})
    prompt = "Counting to two hundred: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # an answer that does not end by itself
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    held = _context(open_server, session)["tokens"]
    cancelled = httpx.get(f"{open_server}/health").json()["cancelled"]

    body = {"model": MODEL, "prompt": prompt + first.choices[0].text, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{open_server}/v1/completions", json=body, headers={"x-session-id": session},
                      timeout=120) as response:
        assert response.status_code == 200
        pieces = []
        for line in response.iter_lines():
            pieces += [line] if line.startswith("data: ") else []
            if len(pieces) == 2:
                break  # leaving the block closes the connection mid-answer

    # the model thread runs jobs in order: this one runs after the abandoned generation ended
    assert _context(open_server, session)["tokens"] == held  # the abandoned turn was rolled back
    assert httpx.get(f"{open_server}/health").json()["cancelled"] == cancelled + 1


# --- the command ------------------------------------------------------------------------------------


def test_hcmemory_serve_command_starts_serves_and_stops(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hcmemory.cli", "serve", "--port", str(port), "--store",
                                str(tmp_path), "--api-key", "sk-one,sk-two"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, lambda: process.poll() is None)
        assert httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer sk-two"}).status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "saved the live contexts and closed" in output
    bad = subprocess.run([sys.executable, "-m", "hcmemory.cli", "serve", "--preset", "nonsense"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown HCConfig preset 'nonsense'" in bad.stderr
