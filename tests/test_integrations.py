"""The integrations end to end on the embedded model: prefix reuse counted, LangChain LLM and chat
model, LlamaIndex engines, bad input, concurrency (the LangGraph agent killed and resumed:
``test_langgraph_kv.py``)."""

from __future__ import annotations

import threading

import pytest

from .test_store import DOC

LONG_DOC = " ".join(f"Section {i}: {DOC}" for i in range(12))


# --- the core: crop, truncate, prefix reuse ---------------------------------------------------------


def test_truncate_is_exactly_a_context_that_stopped_there(smollm2):
    from hcmemory import HCContext

    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    short = list(ctx.token_ids)
    reference = ctx.next_logits(" The")
    ctx.append(" The ferry is late. The cafeteria is closed on Sundays.")
    ctx.truncate(len(short))
    assert ctx.token_ids == short and ctx.cache.seen == len(short)
    import torch

    torch.testing.assert_close(ctx.next_logits(" The"), reference, atol=1e-5, rtol=0)


def test_a_failed_generate_restores_what_it_cropped(smollm2, monkeypatch):
    import torch

    from hcmemory import HCConfig, HCContext

    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, HCConfig.preset("hc-12.5-bounded", budget=128, chunk_size=64))
    ctx.append(LONG_DOC[:1500])
    before, logits = list(ctx.token_ids), ctx.next_logits(" The")
    # a prompt that stops mid-sentence, so the answer does not end at once (the failure must come
    # while decoding, after the prompt's suffix was committed)
    prompt = ctx.token_ids[:40] + tokenizer(" Something else entirely happened next, and the",
                                            add_special_tokens=False).input_ids
    forward, calls = model.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        ctx.generate(prompt, max_new_tokens=8).text()
    monkeypatch.setattr(model, "forward", forward)
    assert ctx.token_ids == before
    torch.testing.assert_close(ctx.next_logits(" The"), logits, atol=1e-5, rtol=0)


def test_pool_reuses_the_longest_prefix_and_only_prefills_the_rest(smollm2):
    from hcmemory import ContextPool

    model, tokenizer = smollm2
    pool = ContextPool(model, tokenizer, config="hc-12.5")
    doc = tokenizer(LONG_DOC[:2000], add_special_tokens=False).input_ids
    ask = lambda q: doc + tokenizer(q, add_special_tokens=False).input_ids  # noqa: E731
    prompt = ask(" Question: when does the ferry leave?")
    first = pool.generate(prompt, max_new_tokens=4)
    first.text()
    assert first.info.tokens_reused == 0 and first.info.tokens_prefilled == len(prompt)
    second = pool.generate(ask(" Question: what is the vault code?"), max_new_tokens=4)
    second.text()
    assert second.info.context_id != first.info.context_id
    assert second.info.tokens_reused >= len(doc) and second.info.tokens_prefilled <= 12
    other = pool.generate(tokenizer("A completely different prompt.", add_special_tokens=False).input_ids,
                          max_new_tokens=2)
    other.text()
    assert other.info.context_id != first.info.context_id and other.info.tokens_reused == 0
    assert pool.match(ask(" Question: anything?"))[0] == first.info.context_id


# --- LangChain ----------------------------------------------------------------------------------------


def test_lcel_chain_reuses_the_document_and_reports_it():
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate

    from hcmemory.integrations.langchain import HCAttentionLLM

    llm = HCAttentionLLM(max_tokens=20, context_id="lcel-test")
    chain = PromptTemplate.from_template("{document}\n\nQuestion: {question}") | llm | StrOutputParser()
    answer = chain.invoke({"document": LONG_DOC, "question": "What is the vault code at the harbor office?"})
    assert "58213" in answer
    result = llm.generate([f"{LONG_DOC}\n\nQuestion: When does the night ferry leave?"])
    info = result.generations[0][0].generation_info
    assert info["tokens_prefilled"] < 0.05 * (info["tokens_prefilled"] + info["tokens_reused"])


def test_chat_turns_prefill_each_message_once():
    from langchain_core.messages import HumanMessage

    from hcmemory.integrations.langchain import ChatHCAttention

    chat = ChatHCAttention(max_tokens=16, context_id="three-turns")
    engine = chat.engine()
    history, prefilled = [], 0
    for message in ("Hello, I am Ada.", "I live in Tromsø.", "Where do I live?"):
        history.append(HumanMessage(message))
        reply = chat.invoke(history)
        prefilled += reply.response_metadata["tokens_prefilled"]
        history.append(reply)
    rendered = engine.message_ids([{"role": "user" if i % 2 == 0 else "assistant", "content": m.content}
                                   for i, m in enumerate(history)])
    # every token of every message and answer went in once: the prompts' prefill plus the answers decoded
    decoded = sum(m.usage_metadata["output_tokens"] for m in history[1::2])
    assert prefilled + decoded >= len(rendered) - 8 and prefilled <= len(rendered) - decoded + 8


