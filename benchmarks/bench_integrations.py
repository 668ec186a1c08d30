"""Prefix reuse through the frameworks, against the same calls with reuse off.

* LCEL chain, six questions over the 5.7K-token demo document: share of each prompt served from the
  live state, time to the first streamed token (what prefix reuse saves) and seconds per question
  (which adds the same decoding to both arms), with reuse and with a fresh context per call.
* LlamaIndex: ``HCQueryEngine`` vs stock ``SummaryIndex(...).as_query_engine(llm=HCAttentionLlamaLLM())``
  with and without reuse: answers found and total time.
* A three-turn chat through ``ChatHCAttention``: tokens prefilled vs the tokens of all messages and answers.

Run: ``python -m benchmarks.bench_integrations`` (results in ``benchmarks/results/integrations.json``).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from hcmemory.demo import demo_document

from .common import RESULTS, print_table, write_results

MAX_NEW = 24


def lcel(document: str, questions: list[dict[str, str]]) -> list[dict]:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate

    from hcmemory.integrations.langchain import HCAttentionLLM

    class Counters(BaseCallbackHandler):
        """The counters the chain's LLM call reported (the parser keeps only the text)."""

        def on_llm_end(self, response, **kwargs) -> None:
            self.info = response.generations[0][0].generation_info

    prompt = PromptTemplate.from_template("{document}\n\nAnswer from the document above. Question: {question}")
    rows = []
    for reuse in (True, False):
        conversation = f"lcel-{uuid.uuid4().hex}"
        for i, qa in enumerate(questions):
            llm = HCAttentionLLM(max_tokens=MAX_NEW, context_id=conversation if reuse else uuid.uuid4().hex)
            chain, counters = prompt | llm | StrOutputParser(), Counters()
            started, first, pieces = time.perf_counter(), None, []
            for piece in chain.stream({"document": document, "question": qa["question"]}, {"callbacks": [counters]}):
                first = time.perf_counter() - started if first is None else first
                pieces.append(piece)
            seconds, text = time.perf_counter() - started, "".join(pieces)
            info = counters.info
            total = info["tokens_reused"] + info["tokens_prefilled"]
            rows.append({"bench": "lcel", "reuse": reuse, "question": i + 1, "first_token_s": first, "seconds": seconds,
                         "reused_share": info["tokens_reused"] / total, "tokens_prefilled": info["tokens_prefilled"],
                         "found": qa["answer"].lower() in text.lower()})
    return rows


def llamaindex(document: str, questions: list[dict[str, str]]) -> list[dict]:
    from llama_index.core import Document, SummaryIndex

    from hcmemory.integrations.llamaindex import HCAttentionLlamaLLM, HCQueryEngine

    rows = []
    started = time.perf_counter()
    engine = HCQueryEngine.from_documents([Document(text=document)], max_new_tokens=MAX_NEW)
    answers = [str(engine.query(qa["question"])) for qa in questions]
    rows.append(_llama_row("HCQueryEngine", started, answers, questions))
    for reuse in (True, False):
        started, answers = time.perf_counter(), []
        for qa in questions:
            llm = HCAttentionLlamaLLM(max_new_tokens=MAX_NEW, context_id=None if reuse else uuid.uuid4().hex)
            stock = SummaryIndex.from_documents([Document(text=document)]).as_query_engine(llm=llm)
            answers.append(str(stock.query(qa["question"])))
        rows.append(_llama_row(f"SummaryIndex + HCAttentionLlamaLLM, reuse {'on' if reuse else 'off'}", started,
                               answers, questions))
    return rows


def _llama_row(name: str, started: float, answers: list[str], questions: list[dict[str, str]]) -> dict:
    found = sum(qa["answer"].lower() in a.lower() for a, qa in zip(answers, questions))
    return {"bench": "llamaindex", "engine": name, "found": found, "questions": len(questions),
            "seconds": time.perf_counter() - started}


def chat() -> list[dict]:
    """Tokens computed over three turns with the live context vs a stateless model that re-reads the
    whole history each turn; nothing should be prefilled twice (prefilled + decoded <= the final
    conversation, the difference being the template's close of the last answer and the opening of a
    next assistant turn, which ``message_ids`` renders)."""
    from langchain_core.messages import HumanMessage

    from hcmemory.integrations.langchain import ChatHCAttention, message_dicts

    model = ChatHCAttention(max_tokens=MAX_NEW, context_id=f"chat-{uuid.uuid4().hex}")
    history, prefilled, decoded, resent = [], 0, 0, 0
    for message in ("Hello! I am planning a trip to Bergen in May.", "What should I pack for the weather?",
                    "And which museum should I visit first?"):
        history.append(HumanMessage(message))
        resent += len(model.engine().message_ids(message_dicts(history)))
        reply = model.invoke(history)
        prefilled += reply.response_metadata["tokens_prefilled"]
        decoded += reply.usage_metadata["output_tokens"]
        history.append(reply)
    conversation = len(model.engine().message_ids(message_dicts(history)))
    return [{"bench": "chat", "turns": 3, "tokens_prefilled": prefilled, "tokens_decoded": decoded,
             "conversation_tokens": conversation, "stateless_prefill_tokens": resent}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="run only these; the other parts' rows are kept from the existing results file")
    args = parser.parse_args(argv)
    document, questions = demo_document()
    questions = questions[:args.questions]
    previous = RESULTS / "integrations.json"
    rows = [r for r in (json.loads(previous.read_text())["rows"] if previous.exists() else [])
            if r["bench"] not in args.parts]
    for part in args.parts:
        rows += PARTS[part](document, questions)
        write_results("integrations", rows)
    print_table([r for r in rows if r["bench"] == "lcel"], ["reuse", "question", "first_token_s", "seconds",
                                                              "reused_share", "tokens_prefilled", "found"],
                "LCEL chain over the demo document")
    print_table([r for r in rows if r["bench"] == "llamaindex"], ["engine", "found", "questions", "seconds"],
                "LlamaIndex over the demo document")
    print_table([r for r in rows if r["bench"] == "chat"], ["turns", "tokens_prefilled", "tokens_decoded",
                                                              "conversation_tokens", "stateless_prefill_tokens"],
                "Three-turn chat")
    print(f"results: {previous}")


PARTS = {"lcel": lcel, "llamaindex": llamaindex, "chat": lambda document, questions: chat()}


if __name__ == "__main__":
    main()
