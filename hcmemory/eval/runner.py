"""Running an evaluation grid: every (method, case) cell once, cached on disk, resumable.

A cell's result is one JSON file under ``OUT/cells/<method>/<task>-<length>-<seed>.json``, written
atomically as soon as it is done, and keyed by a digest of the case (haystack and questions) and of
the method's spec: an interrupted run resumes where it stopped, and a cell whose case or method
changed is recomputed instead of being reused.

Prompts are the same for every method: the haystack opens a user turn of the model's chat
template, each question closes it (``"\\n\\n" + question`` + the template's end of turn and the
assistant's opening) — the framing kvpress's pipeline uses, and ``HCContext`` for documents.  A base
model (no chat template) reads a completion instead (``frame``).  The frame is recorded with the
results, and a directory prompted another way is not resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..config import with_added_fields
from ..files import atomic_path
from ..models import load_model
from .methods import Answer, Method, Question, available, parse_method, record
from .report import REFERENCE
from .fillers import FILLERS, REAL_FILLERS
from .tasks import TASKS, Case, cases_for, score

log = logging.getLogger(__name__)
CELL_FORMAT = 3

STANDARD_METHODS = (
    "full", "hc-25", "hc-12.5", "compact", "hc-12.5-bounded", "streaming:budget=0.0625", "h2o:budget=0.0625",
    "kivi-4", "kivi-2", "quanto-4", "quanto-2",
    "kvpress:SnapKV@0.125", "kvpress:StreamingLLM@0.125", "kvpress:Knorm@0.125", "kvpress:ExpectedAttention@0.125",
    "kvpress:TOVA@0.125", "kvpress:SnapKV@0.4", "kvpress:ExpectedAttention@0.4", "kvpress:TOVA@0.4",
)
"""The grid ``make bench`` runs: every preset, the quantized cache and the kvpress presses at the
next-to-model bytes of hc-12.5 (12.5 % of fp16; the fp32 model's presses keep 6.25 % of the tokens)
and at about the compact preset's total bytes (40 %; compact holds 35-38 %).  Our own streaming/h2o
run at 12.5 % of fp16 too."""
STANDARD_LENGTHS = (2048, 4096, 7680)


@dataclass(frozen=True)
class Plan:
    methods: Sequence[str] = STANDARD_METHODS
    tasks: Sequence[str] = TASKS
    lengths: Sequence[int] = STANDARD_LENGTHS
    questions: int = 5
    """At least this many questions per (task, length); with six tasks, >= 30 per (method, length)."""
    out: Path = Path("eval-results")
    model: str | None = None
    fillers: Sequence[str] = FILLERS
    """Haystack texts, one per seed in turn: the generated ones by default, ``REAL_FILLERS`` for text
    people wrote.  Cells are keyed by task, length and seed only, so a run on other fillers takes its
    own results directory (a cell whose haystack changed would be recomputed, not reused)."""
    first_seed: int = 0
    """The first seed of every (task, length): a second, independent draw of cases starts elsewhere."""


def frame(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(text before the haystack, text after each question).

    A base model (no chat template) gets a completion: its beginning-of-text token when its tokenizer
    adds one (measured on Gemma 3 270M: without ``<bos>`` full attention loses needles at 8K and at 32K
    only repeats "Answer:"), the haystack, the question, then ``Answer:``."""
    if not tokenizer.chat_template:
        ids = tokenizer("a").input_ids
        starts = tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id
        return (tokenizer.bos_token if starts else ""), "\nAnswer:"
    marker = "\x00HAYSTACK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return before, after


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@=-]+", "_", spec)


