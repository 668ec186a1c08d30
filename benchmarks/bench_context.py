"""HCContext costs: appending is linear (no re-prefill), N questions cost one prefill plus N short
passes, and checkpoints save/load at disk speed.

Run: ``python -m benchmarks.bench_context``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hcmemory import HCContext, load_model
from hcmemory.demo import demo_document
from hcmemory.prefill import prefill
from hcmemory.stores import ContextStore

from .common import haystack_ids, print_table, write_results

PRESET = "hc-12.5"
PIECE = 512


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def append_cost(model, tokenizer) -> list[dict]:
    """Time to append 512 tokens to an empty vs a 7K-token context; the same for full attention appended
    in place (a DynamicCache kept live) and for a naive re-prefill of everything."""
    base, piece = haystack_ids(tokenizer, 7168, seed=3), haystack_ids(tokenizer, PIECE, seed=4)
    empty, full = HCContext(model, tokenizer, PRESET), HCContext(model, tokenizer, PRESET)
    full.append(base)
    t_empty, t_full = timed(lambda: empty.append(piece)), timed(lambda: full.append(piece))
    naive_empty = timed(lambda: prefill(model, DynamicCache(config=model.config), torch.tensor([piece])))
    naive_full = timed(lambda: prefill(model, DynamicCache(config=model.config), torch.tensor([base + piece])))
    live = DynamicCache(config=model.config)
    prefill(model, live, torch.tensor([base]))
    incremental_full = timed(lambda: prefill(model, live, torch.tensor([piece])))
    return [{"method": f"HCContext.append ({PRESET})", "append_to_empty_s": t_empty, "append_to_7k_s": t_full,
             "ratio": t_full / t_empty},
            # the floor for exact attention: no re-prefill, no compression, every old row attended
            {"method": "DynamicCache, appended in place", "append_to_empty_s": naive_empty,
             "append_to_7k_s": incremental_full, "ratio": incremental_full / naive_empty},
            {"method": "naive re-prefill (DynamicCache)", "append_to_empty_s": naive_empty,
             "append_to_7k_s": naive_full, "ratio": naive_full / naive_empty}]


def multi_question(model, tokenizer) -> list[dict]:
    document, questions = demo_document()
    ctx = HCContext(model, tokenizer, PRESET)
    prefill_s = timed(lambda: ctx.append(document))
    rows = [{"step": "document", "tokens_prefilled": ctx.stats().tokens_prefilled, "seconds": prefill_s}]
    for qa in questions:
        prompt = len(ctx._turn_ids(qa["question"]))
        seconds = timed(lambda: ctx.ask(qa["question"], max_new_tokens=24))
        rows.append({"step": qa["question"][:48], "tokens_prefilled": prompt, "seconds": seconds})
    assert ctx.stats().tokens_prefilled == rows[0]["tokens_prefilled"], "questions must not touch the context"
    return rows


def checkpoints(model, tokenizer) -> list[dict]:
    document, _ = demo_document()
    rows = []
    for preset in ("full", PRESET):
        ctx = HCContext(model, tokenizer, preset)
        ctx.append(document)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "store.sqlite"
            with ContextStore(path) as store:
                save_s = timed(lambda: store.save(ctx))
                size = path.stat().st_size
                load_s = timed(lambda: store.load(ctx.context_id, model, tokenizer))
        stats = ctx.stats()
        rows.append({"preset": preset, "tokens": stats.tokens_seen, "file_mb": size / 2**20,
                     "full_fp16_mb": stats.full_fp16_bytes / 2**20, "save_mb_s": size / 2**20 / save_s,
                     "load_mb_s": size / 2**20 / load_s, "save_s": save_s, "load_s": load_s})
    return rows


def main(argv: list[str] | None = None) -> None:
    model, tokenizer = load_model()
    appends = append_cost(model, tokenizer)
    print_table(appends, list(appends[0]), "Append 512 tokens: to an empty vs a 7K-token context")
    questions = multi_question(model, tokenizer)
    print_table(questions, list(questions[0]), "One document, six questions: tokens prefilled per step")
    ckpt = checkpoints(model, tokenizer)
    print_table(ckpt, list(ckpt[0]), "Checkpoints of the demo document (SQLite, safetensors rows)")
    print(f"results: {write_results('context', appends, questions=questions, checkpoints=ckpt)}")


if __name__ == "__main__":
    main()
