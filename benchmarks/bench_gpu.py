"""The GPU benchmark: a randomly initialised Llama-3-8B-shaped model (32 layers, 8 KV heads of 128, bf16;
nothing downloaded) at 32K to 1M tokens of context.

For each length: GPU and host memory, decode tokens/s for hc-12.5 (codes and codebooks on the GPU,
exact keys and values in page-locked host memory; the compact preset where hc-12.5's host side would
not fit in RAM), transformers' DynamicCache on the GPU where it fits, and transformers' offloaded
cache (the stock way to keep KV in host memory) where the host can hold it; prefill tokens/s at the
first length.  Contexts past the first are filled directly with synthetic keys and values (prefilling
1M tokens of an 8B model is not a ten-minute job), so the decode numbers measure the cache, not the
weights' answers.  Plus the kernels of ``hcmemory.kernels`` against SDPA over a full fp16 cache, per
layer.  One script, one JSON naming the device: ``benchmarks/results/gpu.json``.

Without a GPU (``make test``) it runs end to end at toy sizes on the CPU so it cannot rot.
Run: ``python -m benchmarks.bench_gpu`` on the GPU machine (``--toy`` forces the toy sizes).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hcmemory import HCCache, HCConfig, cache_kwarg
from hcmemory.kernels import approx_scores, choose, top_p_impl
from hcmemory.prefill import prefill
from hcmemory.selection import top_p_select

from .common import write_results

EIGHT_B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21, rope_theta=500000.0)
TOY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=1 << 16)
DECODE_STEPS = 4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def host_rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    return model.eval()


def fill(cache: Any, model: LlamaForCausalLM, tokens: int, device: torch.device, dtype: torch.dtype) -> None:
    """Synthetic keys and values for every layer, appended in chunks as a prefill would."""
    mc = model.config
    dim = mc.hidden_size // mc.num_attention_heads
    chunk = 16384
    g = torch.Generator(device=device).manual_seed(1)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        for i in range(mc.num_hidden_layers):
            keys = torch.randn(1, mc.num_key_value_heads, n, dim, device=device, dtype=dtype, generator=g)
            values = torch.randn(1, mc.num_key_value_heads, n, dim, device=device, dtype=dtype, generator=g)
            cache.update(keys, values, i)


@torch.no_grad()
def decode_rate(model: LlamaForCausalLM, cache: Any, device: torch.device) -> float:
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    model(input_ids=token, use_cache=True, **cache_kwarg(model, cache))  # warm-up
    sync(device)
    started = time.perf_counter()
    for _ in range(DECODE_STEPS):
        model(input_ids=token, use_cache=True, **cache_kwarg(model, cache))
    sync(device)
    return DECODE_STEPS / (time.perf_counter() - started)


def host_fits(bytes_needed: int) -> bool:
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return bytes_needed < 0.8 * available


def gpu_fits(device: torch.device, bytes_needed: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return bytes_needed < 0.9 * free


def caches(model: LlamaForCausalLM, tokens: int, device: torch.device) -> dict[str, Any]:
    """The caches that fit at ``tokens``: hc-12.5 (or compact when its host side does not fit),
    DynamicCache on the device, the offloaded DynamicCache."""
    mc = model.config
    dim = mc.hidden_size // mc.num_attention_heads
    full = tokens * mc.num_hidden_layers * 2 * mc.num_key_value_heads * dim * 2  # bf16 K + V
    preset = "hc-12.5" if host_fits(full) else "compact"
    out: dict[str, Any] = {preset: lambda: HCCache(model, HCConfig.preset(preset, calibration="context",
                                                                        calibration_tokens=4096))}
    if gpu_fits(device, full):
        out["DynamicCache"] = lambda: DynamicCache(config=mc)
    if device.type == "cuda" and host_fits(full):
        out["DynamicCache offloaded"] = lambda: DynamicCache(config=mc, offloading=True)
    return out


@torch.no_grad()
def kernel_timings(tokens: int, device: torch.device, heads: int = 8, q_heads: int = 32, dim: int = 128
                   ) -> list[dict[str, Any]]:
    """One layer's step: code scoring + top-p (the kernels) vs SDPA over a full fp16 cache."""
    from hcmemory.codecs import VQCodec

    codec = VQCodec(heads, dim, subvector_dim=2, centroids=256, sharing="head", kmeans_iters=4, device=device)
    codec.fit(torch.randn(heads, 8192, dim, device=device))
    codes = codec.encode(torch.randn(heads, tokens, dim, device=device))
    query = torch.randn(heads, q_heads // heads, dim, device=device)
    keys = torch.randn(1, heads, tokens, dim, device=device, dtype=torch.float16)
    values = torch.randn_like(keys)
    q16 = torch.randn(1, q_heads, 1, dim, device=device, dtype=torch.float16)
    select = top_p_impl(codes, "auto") or top_p_select

    def timed(fn) -> float:
        fn()
        sync(device)
        started = time.perf_counter()
        for _ in range(5):
            fn()
        sync(device)
        return (time.perf_counter() - started) / 5

    def score_and_select():
        scores = approx_scores(codec, query, codes, "auto")
        mass = torch.softmax(scores / math.sqrt(dim), dim=-1).mean(dim=1)
        return select(mass, 0.9)

    return [{"tokens": tokens, "what": "codes scored + top-p (per layer)", "ms": 1000 * timed(score_and_select),
             "backend": choose(codes, "auto")},
            {"tokens": tokens, "what": "SDPA over fp16 K/V (per layer)",
             "ms": 1000 * timed(lambda: F.scaled_dot_product_attention(q16, keys, values, enable_gqa=True))}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", action="store_true", help="toy sizes on any device (what make test runs)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--name", default="gpu", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = args.toy or device.type != "cuda"
    shape = TOY if toy else EIGHT_B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    lengths = args.lengths or ([256, 1024] if toy else [32768, 131072, 524288, 1048576])
    model = build_model(shape, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[dict[str, Any]] = []
    for i, tokens in enumerate(lengths):
        for method, make in caches(model, tokens, device).items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            cache = make()
            row: dict[str, Any] = {"tokens": tokens, "cache": method}
            if i == 0:  # a real chunked prefill at the first length
                ids = torch.randint(0, shape["vocab_size"], (1, tokens), device=device)
                sync(device)
                started = time.perf_counter()
                prefill(model, cache, ids, chunk_size=min(4096, tokens))
                sync(device)
                row["prefill_tok_s"] = tokens / (time.perf_counter() - started)
            else:
                fill(cache, model, tokens, device, dtype)
            row.update(decode_tok_s=decode_rate(model, cache, device), gpu_peak_bytes=gpu_bytes(device),
                       host_rss_bytes=host_rss())
            if isinstance(cache, HCCache):
                stats = cache.stats()
                row.update(device_bytes=stats.device_bytes, host_bytes=stats.host_bytes)
            rows.append(row)
            del cache
            write_results(args.name, rows, device=name, toy=toy)
        rows += kernel_timings(tokens, device)
        write_results(args.name, rows, device=name, toy=toy)
    for row in rows:
        print(row)
    print(f"results: {write_results(args.name, rows, device=name, toy=toy)}")


if __name__ == "__main__":
    main()
