"""Prefill and decode speed, peak RSS and KV bytes: DynamicCache vs HCCache presets, same model and text.

Each (cache, length) runs in its own process so peak RSS belongs to that run alone.  With ``--repeats R``
the caches take turns R times (round-robin, so slow phases of a shared machine hit every cache alike);
the summary gives each cache's median speed and its median ratio to DynamicCache of the same round.
Run: ``python -m benchmarks.bench_speed [--lengths 1024 4096 7680] [--caches dynamic full hc-12.5
hc-12.5:kernel=torch] [--repeats 3] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig, cache_kwarg, load_model
from hcmemory.prefill import prefill

from .common import haystack_ids, peak_rss_mb, print_table, run_isolated, write_results

DECODE_STEPS = 32


@torch.inference_mode()
def measure(cache_name: str, tokens: int) -> dict:
    model, tokenizer = load_model()
    ids = torch.tensor([haystack_ids(tokenizer, tokens)])
    if cache_name == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = HCCache.for_model(model, HCConfig.from_spec(cache_name), tokenizer)
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


def summarise(runs: list[dict]) -> list[dict]:
    """Per (cache, tokens): median speeds, and median ratios to DynamicCache of the same round."""
    rows = []
    for key in dict.fromkeys((r["cache"], r["tokens"]) for r in runs):
        mine = [r for r in runs if (r["cache"], r["tokens"]) == key]
        base = {r["round"]: r for r in runs if (r["cache"], r["tokens"]) == ("dynamic", key[1])}
        row = {"cache": key[0], "tokens": key[1], "rounds": len(mine)}
        for metric in ("prefill_tok_s", "decode_tok_s"):
            row[metric] = statistics.median(r[metric] for r in mine)
            row[metric.replace("tok_s", "vs_dynamic")] = statistics.median(
                r[metric] / base[r["round"]][metric] for r in mine) if base else None
        row.update({m: statistics.median(r[m] for r in mine) for m in ("peak_rss_mb", "kv_device_mb", "kv_host_mb")})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--caches", nargs="+", default=["dynamic", "full", "hc-25", "hc-12.5", "kivi-4"],
                        help="dynamic, a preset, or preset:field=value,...")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the caches (medians reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("CACHE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    runs = []
    for tokens in args.lengths:
        for round_ in range(args.repeats):
            for cache in args.caches:
                runs.append({**run_isolated("benchmarks.bench_speed", cache, tokens, threads=args.threads), "round": round_})
                print(f"  {cache:>10} @ {tokens}, round {round_}: prefill {runs[-1]['prefill_tok_s']:.0f} tok/s, "
                      f"decode {runs[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    rows = summarise(runs)
    columns = ["cache", "tokens", "rounds", "prefill_tok_s", "decode_tok_s", "prefill_vs_dynamic",
               "decode_vs_dynamic", "peak_rss_mb", "kv_device_mb", "kv_host_mb"]
    print_table(rows, columns, "Speed and memory on SmolLM2-135M (CPU, fp32), same text for every cache "
                               "(medians over rounds)")
    print(f"results: {write_results('speed', rows, runs=runs, threads=args.threads)}")


if __name__ == "__main__":
    main()
