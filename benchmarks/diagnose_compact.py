"""Where `compact` loses full attention's answers on text people wrote: one component at a time made exact.

`compact` stores 4-dim VQ codes that select rows (top-p 0.9), int4 residuals of the keys that re-score
them, int4 values, and 16-bit copies of the rows read exactly (sinks, recent rows, the chunk).  Each
variant below swaps one of those for its exact form (or tries a candidate layout); every variant answers
the same real-prose haystacks (``hcmemory eval`` cells, ``REAL_FILLERS``), and is compared with full
attention on the same questions: paired accuracy, how often its answer is full attention's word for
word, how often its first answer token is full attention's, and the NLL gap of full attention's answer.

Two independent draws of haystacks: ``tune`` (seeds from 0) chooses, ``confirm`` (seeds from 100)
checks the choice on text it was not chosen on.

    OMP_NUM_THREADS=1 python benchmarks/diagnose_compact.py --draw tune
    OMP_NUM_THREADS=1 python benchmarks/diagnose_compact.py --draw confirm --variants compact compact:...

Cells go to ``benchmarks/results/diagnose-compact/<draw>/`` (resumable); the summary of every draw to
``benchmarks/results/diagnose-compact.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hcmemory.eval import REAL_FILLERS, Plan, run
from hcmemory.eval.report import REFERENCE, _mean_interval, _nll_gaps, _paired, _scores, load_cells, summarize

RESULTS = Path(__file__).resolve().parent / "results"
COMPONENTS = (
    "compact",
    "compact:rescore_keys=fp16",  # exact re-scoring keys (the residual kept in 16 bits)
    "compact:value_codec=fp16",  # exact values
    "compact:top_p=1.0",  # the codes select nothing away: every row re-scored
)
DRAWS = {"tune": 0, "confirm": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draw", choices=DRAWS, default="tune")
    parser.add_argument("--variants", nargs="+", default=list(COMPONENTS))
    parser.add_argument("--tasks", nargs="+", default=["multikey", "qa"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[3072, 6144])
    parser.add_argument("--questions", type=int, default=5, help="at least this many per (task, length)")
    parser.add_argument("--no-run", action="store_true", help="only summarise the cells already there")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = RESULTS / "diagnose-compact" / args.draw
    if not args.no_run:
        run(Plan([REFERENCE, *args.variants], args.tasks, args.lengths, args.questions, out,
                 fillers=REAL_FILLERS, first_seed=DRAWS[args.draw]))
    cells = load_cells(out)
    reference = [c for c in cells if c["method"] == REFERENCE]
    rows = {r["method"]: r for r in summarize(cells) if r["length"] is None}
    summary = {}
    for method in [m for m in [REFERENCE, *args.variants] if m in rows]:
        group = [c for c in cells if c["method"] == method]
        row = rows[method]
        entry = {"questions": row["questions"], "accuracy": row["accuracy"], "total_ratio": row["total_ratio"]}
        if method != REFERENCE:
            delta, low, high, _ = _paired(_scores(group), _scores(reference))
            gaps = list(_nll_gaps(group, reference).values())
            entry.update(delta=delta, delta_interval=[low, high], agreement=row["agreement"],
                         first_agreement=row["first_agreement"], nll_gap=row["nll_gap"],
                         nll_gap_interval=list(_mean_interval(gaps)),
                         by_length={str(r["length"]): {"accuracy": r["accuracy"], "agreement": r.get("agreement"),
                                                       "first_agreement": r.get("first_agreement"),
                                                       "nll_gap": r.get("nll_gap")}
                                    for r in summarize(group + reference) if r["method"] == method and r["length"]})
        summary[method] = entry
        print(f"{method:45s} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in entry.items() if k != "by_length"))
    path = RESULTS / "diagnose-compact.json"
    stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    stored[args.draw] = {"cases": sorted({f"{c['task']}-{c['length']}-{c['seed']}" for c in reference}),
                         "fillers": list(REAL_FILLERS),
                         "first_seed": DRAWS[args.draw], "methods": summary}
    path.write_text(json.dumps(stored, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