def _digest(case: Case) -> str:
    payload = json.dumps([case.context, [(q.text, q.answers, q.max_new_tokens) for q in case.questions]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def run(plan: Plan) -> Path:
    """Run every cell of ``plan`` not already done; returns the output directory."""
    unknown = sorted(set(plan.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    unknown = sorted(set(plan.fillers) - set(FILLERS + REAL_FILLERS))
    if unknown or not plan.fillers:
        raise ValueError(f"unknown or no filler(s) {unknown}; fillers: {', '.join(FILLERS + REAL_FILLERS)}")
    methods: list[Method] = []
    # full attention runs first (or is read from its cells) whatever the plan names: its answers are what
    # every other method's forced log-probability scores, and without them a method would score its own
    for spec in [REFERENCE, *(s for s in plan.methods if s != REFERENCE)]:
        method = parse_method(spec)
        why = available(method)
        if why:
            log.warning("skipping %s: %s", spec, why)
        else:
            methods.append(method)
    model, tokenizer = load_model(plan.model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(plan.lengths) + 128 > limit:
        raise ValueError(f"length {max(plan.lengths)} plus a question exceeds the model's window of {limit} tokens")
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    before, after = frame(tokenizer)
    _check_frame(out, [before, after])
    (out / "environment.json").write_text(json.dumps({**environment(), "model": plan.model or "SmolLM2-135M-Instruct",
                                                      "fillers": list(plan.fillers), "first_seed": plan.first_seed,
                                                      "frame": [before, after],
                                                      "skipped": sorted(set(plan.methods) - {m.spec for m in methods})},
                                                     indent=2))
    cases = _interleaved([cases_for(task, length, plan.questions, tokenizer, plan.first_seed, plan.fillers)
                          for length in plan.lengths for task in plan.tasks])
    with tqdm(total=len(cases) * len(methods), desc="eval", unit="cell") as bar:
        for case in cases:
            context_ids = tokenizer(before + case.context, add_special_tokens=False).input_ids
            prompts = [tokenizer("\n\n" + q.text + after, add_special_tokens=False).input_ids for q in case.questions]
            references = None  # full attention's answers, which every other method is scored on as well
            recording, recorded_s = None, 0.0
            for method in sorted(methods, key=lambda m: m.spec != REFERENCE):
                bar.set_postfix_str(f"{method.name} {case.key}")
                path = out / "cells" / slug(method.spec) / f"{case.key}.json"
                questions = [Question(ids, q.max_new_tokens, None if references is None else references[i])
                             for i, (ids, q) in enumerate(zip(prompts, case.questions))]
                if _done(path, case, method):
                    if method.spec == REFERENCE:
                        references = _answer_ids(path)
                    bar.update()
                    continue
                started = time.perf_counter()
                if method.uses_recording and recording is None:
                    with torch.no_grad():
                        recording = record(model, context_ids)
                    recorded_s = time.perf_counter() - started
                    started = time.perf_counter()
                answers, memory = method.answer(model, tokenizer, context_ids, questions, recording)
                seconds = time.perf_counter() - started + (recorded_s if method.uses_recording else 0.0)
                _write_cell(path, case, method, answers, memory.as_dict(), len(context_ids), seconds)
                if method.spec == REFERENCE:
                    references = [a.ids for a in answers]
                bar.update()
    return out


def _check_frame(out: Path, current: list[str]) -> None:
    """Refuse to resume a results directory whose cells were prompted with another frame: a cell is keyed
    by its haystack and questions, so it would be reused although its prompt differed."""
    try:
        stored = json.loads((out / "environment.json").read_text()).get("frame")
    except (OSError, ValueError):
        return
    if stored is not None and stored != current and any(out.glob("cells/*/*.json")):
        raise ValueError(f"{out} holds cells prompted as {stored!r} around each haystack and question, this model "
                         f"and version prompt as {current!r}; give this run its own --out")


def _interleaved(groups: list[list[Case]]) -> list[Case]:
    """The first case of every (task, length), then the second of each, …: a run stopped early still
    covers every task and length, so its task average is not the average of whichever came first."""
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]


def _answer_ids(path: Path) -> list[list[int]]:
    return [q["answer_ids"] for q in json.loads(path.read_text(encoding="utf-8"))["questions"]]


def _done(path: Path, case: Case, method: Method) -> bool:
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (cell.get("format") == CELL_FORMAT and cell.get("case") == _digest(case) and cell.get("spec") == method.spec
            and _same_identity(cell.get("identity"), method.identity))


def _same_identity(stored: Any, current: str) -> bool:
    """Equal, or the same config stored before fields were added that it ran without (``ADDED_FIELDS``)."""
    if stored == current:
        return True
    try:
        stored_config, current_config = json.loads(stored), json.loads(current)
    except (TypeError, ValueError):
        return False
    return isinstance(stored_config, dict) and with_added_fields(stored_config) == current_config


def _write_cell(path: Path, case: Case, method: Method, answers: list[Answer], memory: dict[str, Any],
                context_tokens: int, seconds: float) -> None:
    cell = {
        "format": CELL_FORMAT, "case": _digest(case), "spec": method.spec, "identity": method.identity,
        "method": method.name,
        "task": case.task, "length": case.length, "seed": case.seed, "filler": case.filler,
        "context_tokens": context_tokens, "seconds": seconds, "memory": memory,
        "questions": [{"question": q.text, "answers": list(q.answers), "depth": q.depth, "answer": a.text,
                       "score": score(a.text, q), "first": {str(k): v for k, v in a.first.items()},
                       "answer_ids": a.ids, "forced": a.forced, "forced_ids": a.forced_ids}
                      for q, a in zip(case.questions, answers)],
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(cell, indent=1, ensure_ascii=False), encoding="utf-8")
