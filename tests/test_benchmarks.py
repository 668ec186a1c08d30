"""The benchmark scripts a GPU run uses must not rot between GPU runs: they run end to end here
at toy sizes (the numbers mean nothing; that they run and write their results does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, args: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "HCMEMORY_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}


def test_gpu_benchmark_runs_at_toy_sizes(tmp_path):
    results = run_bench("bench_gpu", ["--toy", "--lengths", "128", "300"], tmp_path)["gpu.json"]
    assert not [r for r in results["rows"] if "error" in r], "no row failed"
    caches = {(r["tokens"], r["cache"]) for r in results["rows"] if "cache" in r}
    assert {(128, "hc-12.5"), (128, "DynamicCache"), (300, "hc-12.5")} <= caches
    first = next(r for r in results["rows"] if r.get("cache") == "hc-12.5" and r["tokens"] == 128)
    assert first["prefill_tok_s"] > 0 and first["decode_tok_s"] > 0 and first["device_bytes"] > 0
    later = next(r for r in results["rows"] if r.get("cache") == "hc-12.5" and r["tokens"] == 300)
    assert later["fill_s"] > 0 and 0 < later["selected_fraction"] < 1, "the synthetic keys leave top-p a choice"
    kernels = {(r["tokens"], r["what"], r["backend"]) for r in results["rows"] if r["part"] == "kernel" and "ms" in r}
    for tokens in (128, 300):
        assert (tokens, "SDPA over fp16 K/V (reference)", "torch") in kernels
        assert (tokens, "VQ codes scored (lookup table)", "torch") in kernels
        assert (tokens, "top-p 0.9 of one layer's mass", "torch") in kernels
    assert results["device"] and results["toy"] is True

    stopped = run_bench("bench_gpu", ["--toy", "--lengths", "128", "--deadline", "0", "--name", "late"],
                        tmp_path)["late.json"]
    skipped = {r["cache"]: r.get("skipped") for r in stopped["rows"] if r["part"] == "end to end"}
    assert skipped == {"hc-12.5": "deadline", "DynamicCache": "deadline", "DynamicCache offloaded": "needs CUDA"}


def test_gpu_benchmark_stops_a_fill_at_the_deadline_and_says_how_far_it_got():
    from benchmarks import bench_gpu

    device = torch.device("cpu")
    model = bench_gpu.build_model(bench_gpu.TOY, device, torch.float32)
    make = bench_gpu.caches(model, 300, device)["hc-12.5"]
    row = bench_gpu.end_to_end_row(model, "hc-12.5", make, 300, False, device, torch.float32,
                                   deadline=time.perf_counter())
    assert row["skipped"] == "deadline while filling" and row["filled_tokens"] == 0 and "decode_tok_s" not in row


def test_gpu_benchmark_decode_stops_at_the_deadline_after_one_timed_step():
    """A 1M-token decode step can take a minute: past the deadline the rate comes from the steps timed
    so far (at least one after the warm-up), and the row says how many."""
    from benchmarks import bench_gpu

    device = torch.device("cpu")
    model = bench_gpu.build_model(bench_gpu.TOY, device, torch.float32)
    cache = bench_gpu.caches(model, 64, device)["DynamicCache"]()
    bench_gpu.fill(cache, model, 64, device, torch.float32, 64)
    rate, steps = bench_gpu.decode_rate(model, cache, device, deadline=time.perf_counter())
    assert steps == 1 and rate > 0 and cache.get_seq_length() == 64 + 2
    rate, steps = bench_gpu.decode_rate(model, cache, device)
    assert steps == bench_gpu.DECODE_STEPS and cache.get_seq_length() == 64 + 2 + bench_gpu.DECODE_STEPS + 1


def test_scaling_benchmark_runs_at_toy_sizes(tmp_path):
    results = run_bench("bench_scaling", ["--rows", "512", "1024", "--stack", "2"], tmp_path)["scaling.json"]
    methods = {(r["shape"], r["rows"], r["method"]) for r in results["rows"]}
    assert ("Llama-3-8B", 1024, "hc-12.5, coherent queries") in methods and ("SmolLM2-135M", 512, "sdpa fp16") in methods
    hc = {(r["shape"], r["rows"], r["method"]): r for r in results["rows"] if r["method"].startswith("hc-12.5")}
    assert all(0 < r["selected_share"] < 1 and r["bytes_read"] > 0 for r in hc.values())
    for shape, rows, method in hc:
        if "coherent" in method:  # a group whose heads agree needs fewer rows than one whose heads do not
            independent = hc[(shape, rows, "hc-12.5, independent queries")]
            assert hc[(shape, rows, method)]["selected_share"] < independent["selected_share"]
    assert (tmp_path / "scaling.png").exists()


def test_page_bound_probe_runs_on_a_short_case(tmp_path):
    results = run_bench("bench_page_bounds", ["--length", "600", "--pages", "16"], tmp_path)["page_bounds.json"]
    (row,) = results["rows"]
    assert row["page"] == 16 and 0 <= row["skipped_share"] <= 1 and row["skipped_mass"] < results["eps"]
    assert 0 < row["top25%_mass_worst"] <= row["top25%_mass_mean"] <= row["top50%_mass_mean"] <= 1 + 1e-5


def test_speed_benchmark_takes_turns_and_reports_medians(tmp_path):
    caches = ["dynamic", "hc-12.5:kernel=torch"]
    results = run_bench("bench_speed", ["--lengths", "200", "--caches", *caches, "--repeats", "2", "--threads", "1"],
                        tmp_path)["speed.json"]
    assert [(r["cache"], r["round"]) for r in results["runs"]] == [(c, i) for i in range(2) for c in caches]
    rows = {r["cache"]: r for r in results["rows"]}
    assert rows["dynamic"]["decode_vs_dynamic"] == 1.0 and rows["dynamic"]["rounds"] == 2
    hc = rows["hc-12.5:kernel=torch"]
    assert hc["decode_tok_s"] > 0 and hc["kv_host_mb"] > 0 and 0 < hc["kv_device_mb"] < rows["dynamic"]["kv_device_mb"]
