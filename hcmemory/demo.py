"""``hcmemory demo``: what a live, compressed memory is for, on a 5.7K-token document.

The document is read once; several questions are answered from it, each in the time of its own few
tokens instead of re-reading the document; asking leaves the memory exactly as it was; a fork
branches the conversation for free; a checkpoint saves it and brings it back faster than reading
the document again; and the memory it holds is set next to transformers' own cache on the same text.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch
from transformers import DynamicCache

from .config import HCConfig
from .context import HCContext
from .glue import cache_kwarg
from .models import load_model
from .prefill import prefill
from .stores import ContextStore

DEMO_PRESET = "hc-12.5"
DECODE_STEPS = 32


def demo_document() -> tuple[str, list[dict[str, str]]]:
    data = resources.files("hcmemory.data")
    questions = json.loads(data.joinpath("demo_questions.json").read_text(encoding="utf-8"))
    return data.joinpath("demo_document.txt").read_text(encoding="utf-8"), questions


@torch.no_grad()
def _decode_speed(model: torch.nn.Module, cache, logits: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=token, use_cache=True, **cache_kwarg(model, cache)).logits[:, -1]
    return steps / (time.perf_counter() - start)


def _full_cache_row(model: torch.nn.Module, ids: torch.Tensor, chunk_size: int) -> dict[str, float]:
    """transformers' DynamicCache on the same tokens: the reference for memory and speed."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = prefill(model, cache, ids, chunk_size)
    prefill_s = time.perf_counter() - start
    decode = _decode_speed(model, cache, logits, DECODE_STEPS)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"prefill_tok_s": ids.shape[1] / prefill_s, "decode_tok_s": decode, "device_bytes": kv, "host_bytes": 0}


def _print_table(rows: dict[str, dict[str, float]], tokens: int) -> None:
    print(f"\nKV state for {tokens} tokens of context")
    print(f"{'cache':<24}{'next to model':>15}{'host':>12}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for name, r in rows.items():
        print(f"{name:<24}{r['device_bytes'] / 2**20:>12.2f} MB{r['host_bytes'] / 2**20:>9.2f} MB"
              f"{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>14.1f}")


def demo(preset: str, model_path: str | None, max_new_tokens: int) -> int:
    model, tokenizer = load_model(model_path)
    config = HCConfig.preset(preset)
    document, questions = demo_document()
    ctx = HCContext(model, tokenizer, config)
    start = time.perf_counter()
    added = ctx.append(document, progress=True)
    prefill_s = time.perf_counter() - start
    print(f"\n1. Read once: {added} tokens into a live {preset!r} memory in {prefill_s:.1f} s.")

    print("\n2. Questions, each answered from the whole memory (re-reading the document would cost "
          f"{prefill_s:.0f} s more each):")
    before = (list(ctx.token_ids), replace(ctx.stats(), reserved_bytes=0))
    correct = 0
    for qa in questions:
        start = time.perf_counter()
        answer = ctx.ask(qa["question"], max_new_tokens=max_new_tokens).strip()
        ok = qa["answer"].lower() in answer.lower()
        correct += ok
        print(f"   [{'ok' if ok else '--'}] {time.perf_counter() - start:4.1f} s  {qa['question']}\n"
              f"            {answer}")
    print(f"   {correct}/{len(questions)} answers contain the expected fact")
    unchanged = before == (ctx.token_ids, replace(ctx.stats(), reserved_bytes=0))
    print(f"\n3. Asking changed nothing: {unchanged} (tokens held {len(ctx)}, prefilled {ctx.stats().tokens_prefilled}).")

    start = time.perf_counter()
    branch = ctx.fork()
    fork_ms = 1000 * (time.perf_counter() - start)
    branch.chat("Note for this branch only: the meeting moved to Friday.", max_new_tokens=8)
    print(f"\n4. Fork in {fork_ms:.1f} ms (copy-on-write); the branch took a turn ({len(branch)} tokens), the "
          f"original still holds {len(ctx)}.")

    with tempfile.TemporaryDirectory() as tmp, ContextStore(Path(tmp) / "memory.sqlite") as store:
        start = time.perf_counter()
        store.save(ctx)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        restored = store.load(ctx.context_id, model, tokenizer)
        load_s = time.perf_counter() - start
        size = (Path(tmp) / "memory.sqlite").stat().st_size
    same = torch.allclose(restored.next_logits(" The"), ctx.next_logits(" The"), atol=1e-5)
    print(f"\n5. Checkpoint: {size / 2**20:.0f} MB saved in {save_s:.1f} s, loaded in {load_s:.1f} s "
          f"({prefill_s / max(load_s, 1e-9):.0f}x faster than reading the document); identical state: {same}.")

    stats = ctx.stats()
    ids = torch.tensor([ctx.token_ids])
    with ctx.cache.transaction(commit=False):  # decode speed measured in an overlay: the context stays as it is
        logits = prefill(model, ctx.cache, torch.tensor([ctx.token_ids[-1:]]))
        decode = _decode_speed(model, ctx.cache, logits, DECODE_STEPS)
    rows = {
        f"HCCache {preset}": {"prefill_tok_s": added / prefill_s, "decode_tok_s": decode,
                              "device_bytes": stats.device_bytes, "host_bytes": stats.host_bytes},
        "DynamicCache (full)": _full_cache_row(model, ids, config.chunk_size),
    }
    print("\n6. Memory and speed next to transformers' own cache on the same tokens:")
    _print_table(rows, added)
    if stats.selected_fraction is not None:
        print(f"rows read per step (top-p selection): {stats.selected_fraction:.1%} of compressed rows")
    print(f"next-to-model bytes vs full fp16 KV: {stats.device_ratio:.1%}")
    return 0
