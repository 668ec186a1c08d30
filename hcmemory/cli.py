"""``hcmemory demo``: a long document into a live context, questions answered from it, and the
memory/speed of the preset next to a full transformers cache on the same text."""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch
from transformers import DynamicCache

from .config import HCConfig
from .context import HCContext
from .models import load_model
from .glue import cache_kwarg
from .prefill import prefill

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
    print(f"appended {added} tokens with preset {preset!r} in {prefill_s:.1f} s")

    correct = 0
    for qa in questions:
        answer = ctx.ask(qa["question"], max_new_tokens=max_new_tokens).strip()
        ok = qa["answer"].lower() in answer.lower()
        correct += ok
        print(f"[{'ok' if ok else '--'}] Q: {qa['question']}\n     A: {answer}")
    print(f"{correct}/{len(questions)} answers contain the expected fact")

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
    _print_table(rows, added)
    if stats.selected_fraction is not None:
        print(f"rows read per step (top-p selection): {stats.selected_fraction:.1%} of compressed rows")
    print(f"next-to-model bytes vs full fp16 KV: {stats.device_ratio:.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .eval import STANDARD_LENGTHS, STANDARD_METHODS, TASKS, Plan, run, write_report

    parser = argparse.ArgumentParser(prog="hcmemory", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="answer questions about a long built-in document and compare memory/speed")
    d.add_argument("--preset", default=DEMO_PRESET, choices=HCConfig.presets())
    d.add_argument("--model", default=None, help="a local Hugging Face model directory (default: embedded SmolLM2)")
    d.add_argument("--max-new-tokens", type=int, default=32)
    e = sub.add_parser("eval", help="RULER-style accuracy of KV-cache methods on the same prompts (resumable)")
    e.add_argument("--model", default=None, help="a local Hugging Face model directory (default: embedded SmolLM2)")
    e.add_argument("--methods", nargs="+", default=list(STANDARD_METHODS),
                   help="full, a preset, preset:field=value,..., quanto-4, kvpress:<Press>@<bytes ratio>")
    e.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    e.add_argument("--lengths", nargs="+", type=int, default=list(STANDARD_LENGTHS))
    e.add_argument("--questions", type=int, default=5, help="at least this many questions per (task, length)")
    e.add_argument("--out", default="eval-results", help="results directory (cells are cached there)")
    r = sub.add_parser("report", help="tables, intervals and plots of an eval results directory")
    r.add_argument("out", help="the results directory of `hcmemory eval`")
    r.add_argument("--output", default=None, help="where to write the Markdown (default: OUT/RESULTS.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "eval":
        out = run(Plan(args.methods, args.tasks, args.lengths, args.questions, Path(args.out), args.model))
        print(f"report: {write_report(out)}")
        return 0
    if args.command == "report":
        print(write_report(Path(args.out), Path(args.output) if args.output else None))
        return 0
    return demo(args.preset, args.model, args.max_new_tokens)


if __name__ == "__main__":
    raise SystemExit(main())
