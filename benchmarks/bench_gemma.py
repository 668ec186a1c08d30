"""Gemma 3 270M: KV bytes per token of every preset, and prefill / decode speed against DynamicCache.

Gemma 3 interleaves five sliding-window layers (512 tokens) with one global layer, so only 3 of its 18
layers grow with the context: the sliding layers keep their window's exact rows under every preset
(``hcmemory.models.kinds``) and the presets compress, select and evict in the global layers alone.  The
bytes table therefore splits each preset's bytes into the sliding layers (a constant, in the model's
dtype) and the global layers (per token).

Speed: each (cache, round) runs in its own process (peak RSS belongs to that run alone); the caches
take turns round-robin, so slow phases of a shared machine hit every cache alike, and the summary gives
medians and the median ratio to DynamicCache of the same round (``bench_speed.summarise``).
Run: ``python -m benchmarks.bench_gemma [--length 8192] [--caches dynamic full hc-25 hc-12.5 compact]
[--rounds 1] [--bytes-length 2048] [--threads 1]``; writes ``benchmarks/results/gemma.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import DynamicCache

from hcmemory import HCCache, HCConfig, cache_kwarg, load_model
from hcmemory.models import GLOBAL, SLIDING
from hcmemory.prefill import prefill

from .bench_speed import summarise
from .common import haystack_ids, peak_rss_mb, print_table, run_isolated, write_results

MODEL = "gemma-3-270m"
DECODE_STEPS = 32
CHUNK = 1024


def _cache(model, tokenizer, name: str):
    if name == "dynamic":
        return DynamicCache(config=model.config)
    return HCCache.for_model(model, HCConfig.from_spec(name), tokenizer)


def _kv_bytes(cache) -> dict[str, int]:
    """Bytes held by the sliding and by the global layers (DynamicCache: its key and value tensors)."""
    if isinstance(cache, HCCache):
        per_layer = [layer.device_bytes() + layer.host_bytes() for layer in cache.layers]
        kinds = cache.kinds
    else:
        per_layer = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)) for layer in cache.layers]
        kinds = [SLIDING if layer.is_sliding else GLOBAL for layer in cache.layers]
    return {kind: sum(b for b, k in zip(per_layer, kinds) if k == kind) for kind in (SLIDING, GLOBAL)}


@torch.inference_mode()
def measure_bytes(names: list[str], tokens: int) -> list[dict]:
    """Prefill ``tokens`` into each cache and split what it holds by layer kind."""
    model, tokenizer = load_model(MODEL)
    ids = torch.tensor([haystack_ids(tokenizer, tokens)])
    rows = []
    for name in names:
        cache = _cache(model, tokenizer, name)
        prefill(model, cache, ids, chunk_size=CHUNK)
        kv = _kv_bytes(cache)
        rows.append({"cache": name, "tokens": tokens, "sliding_kb": kv[SLIDING] / 1024,
                     "global_bytes_per_token": kv[GLOBAL] / tokens,
                     "bytes_per_token": (kv[SLIDING] + kv[GLOBAL]) / tokens,
                     "global_rows": sum(len(layer) for layer, kind in zip(cache.layers, cache.kinds) if kind == GLOBAL)
                     if isinstance(cache, HCCache) else None})
        print(f"  bytes {name:>16} @ {tokens}: {rows[-1]['bytes_per_token']:.0f} B/token", file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def measure_speed(name: str, tokens: int) -> dict:
    model, tokenizer = load_model(MODEL)
    ids = torch.tensor([haystack_ids(tokenizer, tokens)])
    cache = _cache(model, tokenizer, name)
    prefill(model, DynamicCache(config=model.config), ids[:, :64])  # warm-up, outside the timings
    start = time.perf_counter()
    logits = prefill(model, cache, ids, chunk_size=CHUNK)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = model(input_ids=logits.argmax(-1, keepdim=True), use_cache=True, logits_to_keep=1,
                       **cache_kwarg(model, cache)).logits[:, -1]
    decode_s = time.perf_counter() - start
    if isinstance(cache, HCCache):
        stats = cache.stats()
        device, host = stats.device_bytes, stats.host_bytes
    else:
        device, host = sum(_kv_bytes(cache).values()), 0
    return {"cache": name, "tokens": tokens, "prefill_tok_s": tokens / prefill_s,
            "decode_tok_s": DECODE_STEPS / decode_s, "peak_rss_mb": peak_rss_mb(),
            "kv_device_mb": device / 2**20, "kv_host_mb": host / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=8192, help="tokens prefilled for the speed table")
    parser.add_argument("--caches", nargs="+", default=["dynamic", "full", "hc-25", "hc-12.5", "compact"],
                        help="dynamic, a preset, or preset:field=value,...")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the caches (medians reported)")
    parser.add_argument("--bytes-length", type=int, default=2048, help="tokens prefilled for the bytes table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("CACHE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_speed(args.one[0], int(args.one[1]))))
        return
    torch.set_num_threads(args.threads)
    byte_rows = measure_bytes(["dynamic", *HCConfig.presets()], args.bytes_length)
    print_table(byte_rows, ["cache", "tokens", "sliding_kb", "global_bytes_per_token", "bytes_per_token",
                            "global_rows"],
                f"KV bytes on {MODEL} (fp32 weights, CPU): 15 sliding layers hold their 511-row window exactly, "
                "3 global layers grow")
    runs = []
    for round_ in range(args.rounds):
        for name in args.caches:
            runs.append({**run_isolated("benchmarks.bench_gemma", name, args.length, threads=args.threads), "round": round_})
            print(f"  {name:>10} @ {args.length}, round {round_}: prefill {runs[-1]['prefill_tok_s']:.0f} tok/s, "
                  f"decode {runs[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    rows = summarise(runs)
    print_table(rows, ["cache", "tokens", "rounds", "prefill_tok_s", "decode_tok_s", "prefill_vs_dynamic",
                       "decode_vs_dynamic", "peak_rss_mb", "kv_device_mb", "kv_host_mb"],
                f"Speed on {MODEL} (CPU, fp32, {args.threads} thread(s)), same text for every cache "
                "(medians over rounds)")
    print(f"results: {write_results('gemma', rows, bytes=byte_rows, runs=runs, threads=args.threads)}")


if __name__ == "__main__":
    main()
