"""Reading a results directory back: accuracy with confidence intervals, both memory axes, plots,
and ``docs/RESULTS.md``.

Accuracy of a (method, length) cell is the *task average* (mean over tasks of the mean question
score), so a task with many questions per haystack does not outweigh one with few.  Its 95 %
interval comes from a bootstrap that resamples questions within each task; the difference to
``full`` is bootstrapped *paired* (the same questions for both), which is the interval the
"equal to full" and "within 5 points" claims are read from.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import PRESETS, parse_spec

log = logging.getLogger(__name__)
BOOTSTRAP = 2000
REFERENCE = "full"


def load_cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(Path(out).glob("cells/*/*.json"))]


def _scores(cells: list[dict[str, Any]]) -> dict[str, dict[tuple, float]]:
    """task -> {(task, length, seed, question index): score}"""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for cell in cells:
        for i, q in enumerate(cell["questions"]):
            out[cell["task"]][(cell["task"], cell["length"], cell["seed"], i)] = q["score"]
    return out


def _task_average(per_task: dict[str, dict[tuple, float]], keys: dict[str, list[tuple]]) -> float:
    return sum(sum(per_task[t][k] for k in ks) / len(ks) for t, ks in keys.items()) / len(keys)


def _bootstrap(per_task: dict[str, dict[tuple, float]], reference: dict[str, dict[tuple, float]] | None,
               seed: int = 0) -> tuple[float, float]:
    """95 % interval of the task average (minus the reference's on the same questions, when given)."""
    rng = random.Random(seed)
    keys = {t: sorted(v) for t, v in per_task.items() if v}
    samples = []
    for _ in range(BOOTSTRAP):
        drawn = {t: [rng.choice(ks) for _ in ks] for t, ks in keys.items()}
        value = _task_average(per_task, drawn)
        if reference is not None:
            value -= _task_average(reference, drawn)
        samples.append(value)
    samples.sort()
    return samples[int(0.025 * BOOTSTRAP)], samples[int(0.975 * BOOTSTRAP) - 1]


def _kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(p || q) of two distributions given by log-weights over the same tokens (each renormalised)."""
    def normalised(values: list[float]) -> list[float]:
        top = max(values)
        total = math.log(sum(math.exp(v - top) for v in values)) + top
        return [v - total for v in values]

    p, q = normalised(p_logits), normalised(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(p, q))


def _fidelity(group: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, float]:
    """How close a method stays to full attention on the same questions: the share of answers that are
    word for word full attention's; ``first_agreement``, the share whose first answer token is full
    attention's (the most likely one: greedy decoding's); the KL divergence from full attention's first
    answer token distribution, both restricted to full attention's 20 most likely tokens (a token a method does not
    rank there counts at the method's 20th log-probability); and ``nll_gap``, how many nats per token
    less likely the method finds full attention's whole answer than full attention does.  Far less
    noisy than pass/fail, so it ranks variants that tie on accuracy."""
    same, first, kls = [], [], []
    for q, r in _pairs(group, reference).values():
        same.append(q["answer"].strip() == r["answer"].strip())
        if q.get("first") and r.get("first"):
            first.append(max(q["first"], key=q["first"].get) == max(r["first"], key=r["first"].get))
            floor = min(q["first"].values())
            kls.append(_kl([v for v in r["first"].values()], [q["first"].get(t, floor) for t in r["first"]]))
    return {"agreement": _mean(same), "first_agreement": _mean(first), "kl": _mean(kls), "nll_gap": _mean(_nll_gaps(group, reference).values())}


def _pairs(group: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[tuple, tuple[dict, dict]]:
    """(task, length, seed, question index) -> (the method's question, full attention's)."""
    ref = {(c["task"], c["length"], c["seed"], i): q for c in reference for i, q in enumerate(c["questions"])}
    return {(c["task"], c["length"], c["seed"], i): (q, ref[(c["task"], c["length"], c["seed"], i)])
            for c in group for i, q in enumerate(c["questions"]) if (c["task"], c["length"], c["seed"], i) in ref}


def _nll_gaps(group: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[tuple, float]:
    """Per question: nats per token by which the method finds full attention's answer less likely.  Only
    questions whose forced score is of that very answer count (``forced_ids``): a method run without
    full attention's answers at hand scored its own answer, which says nothing about the gap."""
    return {key: (r["forced"] - q["forced"]) / len(r["answer_ids"]) for key, (q, r) in _pairs(group, reference).items()
            if q.get("forced") is not None and r.get("forced") is not None and r.get("answer_ids")
            and q.get("forced_ids") == r["answer_ids"]}


