"""``make bench``: the timing benchmarks in turn (accuracy is ``hcmemory eval``'s); each prints its table and
writes benchmarks/results/*.json."""

from __future__ import annotations

from . import bench_bounded, bench_context, bench_speed


def main() -> None:
    for bench in (bench_speed, bench_context, bench_bounded):
        print(f"\n=== {bench.__name__} ===", flush=True)
        bench.main([])


if __name__ == "__main__":
    main()
