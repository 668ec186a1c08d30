"""Prefill and decode speed, peak RSS and KV bytes: DynamicCache vs HCCache presets, same model and text.

Each (cache, length) runs in its own process so peak RSS belongs to that run alone.
Run: ``python -m benchmarks.bench_speed [--lengths 1024 4096 7680] [--caches dynamic full hc-12.5]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig, cache_kwarg, load_model
from hcmemory.prefill import prefill

from .common import haystack_ids, peak_rss_mb, print_table, write_results

DECODE_STEPS = 32


@torch.inference_mode()
def measure(cache_name: str, tokens: int) -> dict:
    model, tokenizer = load_model()
    ids = torch.tensor([haystack_ids(tokenizer, tokens)])
    if cache_name == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = HCCache.for_model(model, HCConfig.preset(cache_name), tokenizer)
    prefill(model, DynamicCache(config=model.config), ids[:, :64])  # warm-up, outside the timings
    start = time.perf_counter()
    logits = prefill(model, cache, ids, chunk_size=1024)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = model(input_ids=logits.argmax(-1, keepdim=True), use_cache=True, **cache_kwarg(model, cache)).logits[:, -1]
    decode_s = time.perf_counter() - start
    if cache_name == "dynamic":
        device = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        host = 0
    else:
        stats = cache.stats()
        device, host = stats.device_bytes, stats.host_bytes
    return {"cache": cache_name, "tokens": tokens, "prefill_tok_s": tokens / prefill_s,
            "decode_tok_s": DECODE_STEPS / decode_s, "peak_rss_mb": peak_rss_mb(),
            "kv_device_mb": device / 2**20, "kv_host_mb": host / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--caches", nargs="+", default=["dynamic", "full", "hc-25", "hc-12.5", "kivi-4"])
    parser.add_argument("--one", nargs=2, metavar=("CACHE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    rows = []
    for tokens in args.lengths:
        for cache in args.caches:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_speed", "--one", cache, str(tokens)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {cache:>10} @ {tokens}: prefill {row['prefill_tok_s']:.0f} tok/s, "
                  f"decode {row['decode_tok_s']:.1f} tok/s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["tokens"] == r["tokens"] and b["cache"] == "dynamic")
        r["prefill_vs_dynamic"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_vs_dynamic"] = r["decode_tok_s"] / base["decode_tok_s"]
    columns = ["cache", "tokens", "prefill_tok_s", "decode_tok_s", "prefill_vs_dynamic", "decode_vs_dynamic",
               "peak_rss_mb", "kv_device_mb", "kv_host_mb"]
    print_table(rows, columns, "Speed and memory on SmolLM2-135M (CPU, fp32), same text for every cache")
    print(f"results: {write_results('speed', rows)}")


if __name__ == "__main__":
    main()