def _mean_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the mean of ``values``."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, length) and per method over all lengths."""
    by: dict[tuple[str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        by[(cell["method"], cell["length"])].append(cell)
        by[(cell["method"], None)].append(cell)
    rows = []
    for (method, length), group in sorted(by.items(), key=lambda item: (item[0][0], item[0][1] or 10**9)):
        per_task = _scores(group)
        reference_cells = [c for c in by.get((REFERENCE, length), [])]
        keys = {t: sorted(s) for t, s in per_task.items() if s}
        low, high = _bootstrap(per_task, None)
        row = {"method": method, "length": length, "questions": sum(len(s) for s in per_task.values()),
               "accuracy": _task_average(per_task, keys), "ci_low": low, "ci_high": high,
               "tasks": {t: sum(s.values()) / len(s) for t, s in per_task.items() if s},
               "device_ratio": _mean(c["memory"]["device_ratio"] for c in group),
               "total_ratio": _mean(c["memory"]["total_ratio"] for c in group),
               "selected_fraction": _mean(c["memory"]["selected_fraction"] for c in group
                                          if c["memory"]["selected_fraction"] is not None),
               "seconds": sum(c["seconds"] for c in group),
               "tokens_per_s": sum(c["context_tokens"] for c in group) / max(1e-9, sum(c["seconds"] for c in group))}
        if reference_cells and method != REFERENCE:
            row.update(_fidelity(group, reference_cells))
        paired = _paired(per_task, _scores(reference_cells)) if reference_cells and method != REFERENCE else None
        if paired is not None:
            row["delta"], row["delta_low"], row["delta_high"], _ = paired
        rows.append(row)
    return rows


def _paired(a: dict[str, dict[tuple, float]], b: dict[str, dict[tuple, float]]
            ) -> tuple[float, float, float, int] | None:
    """Task-average accuracy of ``a`` minus ``b`` on the questions both answered, its paired 95 %
    interval and the number of those questions; None when they share none."""
    common = {t: {k: v for k, v in s.items() if k in b.get(t, {})} for t, s in a.items()}
    common = {t: s for t, s in common.items() if s}
    if not common:
        return None
    other = {t: {k: b[t][k] for k in s} for t, s in common.items()}
    keys = {t: sorted(s) for t, s in common.items()}
    low, high = _bootstrap(common, other)
    return (_task_average(common, keys) - _task_average(other, keys), low, high,
            sum(len(s) for s in common.values()))


OURS = ("hc-12.5", "compact")
"""The presets the head-to-head table sets against every peer: the paper's budget next to the model,
and the compact preset's total bytes."""


def head_to_head(cells: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Each of ``OURS`` against every peer (kvpress, the quantized caches, the classic policies) on the
    questions both answered at every length: paired differences are far tighter than two intervals side
    by side, so "ahead of" can be read off them — in accuracy, and in the NLL gap to full attention."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        by[cell["method"]].append(cell)
    overall = {r["method"]: r for r in rows if r["length"] is None}
    peers = sorted(m for m in by if m != REFERENCE and m not in OURS and not m.startswith("hc-"))
    lines = ["| ours | peer | next to model, ours / peer | total, ours / peer | questions | Δ accuracy, ours − peer "
             "| Δ NLL gap, ours − peer (nats/token) |", "|---|---|---|---|---|---|---|"]
    for ours in (m for m in OURS if m in by):
        mine, my_gaps = _scores(by[ours]), _nll_gaps(by[ours], by.get(REFERENCE, []))
        for peer in peers:
            paired = _paired(mine, _scores(by[peer]))
            if paired is None:
                continue
            delta, low, high, n = paired
            their_gaps = _nll_gaps(by[peer], by.get(REFERENCE, []))
            diffs = [my_gaps[k] - their_gaps[k] for k in my_gaps if k in their_gaps]
            gap = "–" if not diffs else "{:+.3f} [{:+.3f}, {:+.3f}]".format(_mean(diffs), *_mean_interval(diffs))
            a, b = overall[ours], overall[peer]
            lines.append(f"| {ours} | {peer} | {_pct(a['device_ratio'])} / {_pct(b['device_ratio'])} % | "
                         f"{_pct(a['total_ratio'])} / {_pct(b['total_ratio'])} % | {n} | "
                         f"{100 * delta:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | {gap} |")
    return "\n".join(lines)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lengths = sorted({r["length"] for r in rows if r["length"] is not None})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != REFERENCE, m))
    table = {(r["method"], r["length"]): r for r in rows}
    head = ["method", "next to model", "total"] + [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths] + [
        "all lengths", "Δ vs full (95 % CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        overall = table.get((m, None))
        cells = []
        for n in lengths:
            r = table.get((m, n))
            cells.append("–" if r is None else
                         f"{_pct(r['accuracy'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] n={r['questions']}")
        delta = "–" if overall is None or "delta" not in overall else (
            f"{100 * overall['delta']:+.1f} [{100 * overall['delta_low']:+.1f}, {100 * overall['delta_high']:+.1f}]")
        lines.append(f"| {m} | {_pct(overall['device_ratio'])} % | {_pct(overall['total_ratio'])} % | "
                     + " | ".join(cells) + f" | {_pct(overall['accuracy'])} | {delta} |")
    return "\n".join(lines)


def markdown_tasks(rows: list[dict[str, Any]]) -> str:
    overall = [r for r in rows if r["length"] is None]
    tasks = sorted({t for r in overall for t in r["tasks"]})
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in sorted(overall, key=lambda r: (r["method"] != REFERENCE, r["method"])):
        lines.append(f"| {r['method']} | " + " | ".join(_pct(r["tasks"].get(t)) for t in tasks) + " |")
    return "\n".join(lines)


def markdown_deltas(rows: list[dict[str, Any]]) -> str:
    lengths = sorted({r["length"] for r in rows if r["length"] is not None})
    lines = ["| method | " + " | ".join(f"Δ {n}" for n in lengths)
             + " | same answer as full | KL, 1st token | NLL gap (nats/token) |",
             "|---|" + "---|" * (len(lengths) + 3)]
    table = {(r["method"], r["length"]): r for r in rows}
    for m in sorted({r["method"] for r in rows if r["method"] != REFERENCE}):
        cells = []
        for n in lengths:
            r = table.get((m, n))
            cells.append("–" if r is None or "delta" not in r else
                         f"{100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]")
        overall = table.get((m, None), {})
        kl, gap = overall.get("kl"), overall.get("nll_gap")
        cells += [f"{_pct(overall.get('agreement'))} %", "–" if kl is None else f"{kl:.3f}",
                  "–" if gap is None else f"{gap:+.3f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def is_variant(method: str) -> bool:
    """One of our presets with fields changed other than its ``budget`` (an ablation, e.g.
    ``compact:top_p=0.95``), as opposed to a preset, a peer (``quanto-4:q_group_size=32``,
    ``kvpress:SnapKV@0.4``) or a budget point: the plots mark variants without names, or the labels
    of a dozen ablations bury the peers."""
    name, overrides = parse_spec(method)
    return name in PRESETS and any(field != "budget" for field in overrides)


def plots(rows: list[dict[str, Any]], cells: list[dict[str, Any]], out: Path) -> list[Path]:
    """PNG plots next to the results; none (with a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    overall = [r for r in rows if r["length"] is None]
    for axis, label in (("device_ratio", "bytes next to the model"), ("total_ratio", "bytes in total")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in overall:
            if is_variant(r["method"]):
                ax.plot(r[axis], 100 * r["accuracy"], "o", color="0.75", markersize=4, zorder=1)
                continue
            ax.errorbar(r[axis], 100 * r["accuracy"], yerr=[[100 * (r["accuracy"] - r["ci_low"])],
                                                             [100 * (r["ci_high"] - r["accuracy"])]], fmt="o", capsize=3)
            ax.annotate(r["method"], (r[axis], 100 * r["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        if any(is_variant(r["method"]) for r in overall):
            ax.plot([], [], "o", color="0.75", markersize=4, label="variants of the presets (in the tables)")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label}, share of a full fp16 cache (log)")
        ax.set_ylabel("task-average accuracy (%)")
        ax.grid(alpha=0.3)
        path = out / f"accuracy-vs-{axis.split('_')[0]}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    written.append(_heatmaps(cells, out, plt))
    written.append(_accuracy_by_length(rows, out, plt))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in rows if not is_variant(r["method"])}):
        points = sorted((r["length"], r["tokens_per_s"]) for r in rows if r["method"] == method and r["length"])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    written.append(_save_lines(plt, fig, ax, out / "speed-vs-length.png", "context tokens per second of evaluation"))
    return written


def _save_lines(plt: Any, fig: Any, ax: Any, path: Path, ylabel: str) -> Path:
    """Label, legend and write a plot of one line per method over the context length."""
    ax.set_xlabel("context tokens")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy_by_length(rows: list[dict[str, Any]], out: Path, plt: Any) -> Path:
    """Task-average accuracy per length with its interval, one line per preset and peer: where a method
    starts to fall away from full attention as the context grows."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in rows if not is_variant(r["method"])}, key=lambda m: (m != REFERENCE, m))
    for i, method in enumerate(methods):
        points = sorted((r["length"], r) for r in rows if r["method"] == method and r["length"])
        shift = 1 + 0.012 * (i - len(methods) / 2)  # side by side, so the intervals stay readable
        ax.errorbar([n * shift for n, _ in points], [100 * r["accuracy"] for _, r in points],
                    yerr=[[100 * (r["accuracy"] - r["ci_low"]) for _, r in points],
                          [100 * (r["ci_high"] - r["accuracy"]) for _, r in points]],
                    marker="o", markersize=3, capsize=2, linewidth=2.5 if method == REFERENCE else 1,
                    color="black" if method == REFERENCE else None, label=method)
    lengths = sorted({r["length"] for r in rows if r["length"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    return _save_lines(plt, fig, ax, out / "accuracy-vs-length.png", "task-average accuracy (%, 95 % interval)")


def _heatmaps(cells: list[dict[str, Any]], out: Path, plt: Any) -> Path:
    """Depth x length accuracy of the questions that have a depth (needles, fact sheets), per method."""
    methods = sorted({c["method"] for c in cells})
    lengths = sorted({c["length"] for c in cells})
    bins = 5
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 * len(methods), 2.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = [[[] for _ in lengths] for _ in range(bins)]
        for c in cells:
            if c["method"] == method:
                for q in c["questions"]:
                    if q["depth"] is not None:
                        grid[min(bins - 1, int(q["depth"] * bins))][lengths.index(c["length"])].append(q["score"])
        values = [[sum(v) / len(v) if v else float("nan") for v in row] for row in grid]
        ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(method, fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths], fontsize=6)
        ax.set_yticks(range(bins), [f"{100 * i // bins}%" for i in range(bins)], fontsize=6)
    fig.tight_layout()
    path = out / "depth-by-length.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, output: Path | None = None, ablations: Sequence[Path] = ()) -> Path:
    """Write ``results.json`` and ``RESULTS.md`` (to ``output`` if given, plots copied beside it); each
    results directory in ``ablations`` (variants of one method next to ``full``) adds its table of
    differences to full attention."""
    out = Path(out)
    cells = load_cells(out)
    if not cells:
        raise ValueError(f"{out} holds no evaluation cells; run `hcmemory eval --out {out}` first")
    rows = summarize(cells)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    images = plots(rows, cells, out)
    target = Path(output) if output else out / "RESULTS.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent.resolve() != out.resolve():
        # a second page beside RESULTS.md (another model's grid) names its plots after itself
        prefix = "" if target.stem == "RESULTS" else f"{target.stem.lower()}-"
        copies = [target.parent / f"{prefix}{image.name}" for image in images]
        for image, copy in zip(images, copies):
            shutil.copy(image, copy)
        images = copies
    env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
    lengths = sorted({c["length"] for c in cells})
    text = [
        "# Evaluation results", "",
        f"Model {env.get('model', '?')}; {env.get('processor', '?')}, {env.get('threads', '?')} threads; torch "
        f"{env.get('torch', '?')}, transformers {env.get('transformers', '?')}; {env.get('date', '?')}.",
        f"{len(cells)} cells, lengths {', '.join(map(str, lengths))} tokens; tasks "
        f"{', '.join(sorted({c['task'] for c in cells}))}. Regenerate with `hcmemory report {out}"
        + (f" --output {target}" if output else "") + "`.", "",
        "## Task-average accuracy (%, 95 % bootstrap interval) and memory", "",
        "Memory columns: bytes next to the model and bytes in total (model side + host), as a share of a full "
        "fp16 cache of the same tokens (a sliding-window layer's: its window), measured from the stored tensors (the "
        "model runs in float32, so `full` holds 200 %).", "", markdown(rows), "",
        "## Difference to full attention per length (points, paired 95 % interval)", "", markdown_deltas(rows), "",
        "## Per task (all lengths, %)", "", markdown_tasks(rows), "",
        "## Head to head (all lengths, paired on the questions both answered)", "",
        "Intervals: paired 95 % bootstrap. A negative NLL-gap difference means ours stays closer to full "
        "attention's answers.", "", head_to_head(cells, rows), "",
    ]
    for ablation in ablations:
        ablation_cells = load_cells(Path(ablation))
        if not ablation_cells:
            raise ValueError(f"{ablation} holds no evaluation cells")
        text += [f"## Ablation: `{ablation}`", "",
                 f"{len(ablation_cells)} cells, tasks {', '.join(sorted({c['task'] for c in ablation_cells}))}.", "",
                 markdown_deltas(summarize(ablation_cells)), ""]
    if env.get("skipped"):
        text += [f"Not run here: {', '.join(env['skipped'])} (not installed in this environment).", ""]
    text += [f"![{image.stem}]({image.name})" for image in images]
    target.write_text("\n".join(text) + "\n", encoding="utf-8")
    return target
