"""Needle in a haystack: pass rate per preset, against full attention and kvpress presses, same run.

Each haystack holds five needles at depths 10/30/50/70/90 %; the context is prefilled once and
the five questions are asked from it (HCContext overlays; kvpress's pipeline likewise compresses
once and answers several questions).  Prompts are framed the same way for every method: the
haystack opens a user turn, each question closes it.
Run: ``python -m benchmarks.bench_needle [--lengths 2048 4096 7680] [--seeds 0 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import torch

from hcmemory import HCConfig, HCContext, load_model

from .common import DATA, haystack_ids, print_table, write_results

log = logging.getLogger(__name__)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
MAX_NEW_TOKENS = 24
KV_RATIO = 0.125
"""Memory ratio for the kvpress presses, matching hc-12.5's share of fp16 KV next to the model."""

HC_METHODS: dict[str, HCConfig] = {
    "full": HCConfig.preset("full"),
    "hc-25": HCConfig.preset("hc-25"),
    "hc-12.5": HCConfig.preset("hc-12.5"),
    "hc-12.5 paper (rescore=False, top_p=1)": HCConfig.preset("hc-12.5", rescore=False, top_p=1.0),
    "hc-12.5-bounded": HCConfig.preset("hc-12.5-bounded", budget=0.25),
    "h2o 12.5%": HCConfig.preset("h2o", budget=KV_RATIO),
    "streaming 12.5%": HCConfig.preset("streaming", budget=KV_RATIO),
    "kivi-4": HCConfig.preset("kivi-4"),
}


def needles() -> list[dict[str, str]]:
    return json.loads((DATA / "needles.json").read_text(encoding="utf-8"))


def frame(tokenizer) -> tuple[str, str]:
    """(text before the haystack, text after each question): the haystack opens a user turn."""
    if not tokenizer.chat_template:
        return "", "\nAnswer:"
    marker = "\x00HAYSTACK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return before, after


def build_case(tokenizer, tokens: int, seed: int) -> tuple[str, list[dict[str, str]]]:
    """Filler text of about ``tokens`` tokens with five needles at ``DEPTHS``."""
    pool = needles()
    chosen = [pool[(seed * 5 + i) % len(pool)] for i in range(len(DEPTHS))]
    needle_tokens = sum(len(tokenizer(" " + n["needle"], add_special_tokens=False).input_ids) for n in chosen)
    filler = haystack_ids(tokenizer, tokens - needle_tokens - 64, seed)
    pieces, last = [], 0
    for depth, needle in zip(DEPTHS, chosen):
        cut = int(depth * len(filler))
        pieces += [tokenizer.decode(filler[last:cut]), " " + needle["needle"] + " "]
        last = cut
    pieces.append(tokenizer.decode(filler[last:]))
    return "".join(pieces), chosen


def passed(answer: str, expected: str) -> bool:
    return expected in re.sub(r"[,\s]", "", answer)


def run_hc(model, tokenizer, config: HCConfig, context: str, questions: list[str]) -> tuple[list[str], dict]:
    before, after = frame(tokenizer)
    ctx = HCContext(model, tokenizer, config)
    ctx.append(before + context)
    answers = [ctx.ask("\n\n" + q + after, max_new_tokens=MAX_NEW_TOKENS, raw=True) for q in questions]
    stats = ctx.stats()
    return answers, {"device_ratio": stats.device_ratio, "selected_fraction": stats.selected_fraction,
                     "kept_ratio": stats.tokens_kept / (stats.tokens_seen * stats.layers)}


def kvpress_methods() -> dict[str, Any]:
    try:
        from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress
    except ImportError as err:
        log.warning("kvpress not importable (%s): peers skipped; run in the bench venv (make bench)", err)
        return {}
    ratio = 1 - KV_RATIO
    return {f"kvpress {cls.__name__} 12.5%": cls(compression_ratio=ratio)
            for cls in (SnapKVPress, StreamingLLMPress, KnormPress, ExpectedAttentionPress)}


def run_kvpress(model, tokenizer, press, context: str, questions: list[str]) -> tuple[list[str], dict]:
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    out = pipe(context, questions=["\n\n" + q for q in questions], press=press, max_new_tokens=MAX_NEW_TOKENS)
    return out["answers"], {"device_ratio": KV_RATIO}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7680])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="*", default=None, help="subset of method names (default: all)")
    parser.add_argument("--name", default="needle", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = load_model()
    methods: dict[str, Callable] = {name: (lambda c, q, cfg=cfg: run_hc(model, tokenizer, cfg, c, q))
                                    for name, cfg in HC_METHODS.items()}
    methods.update({name: (lambda c, q, p=press: run_kvpress(model, tokenizer, p, c, q))
                    for name, press in kvpress_methods().items()})
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    rows = []
    for tokens in args.lengths:
        cases = [build_case(tokenizer, tokens, seed) for seed in args.seeds]
        for name, method in methods.items():
            hits, total, extra, start = 0, 0, {}, time.perf_counter()
            for context, chosen in cases:
                with torch.inference_mode():
                    answers, extra = method(context, [n["question"] for n in chosen])
                for answer, needle in zip(answers, chosen):
                    hits += passed(answer, needle["answer"])
                    total += 1
            rows.append({"method": name, "tokens": tokens, "passed": hits, "total": total,
                         "pass_rate": hits / total, "seconds": time.perf_counter() - start, **extra})
            log.info("%-40s %5d tokens: %d/%d", name, tokens, hits, total)
            write_results(args.name, rows, depths=DEPTHS, kv_ratio=KV_RATIO)  # partial results survive a stop
    print_table(rows, ["method", "tokens", "passed", "total", "pass_rate", "device_ratio", "selected_fraction",
                       "kept_ratio", "seconds"], "Needle in a haystack on SmolLM2-135M (5 depths per haystack)")
    print(f"results: {write_results(args.name, rows, depths=DEPTHS, kv_ratio=KV_RATIO)}")


if __name__ == "__main__":
    main()
