"""``make bench``: every benchmark in turn; each prints its table and writes benchmarks/results/*.json."""

from __future__ import annotations

from . import bench_bounded, bench_context, bench_needle, bench_speed, bench_sweep


def main() -> None:
    for bench in (bench_speed, bench_needle, bench_sweep, bench_context, bench_bounded):
        print(f"\n=== {bench.__name__} ===", flush=True)
        bench.main([])


if __name__ == "__main__":
    main()
