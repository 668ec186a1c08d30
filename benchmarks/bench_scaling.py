"""How the cost of one decode step grows with the context: hc-12.5 against exact attention, 8K to 128K rows.

Caches are filled directly with synthetic keys and values (no prefill): keys with per-channel offsets
and spreads like real post-RoPE keys, and a small share of rows aligned with the query, so attention is
peaked the way a retrieval step's is (the selected share is measured and reported).  For two shapes —
SmolLM2 (3 KV heads x 64, 9 query heads, 30 layers) and Llama-3-8B (8 x 128, 32 query heads; one layer
timed, the 32-layer stack would not fit this machine's memory twice over) — it times one decode step
of hc-12.5 (code scoring + selection + exact re-scoring + weighted sum over the selected host rows)
against exact SDPA over the same rows in float32 and float16, and counts the bytes each reads.

Run: ``python -m benchmarks.bench_scaling [--rows 8192 16384 ...]``; results in
``benchmarks/results/scaling.json`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hcmemory.attention import attend
from hcmemory.config import HCConfig
from hcmemory.layer import HCLayer

from .common import RESULTS, print_table, write_results


@dataclass(frozen=True)
class Shape:
    name: str
    kv_heads: int
    q_heads: int
    dim: int
    layers: int


SHAPES = (Shape("SmolLM2-135M", 3, 9, 64, 30), Shape("Llama-3-8B", 8, 32, 128, 32))
ALIGNED = 0.01
"""Share of rows pointing along the query: the rows a retrieval step needs."""


def synthetic(shape: Shape, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(keys, values (kv_heads, rows, dim), queries (1, q_heads, 1, dim) per regime): keys with channel
    offsets and spreads, ``ALIGNED`` of them along a direction per KV head.

    The regimes bracket how peaked a real step is.  ``coherent``: every query head of a KV head is that
    direction plus its own noise, as a GQA group's heads are in a retrieval step; the mass concentrates
    on the aligned rows and top-p reads under 1 % of the rows.  ``independent``: only the group's first
    head is; the others' mass is flat, so top-p 0.9 of the group's mean reads more than half the rows.
    Real decoding reads 16-29 % of the compressed rows at 7.5K (the eval's ``selected_fraction``)."""
    g = torch.Generator().manual_seed(seed)
    h, d, group = shape.kv_heads, shape.dim, shape.q_heads // shape.kv_heads
    spread = torch.exp(torch.randn(h, 1, d, generator=g) * 0.5)
    offset = torch.randn(h, 1, d, generator=g) * (torch.rand(h, 1, d, generator=g) < 0.1) * 4
    keys = torch.randn(h, rows, d, generator=g) * spread + offset
    direction = torch.randn(h, 1, d, generator=g)
    aligned = torch.rand(h, rows, 1, generator=g) < ALIGNED
    keys = torch.where(aligned, keys + 3 * direction / direction.norm(dim=-1, keepdim=True) * math.sqrt(d), keys)
    coherent = direction.repeat_interleave(group, dim=0) + 0.5 * torch.randn(shape.q_heads, 1, d, generator=g)
    independent = torch.randn(shape.q_heads, 1, d, generator=g)
    independent[::group] = coherent[::group]
    return keys, torch.randn(h, rows, d, generator=g), {"coherent": coherent[None], "independent": independent[None]}


def hc_layer(shape: Shape, keys: torch.Tensor, values: torch.Tensor) -> HCLayer:
    config = HCConfig.preset("hc-12.5", calibration="context", calibration_tokens=min(4096, keys.shape[1]))
    layer = HCLayer(config, shape.kv_heads, shape.dim, torch.device("cpu"), torch.float32)
    for start in range(0, keys.shape[1], 8192):
        layer.update(keys[None, :, start:start + 8192], values[None, :, start:start + 8192])
    return layer


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


@torch.no_grad()
def measure(shape: Shape, rows: int, stack: int) -> list[dict]:
    """One decode step over ``stack`` layers (distinct caches) of ``rows`` rows each: hc-12.5 for each
    query regime, exact SDPA (whose cost does not depend on the queries) once."""
    caches = [synthetic(shape, rows, seed) for seed in range(stack)]
    layers = [hc_layer(shape, k, v) for k, v, _ in caches]
    scaling = 1 / math.sqrt(shape.dim)
    query = caches[0][2]["coherent"]
    exact32 = [(k[None], v[None], query) for k, v, _ in caches]
    exact16 = [(k.half(), v.half(), query.half()) for k, v, _ in exact32]

    def hc_step(regime: str):
        def step():
            for layer, (_, _, queries) in zip(layers, caches):
                attend(layer, queries[regime], scaling)
        return step

    def sdpa(tensors):
        def step():
            for k, v, q in tensors:
                F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)
        return step

    codes = sum(layer.key_codes.nbytes() for layer in layers)
    row_bytes = shape.kv_heads * shape.dim * 2 * 2  # fp16 exact key + value
    common = {"shape": shape.name, "rows": rows, "layers": stack}
    results = []
    for regime in ("coherent", "independent"):
        seconds = best_of(hc_step(regime))
        selected = sum(layer.last_selected for layer in layers) / (stack * rows)
        picked = selected * rows * stack + stack * (4 + 64)  # selected rows plus sinks and recent window
        results.append({**common, "method": f"hc-12.5, {regime} queries", "seconds": seconds,
                        "selected_share": selected, "bytes_read": codes + picked * row_bytes})
    return results + [
        {**common, "method": "sdpa fp32", "seconds": best_of(sdpa(exact32)),
         "bytes_read": 2 * rows * stack * shape.kv_heads * shape.dim * 4},
        {**common, "method": "sdpa fp16", "seconds": best_of(sdpa(exact16)),
         "bytes_read": 2 * rows * stack * shape.kv_heads * shape.dim * 2},
    ]


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(11, 4))
    for ax, shape in zip(axes, SHAPES):
        for method in ("hc-12.5, coherent queries", "hc-12.5, independent queries", "sdpa fp32", "sdpa fp16"):
            points = sorted((r["rows"], r["seconds"] * 1000) for r in rows
                            if r["shape"] == shape.name and r["method"] == method)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        layers = next((r["layers"] for r in rows if r["shape"] == shape.name), 1)
        ax.set(xscale="log", yscale="log", xlabel="rows per layer", ylabel="ms per decode step",
               title=f"{shape.name}, {layers} layer{'s' if layers > 1 else ''}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--stack", type=int, default=None, help="layers for the SmolLM2 shape (default: 30)")
    args = parser.parse_args(argv)
    results = []
    for shape in SHAPES:
        stack = (args.stack or shape.layers) if shape.name.startswith("SmolLM2") else 1
        for rows in args.rows:
            results += measure(shape, rows, stack)
            write_results("scaling", results, threads=torch.get_num_threads())
    for r in results:
        r["ms"] = r["seconds"] * 1000
        r["MB_read"] = r["bytes_read"] / 2**20
    print_table(results, ["shape", "rows", "layers", "method", "ms", "MB_read", "selected_share"],
                "One decode step: hc-12.5 vs exact attention over the same rows")
    plot(results)
    print(f"results: {write_results('scaling', results, threads=torch.get_num_threads())}")


if __name__ == "__main__":
    main()