async def test_async_calls_do_not_block_the_event_loop():
    import asyncio

    from hcmemory.integrations.langchain import ChatHCAttention

    chat = ChatHCAttention(max_tokens=8, context_id="async-test")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    reply = await chat.ainvoke("Say a word.")
    chunks = [chunk async for chunk in chat.astream("Say another word.")]
    task.cancel()
    assert reply.content and len(chunks) >= 2 and ticks > 20


def test_concurrent_conversations_match_serial_runs():
    from hcmemory.integrations.langchain import HCAttentionLLM

    prompts = {f"conv-{i}": f"{DOC} Question {i}: what closes at nine?" for i in range(4)}
    serial = {cid: HCAttentionLLM(max_tokens=8, context_id=f"serial-{cid}").invoke(p) for cid, p in prompts.items()}
    llm, results, errors = HCAttentionLLM(max_tokens=8), {}, []

    def worker(cid: str, prompt: str) -> None:
        try:
            results[cid] = llm.invoke(prompt, context_id=f"threaded-{cid}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=item) for item in prompts.items()]
    threads += [threading.Thread(target=worker, args=("conv-0-again", prompts["conv-0"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert {cid: results[cid] for cid in prompts} == serial
    assert results["conv-0-again"] == serial["conv-0"]


# --- LlamaIndex ---------------------------------------------------------------------------------------


def test_query_engine_answers_from_memory_and_persists(tmp_path):
    from llama_index.core import Document

    from hcmemory.integrations.llamaindex import HCQueryEngine

    engine = HCQueryEngine.from_documents([Document(text=DOC)], max_new_tokens=24)
    held = len(engine.context)
    engine.insert(Document(text="The lighthouse keeper's name is Ilse Varga."))
    assert engine.context.stats().tokens_prefilled == len(engine.context), "earlier documents were not re-read"
    response = engine.query("What is the vault code at the harbor office?")
    assert "58213" in str(response) and len(response.source_nodes) == 2
    assert response.metadata["tokens_prefilled"] < 40 and response.metadata["tokens_held"] > held
    assert len(engine.context) == response.metadata["tokens_held"], "a query leaves the memory unchanged"
    engine.persist(tmp_path / "docs.sqlite", "harbor")
    again = HCQueryEngine.load(tmp_path / "docs.sqlite", "harbor", max_new_tokens=24)
    assert [n.get_content() for n in again.nodes] == [n.get_content() for n in engine.nodes]
    assert str(again.query("What is the vault code at the harbor office?")) == str(response)


def test_query_engine_refuses_documents_beyond_the_window():
    from llama_index.core import Document

    from hcmemory.integrations.llamaindex import HCQueryEngine

    engine = HCQueryEngine.from_documents([], preset="full")
    with pytest.raises(ValueError, match="window.*hc-12.5-bounded"):
        engine.insert(Document(text="word " * 9000))
    assert len(engine.context) == 0


def test_stock_llamaindex_engine_reuses_the_prompt_prefix():
    from llama_index.core import Document, SummaryIndex
    from llama_index.core.llms import ChatMessage

    from hcmemory.integrations.llamaindex import HCAttentionLlamaLLM

    llm = HCAttentionLlamaLLM(max_new_tokens=16, context_id="stock-engine")
    engine = SummaryIndex.from_documents([Document(text=LONG_DOC)]).as_query_engine(llm=llm)
    assert "eleven" in str(engine.query("When does the night ferry leave?")).lower()
    reply = llm.chat([ChatMessage(role="user", content="Thanks!")])
    assert reply.message.content and llm.metadata.context_window == 8192


# --- bad input -------------------------------------------------------------------------------------------


BAD = {
    "empty prompt": (lambda llm: llm.invoke("   "), ValueError, "empty"),
    "zero new tokens": (lambda llm: llm.invoke("Hi", max_new_tokens=0), ValueError, "max_new_tokens"),
    "prompt over the window": (lambda llm: llm.invoke("word " * 9000), ValueError, "window"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_llm_bad_input_names_the_problem(case):
    from hcmemory.integrations.langchain import HCAttentionLLM

    call, error, match = BAD[case]
    with pytest.raises(error, match=match):
        call(HCAttentionLLM(max_tokens=8))


def test_bad_stores_are_refused_and_left_alone(tmp_path):
    from hcmemory.integrations.langchain import HCAttentionLLM

    (tmp_path / "not-sqlite.txt").write_text("hello")
    with pytest.raises(Exception, match="not a readable hcmemory store|file is not a database"):
        HCAttentionLLM(store=str(tmp_path / "not-sqlite.txt")).invoke("Hi")
    assert (tmp_path / "not-sqlite.txt").read_text() == "hello"
    with pytest.raises(ValueError, match="directory"):
        HCAttentionLLM(store=str(tmp_path)).invoke("Hi")
    store_path = tmp_path / "kv.sqlite"
    llm = HCAttentionLLM(store=str(store_path), max_tokens=4, context_id="kept")
    llm.invoke("Hello there.")
    llm.engine().pool.save("kept")
    from hcmemory.integrations.llamaindex import HCQueryEngine

    with pytest.raises(KeyError, match="no context 'unknown'.*'kept'"):
        HCQueryEngine.load(store_path, "unknown")
