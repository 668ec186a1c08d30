"""Shared plumbing for the benchmarks: the model, haystack text, result files and tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from hcmemory.eval.fillers import sentences
from hcmemory.eval.runner import environment

RESULTS = Path(os.environ.get("HCMEMORY_BENCH_RESULTS", Path(__file__).parent / "results"))
"""Where results go (tests point it at a temporary directory)."""


def haystack_ids(tokenizer, tokens: int, seed: int = 0) -> list[int]:
    """``tokens`` token ids of the shipped prose filler, in a seeded order (the eval harness's filler)."""
    ids: list[int] = []
    for sentence in sentences("prose", seed):
        ids.extend(tokenizer(sentence + " ", add_special_tokens=False).input_ids)
        if len(ids) >= tokens:
            return ids[:tokens]
    raise AssertionError("the filler stream is endless")


def run_isolated(module: str, *args: object, threads: int) -> dict[str, Any]:
    """``python -m <module> --one <args>`` in a fresh process with ``threads`` threads: one measurement whose
    peak memory is its own; returns the JSON object its last output line holds."""
    out = subprocess.run([sys.executable, "-m", module, "--one", *map(str, args)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
