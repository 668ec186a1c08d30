"""Shared plumbing for the benchmarks: the model, haystack text, result files and tables."""

from __future__ import annotations

import json
import platform
import random
import resource
import time
from pathlib import Path
from typing import Any

import torch
import transformers

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data"


def filler_paragraphs() -> list[str]:
    return [p.strip() for p in (DATA / "filler.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]


def haystack_ids(tokenizer, tokens: int, seed: int = 0) -> list[int]:
    """``tokens`` token ids of filler prose, paragraphs drawn in a seeded order (cycled when needed)."""
    paragraphs = filler_paragraphs()
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < tokens:
        order = paragraphs[:]
        rng.shuffle(order)
        for p in order:
            ids.extend(tokenizer(p + "\n\n", add_special_tokens=False).input_ids)
            if len(ids) >= tokens:
                break
    return ids[:tokens]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **extra, "rows": rows}, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
