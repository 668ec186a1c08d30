"""The ``hcmemory`` command: ``demo`` (what the memory is for), ``eval`` (accuracy of KV-cache methods
on RULER-style tasks, resumable) and ``report`` (tables, intervals and plots of an eval run)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .config import HCConfig
from .demo import DEMO_PRESET, demo
from .eval import STANDARD_LENGTHS, STANDARD_METHODS, TASKS, Plan, run, write_report


def main(argv: list[str] | None = None) -> int:
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
                   help="full, a preset, preset:field=value,..., quanto-4, kvpress:<Press>@<bytes ratio> (full always "
                        "runs too, or is read from its cells: every method is scored on its answers)")
    e.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    e.add_argument("--lengths", nargs="+", type=int, default=list(STANDARD_LENGTHS))
    e.add_argument("--questions", type=int, default=5, help="at least this many questions per (task, length)")
    e.add_argument("--out", default="eval-results", help="results directory (cells are cached there)")
    r = sub.add_parser("report", help="tables, intervals and plots of an eval results directory")
    r.add_argument("out", help="the results directory of `hcmemory eval`")
    r.add_argument("--output", default=None, help="where to write the Markdown (default: OUT/RESULTS.md)")
    r.add_argument("--ablations", nargs="*", default=[],
                   help="results directories of ablation runs to tabulate too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "eval":
        out = run(Plan(args.methods, args.tasks, args.lengths, args.questions, Path(args.out), args.model))
        print(f"report: {write_report(out)}")
        return 0
    if args.command == "report":
        output = Path(args.output) if args.output else None
        print(write_report(Path(args.out), output, [Path(a) for a in args.ablations]))
        return 0
    return demo(args.preset, args.model, args.max_new_tokens)


if __name__ == "__main__":
    raise SystemExit(main())
