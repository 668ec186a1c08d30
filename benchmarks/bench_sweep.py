"""Parameter sweep that picks hc defaults from numbers: codebook sharing, centroids, sub-vector
size, top_p and calibration source, each varied alone around ``hc-12.5``, on needle haystacks.

Run: ``python -m benchmarks.bench_sweep [--tokens 4096] [--seeds 0 1] [--variants NAME ...]``; with
``--variants`` only those are run and merged into the rows already in
``results/sweep-<tokens>.json``, so a sweep cut short can be finished without redoing it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hcmemory import HCConfig, load_model

from .bench_needle import build_case, passed, run_hc
from .common import RESULTS, print_table, write_results

BASE = HCConfig.preset("hc-12.5")
VARIANTS: dict[str, dict] = {
    "hc-12.5 (default)": {},
    "sharing=layer": {"vq_codebook": "layer"},
    "sharing=group": {"vq_codebook": "group"},
    "centroids=64": {"vq_centroids": 64},
    "centroids=1024 (16-bit codes)": {"vq_centroids": 1024},
    "s=4, centroids=256 (6.25%)": {"vq_subvector_dim": 4},
    "s=4, centroids=4096 (paper, 12.5%)": {"vq_subvector_dim": 4, "vq_centroids": 4096, "vq_codebook": "layer"},
    "top_p=0.8": {"top_p": 0.8},
    "top_p=0.95": {"top_p": 0.95},
    "top_p=0.99": {"top_p": 0.99},
    "calibration=context": {"calibration": "context"},
    "rescore_keys=int8": {"rescore_keys": "int8"},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="run only these, keep the other rows")
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    cases = [build_case(tokenizer, args.tokens, seed) for seed in args.seeds]
    name = f"sweep-{args.tokens}"
    rows = _earlier_rows(name, set(args.variants)) if args.variants else []
    for variant in args.variants or VARIANTS:
        config = BASE.replace(**VARIANTS[variant])
        hits = total = 0
        start = time.perf_counter()
        for context, chosen in cases:
            with torch.inference_mode():
                answers, extra = run_hc(model, tokenizer, config, context, [n["question"] for n in chosen])
            hits += sum(passed(a, n["answer"]) for a, n in zip(answers, chosen))
            total += len(chosen)
        rows.append({"variant": variant, "passed": hits, "total": total, "pass_rate": hits / total,
                     "device_ratio": extra["device_ratio"], "selected_fraction": extra["selected_fraction"],
                     "seconds": time.perf_counter() - start})
        rows.sort(key=lambda row: list(VARIANTS).index(row["variant"]))
        print(f"  {variant:<36} {hits}/{total}", flush=True)
        path = write_results(name, rows, tokens=args.tokens)  # partial results survive a stop
    print_table(rows, list(rows[0]), f"hc-12.5 sweep on {args.tokens}-token needle haystacks (SmolLM2-135M)")
    print(f"results: {path}")


def _earlier_rows(name: str, rerun: set[str]) -> list[dict]:
    """Rows of the last sweep written under ``name``, minus the variants about to be re-run."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())["rows"]
    return [row for row in earlier if row["variant"] in VARIANTS and row["variant"] not in rerun]


if __name__ == "__main__":
    main()
