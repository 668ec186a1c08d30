"""Bounded memory: stream a long input through a budgeted context and watch RSS stay flat.

Run: ``python -m benchmarks.bench_bounded [--tokens 65536] [--preset hc-12.5-bounded]``.
"""

from __future__ import annotations

import argparse
import gc
import time

from hcmemory import HCContext, load_model

from .common import haystack_ids, print_table, write_results

PIECE = 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--preset", default="hc-12.5-bounded")
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    ctx = HCContext(model, tokenizer, args.preset)
    ids = haystack_ids(tokenizer, args.tokens)
    rows, start = [], time.perf_counter()
    for offset in range(0, args.tokens, PIECE):
        ctx.append(ids[offset:offset + PIECE])
        gc.collect()
        if (offset + PIECE) % (4 * PIECE) == 0 or offset + PIECE >= args.tokens:
            stats = ctx.stats()
            rows.append({"tokens_seen": stats.tokens_seen, "rows_per_layer": stats.tokens_kept // stats.layers,
                         "rss_mb": current_rss_mb(), "kv_device_mb": stats.device_bytes / 2**20,
                         "kv_host_mb": stats.host_bytes / 2**20, "full_fp16_mb": stats.full_fp16_bytes / 2**20,
                         "seconds": time.perf_counter() - start})
            print(f"  {stats.tokens_seen:>6} tokens: RSS {rows[-1]['rss_mb']:.0f} MB, "
                  f"{rows[-1]['rows_per_layer']} rows/layer", flush=True)
            write_results("bounded", rows, preset=args.preset)  # partial curves survive an interruption
    print_table(rows, list(rows[0]), f"RSS while streaming {args.tokens} tokens through {args.preset!r}")
    after_fill = [r["rss_mb"] for r in rows if r["tokens_seen"] >= 2 * 4096]
    growth = max(after_fill) - min(after_fill) if after_fill else float("nan")
    print(f"RSS range after the budget filled: {growth:.0f} MB")
    print(f"results: {write_results('bounded', rows, preset=args.preset, rss_growth_after_fill_mb=growth)}")


if __name__ == "__main__":
    main()
