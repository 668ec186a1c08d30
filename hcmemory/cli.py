"""The ``hcmemory`` command: ``demo`` (what the memory is for), ``eval`` (accuracy of KV-cache methods
on RULER-style tasks, resumable), ``report`` (tables, intervals and plots of an eval run) and ``serve``
(an OpenAI-compatible HTTP server over the memory)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import HCConfig
from .demo import DEMO_PRESET, demo
from .eval import FILLERS, REAL_FILLERS, STANDARD_LENGTHS, STANDARD_METHODS, TASKS, Plan, run, write_report
from .models import EMBEDDED_MODELS

MODEL_HELP = (f"an embedded model ({', '.join(EMBEDDED_MODELS)}; fetched and converted on first use) or a local "
              f"Hugging Face model directory (default: {next(iter(EMBEDDED_MODELS))})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcmemory", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="answer questions about a long built-in document and compare memory/speed")
    d.add_argument("--preset", default=DEMO_PRESET, choices=HCConfig.presets())
    d.add_argument("--model", default=None, help=MODEL_HELP)
    d.add_argument("--max-new-tokens", type=int, default=32)
    e = sub.add_parser("eval", help="RULER-style accuracy of KV-cache methods on the same prompts (resumable)")
    e.add_argument("--model", default=None, help=MODEL_HELP)
    e.add_argument("--methods", nargs="+", default=list(STANDARD_METHODS),
                   help="full, a preset, preset:field=value,..., quanto-4, kvpress:<Press>@<bytes ratio> (full always "
                        "runs too, or is read from its cells: every method is scored on its answers)")
    e.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    e.add_argument("--lengths", nargs="+", type=int, default=list(STANDARD_LENGTHS))
    e.add_argument("--questions", type=int, default=5, help="at least this many questions per (task, length)")
    e.add_argument("--out", default="eval-results", help="results directory (cells are cached there)")
    e.add_argument("--fillers", nargs="+", default=list(FILLERS), choices=FILLERS + REAL_FILLERS,
                   help="haystack texts, one per seed in turn: the generated ones (default) or text people wrote "
                        f"({', '.join(REAL_FILLERS)}); give each set its own --out")
    e.add_argument("--first-seed", type=int, default=0, help="first seed of every (task, length): another draw")
    r = sub.add_parser("report", help="tables, intervals and plots of an eval results directory")
    r.add_argument("out", help="the results directory of `hcmemory eval`")
    r.add_argument("--output", default=None, help="where to write the Markdown (default: OUT/RESULTS.md)")
    r.add_argument("--ablations", nargs="*", default=[],
                   help="results directories of ablation runs to tabulate too")
    s = sub.add_parser("serve", help="an OpenAI-compatible server whose conversations keep their memory "
                                     "(docs/serving.md; needs hcmemory[serve])")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--preset", default=None, help="how conversations store their KV state (default: hc-12.5)")
    s.add_argument("--store", default=None, help="a directory of the tenants' SQLite stores (default: serve/ under "
                                                 "the cache root) or a postgresql:// URL (one database, a namespace "
                                                 "per tenant); with --ray, the store every replica shares")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY[,KEY...]",
                   help="accept this bearer key (repeatable or comma-separated); each key is its own tenant. "
                        "Keys on a command line are visible to other local users: prefer HCMEMORY_API_KEYS "
                        "(comma-separated), and PGPASSWORD or ~/.pgpass for the database's password")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    s.add_argument("--max-body-bytes", type=int, default=None, help="largest request body accepted")
    s.add_argument("--ray", action="store_true", help="serve with model replicas on Ray Serve, routed by x-session-id "
                                                      "(needs hcmemory[ray]; docs/serving.md)")
    s.add_argument("--replicas", type=int, default=2, help="with --ray: how many model replicas (default 2)")
    s.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs Ray reserves per model replica")
    s.add_argument("--ray-address", default=None, help="with --ray: join this Ray cluster (e.g. auto) instead of "
                                                       "starting one in this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "eval":
        out = run(Plan(args.methods, args.tasks, args.lengths, args.questions, Path(args.out), args.model,
                       args.fillers, args.first_seed))
        print(f"report: {write_report(out)}")
        return 0
    if args.command == "serve":
        return _serve(args, parser)
    if args.command == "report":
        output = Path(args.output) if args.output else None
        print(write_report(Path(args.out), output, [Path(a) for a in args.ablations]))
        return 0
    return demo(args.preset, args.model, args.max_new_tokens)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .serve import ServeSettings, serve  # FastAPI and uvicorn are an extra: imported only here

    given = {"host": args.host, "port": args.port, "model": args.model, "preset": args.preset, "store": args.store,
             "max_tokens_limit": args.max_tokens_limit, "max_body_bytes": args.max_body_bytes,
             "api_keys": tuple(key for value in [*args.api_key, os.environ.get("HCMEMORY_API_KEYS", "")]
                               for key in value.split(",") if key.strip())}
    if not args.ray and (args.replicas != 2 or args.replica_cpus != 1.0 or args.ray_address):
        parser.error("--replicas, --replica-cpus and --ray-address need --ray")
    try:
        settings = ServeSettings(**{name: value for name, value in given.items() if value is not None})
    except ValueError as exc:
        parser.error(str(exc))
    if not args.ray:
        try:
            serve(settings)
        except ConnectionError as exc:  # the store's database, checked before anything starts
            print(f"hcmemory serve: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        from .serve import cluster  # Ray is an extra of its own
    except ImportError as exc:
        parser.error(f"--ray needs Ray Serve: pip install 'hcmemory[ray]' ({exc})")
    if args.replicas < 1 or args.replica_cpus <= 0:
        parser.error("--replicas must be >= 1 and --replica-cpus > 0")
    try:
        cluster.run(settings, args.replicas, args.replica_cpus, args.ray_address)
    except ConnectionError as exc:
        print(f"hcmemory serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
