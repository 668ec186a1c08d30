"""The GPU benchmark: a randomly initialised Llama-3-8B-shaped model (32 layers, 8 KV heads of 128, bf16;
nothing downloaded) at 32K to 1M tokens of context.

Two parts, each row written to ``benchmarks/results/NAME.json`` as soon as it is measured (GPU time is
short; a crash or a deadline keeps what was done):

1. **Kernels**, one layer of the 8B shape at every length: lookup-table scoring of VQ codes (Triton and
   the torch path), top-p selection (Triton and the torch path, with and without the previous step's
   hint), int4 dequantise-and-score, against SDPA over a full fp16 cache.  Timed with CUDA events
   (median).
2. **End to end**: GPU and host memory and decode tokens/s for hc-12.5 (codes and codebooks on the
   GPU, exact keys and values in page-locked host memory, the weighted sum on the host; ``compact``
   where hc-12.5's host side would not fit in RAM), transformers' DynamicCache on the GPU where it
   fits, and its offloaded cache (the stock way to keep KV in host memory) where the host can hold
   it.  Prefill tokens/s at the first length (a real chunked prefill); longer contexts are filled
   directly with synthetic keys and values (prefilling 1M tokens of an 8B model is not a ten-minute
   job), so decode numbers measure the cache, not the weights' answers.  A row that fails records
   its error and the run goes on.

Without a GPU (``make test``) it runs end to end at toy sizes on the CPU so it cannot rot.
Run: ``python -m benchmarks.bench_gpu`` on the GPU machine (``--toy`` forces the toy sizes).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hcmemory import HCCache, HCConfig, cache_kwarg
from hcmemory.codecs import UniformCodec, VQCodec
from hcmemory.kernels.dispatch import approx_scores, choose, top_p_impl
from hcmemory.prefill import prefill
from hcmemory.selection import top_p_select

from .common import write_results

log = logging.getLogger(__name__)

EIGHT_B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21, rope_theta=500000.0)
TOY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=1 << 16)
DECODE_STEPS = 4
OFFLOAD_HOST_FACTOR = 3.5
"""Page-locked host bytes transformers' offloaded DynamicCache holds per byte of bf16 keys and values:
3.4 measured at 32K on an H200 (14.6 GB for 4.3 GB; torch's pinned allocator rounds blocks up and keeps
freed ones).  At 512K the estimate from the cache's size alone (69 GB of 128 GiB) let the run start,
and the process was killed for memory (``benchmarks/results/gpu-logs/long``)."""
FILL_CHUNK = 16384
KEY_SCALE = 2.0
"""Synthetic keys are N(0, KEY_SCALE²) per channel.  A randomly initialised Llama's queries carry about 1.3
per channel (RMS-normalised states through 0.02-std weights over 4,096 inputs), so scaled scores spread
with a std near 2.6 and top-p 0.9 reads a minority of rows, as in real decoding (16-29 % of rows on
SmolLM2 at 7.5K); unit keys would make attention flat and top-p read nearly every row, which no
trained model does.  The share each hc row read is measured and reported with it."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory(device: torch.device) -> None:
    """Give cached device and page-locked host blocks back between rows, so one row's buffers cannot
    crowd out the next (torch keeps freed pinned blocks cached; the release call is private API and
    named differently across versions)."""
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
        if hasattr(torch._C, name):
            getattr(torch._C, name)()
            break
    torch.cuda.reset_peak_memory_stats(device)


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    return model.eval()


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 20) -> float:
    """Median of ``repeats`` timed calls after a warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


@torch.no_grad()
def kernel_rows(tokens: int, device: torch.device, heads: int = 8, q_heads: int = 32, dim: int = 128,
                repeats: int = 20) -> list[dict[str, Any]]:
    """One layer of the 8B shape at ``tokens`` rows: each hot step by every available implementation,
    against SDPA over the same rows in fp16."""
    torch.manual_seed(tokens)
    fast = choose(torch.empty(0, device=device), "auto")  # triton on a GPU, the C++ kernels on a CPU
    codec = VQCodec(heads, dim, subvector_dim=2, centroids=256, sharing="head", kmeans_iters=4, device=device)
    codec.fit(torch.randn(heads, 8192, dim, device=device) * KEY_SCALE)
    codes = torch.cat([codec.encode(torch.randn(heads, n, dim, device=device) * KEY_SCALE)
                       for _, n in _spans(tokens, FILL_CHUNK)], dim=1)
    query = torch.randn(heads, q_heads // heads, dim, device=device) * 1.3
    keys = torch.randn(1, heads, tokens, dim, device=device, dtype=torch.float16) * KEY_SCALE
    values = torch.randn_like(keys)
    q16 = query.reshape(1, q_heads, 1, dim).to(torch.float16)
    scale = 1 / math.sqrt(dim)
    mass = torch.softmax(approx_scores(codec, query, codes, "torch") * scale, dim=-1).mean(dim=1)
    hint = top_p_select(mass, 0.9).shape[1]
    int4 = UniformCodec(heads, dim, bits=4, axis="channel", device=device)
    int4.fit(keys[0, :, :8192].float())
    packed = torch.cat([int4.encode(keys[0, :, s:s + n].float()) for s, n in _spans(tokens, FILL_CHUNK)], dim=1)

    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("SDPA over fp16 K/V (reference)", "torch", lambda: F.scaled_dot_product_attention(
            q16, keys, values, enable_gqa=True)),
        ("exact fp16 scores q.K", "torch", lambda: q16.view(heads, -1, dim) @ keys[0].mT),
        ("VQ codes scored (lookup table)", "torch", lambda: approx_scores(codec, query, codes, "torch")),
        ("top-p 0.9 of one layer's mass", "torch", lambda: top_p_select(mass, 0.9)),
        ("top-p 0.9, previous step's k as hint", "torch", lambda: top_p_select(mass, 0.9, hint)),
        ("int4 rows dequantised and scored", "torch", lambda: approx_scores(int4, query, packed, "torch")),
    ]
    if fast != "torch":
        select = top_p_impl(mass, fast)
        cases += [("VQ codes scored (lookup table)", fast, lambda: approx_scores(codec, query, codes, fast)),
                  ("top-p 0.9 of one layer's mass", fast, lambda: select(mass, 0.9))]
        if fast == "triton":
            cases.append(("int4 rows dequantised and scored", fast, lambda: approx_scores(int4, query, packed, fast)))
    rows = []
    for what, backend, fn in cases:
        row = {"part": "kernel", "tokens": tokens, "what": what, "backend": backend}
        try:
            row["ms"] = median_ms(fn, device, repeats)
        except Exception as error:  # noqa: BLE001 - a failing kernel is a result to report, not the end of the run
            row["error"] = _error(error)
        rows.append(row)
    rows.append({"part": "kernel", "tokens": tokens, "what": "share of rows top-p 0.9 selects",
                 "share": hint / tokens})
    return rows


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def _error(error: BaseException) -> str:
    log.warning("%s", "".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}"


def fill(cache: Any, model: LlamaForCausalLM, tokens: int, device: torch.device, dtype: torch.dtype,
         chunk: int, deadline: float = math.inf) -> int:
    """Synthetic keys and values for every layer, appended ``chunk`` rows at a time, until ``tokens`` or
    the ``deadline`` (a ``perf_counter`` time) -> the tokens filled."""
    mc = model.config
    dim = mc.hidden_size // mc.num_attention_heads
    g = torch.Generator(device=device).manual_seed(1)
    filled, started = 0, time.perf_counter()
    for step, (_, n) in enumerate(_spans(tokens, chunk), 1):
        if time.perf_counter() > deadline:
            break
        for i in range(mc.num_hidden_layers):
            keys = torch.randn(1, mc.num_key_value_heads, n, dim, device=device, dtype=dtype, generator=g) * KEY_SCALE
            values = torch.randn(1, mc.num_key_value_heads, n, dim, device=device, dtype=dtype, generator=g)
            cache.update(keys, values, i)
        filled += n
        if step % 8 == 0:  # a killed call still shows the fill's rate
            log.info("filled %d of %d tokens in %.0f s", filled, tokens, time.perf_counter() - started)
    return filled


@torch.no_grad()
def decode_rate(model: LlamaForCausalLM, cache: Any, device: torch.device, deadline: float = math.inf
                ) -> tuple[float, int]:
    """Tokens/s of one-token steps: the median step after a warm-up step, over ``DECODE_STEPS`` steps or
    as many as were timed by the ``deadline`` (at least one) -> (rate, steps timed).  Each step is logged,
    so a call killed mid-decode still shows how long a step takes."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    steps: list[float] = []
    while len(steps) <= DECODE_STEPS and (len(steps) < 2 or time.perf_counter() < deadline):
        sync(device)
        started = time.perf_counter()
        model(input_ids=token, use_cache=True, **cache_kwarg(model, cache))
        sync(device)
        steps.append(time.perf_counter() - started)
        log.info("decode step %d: %.2f s", len(steps), steps[-1])
    return 1 / statistics.median(steps[1:]), len(steps) - 1


def host_fits(bytes_needed: int) -> bool:
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return bytes_needed < 0.7 * available


def gpu_fits(device: torch.device, bytes_needed: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return bytes_needed < 0.85 * free


def caches(model: LlamaForCausalLM, tokens: int, device: torch.device) -> dict[str, Callable[[], Any] | str]:
    """Every cache at ``tokens``: a constructor, or why it cannot hold that context here.  hc-12.5 (or
    compact when hc-12.5's host side does not fit), DynamicCache on the device, the offloaded DynamicCache."""
    mc = model.config
    dim = mc.hidden_size // mc.num_attention_heads
    full = tokens * mc.num_hidden_layers * 2 * mc.num_key_value_heads * dim * 2  # bf16 K + V
    preset = "hc-12.5" if host_fits(full) else "compact"
    gb = f"{full / 1e9:.0f} GB of bf16 keys and values"
    return {preset: lambda: HCCache(model, HCConfig.preset(
                preset, calibration="context", calibration_tokens=min(4096, tokens // 2))),
            "DynamicCache": (lambda: DynamicCache(config=mc)) if gpu_fits(device, full)
            else f"does not fit: {gb} in the GPU's free memory",
            "DynamicCache offloaded": (lambda: DynamicCache(config=mc, offloading=True))
            if device.type == "cuda" and host_fits(int(OFFLOAD_HOST_FACTOR * full))
            else ("needs CUDA" if device.type != "cuda" else
                  f"does not fit: {gb}, {OFFLOAD_HOST_FACTOR}x that page-locked, in host memory")}


def end_to_end_row(model: LlamaForCausalLM, method: str, make: Callable[[], Any], tokens: int, first: bool,
                   device: torch.device, dtype: torch.dtype, deadline: float = math.inf) -> dict[str, Any]:
    release_memory(device)
    row: dict[str, Any] = {"part": "end to end", "tokens": tokens, "cache": method}
    cache = make()
    try:
        started = time.perf_counter()
        if first:  # a real chunked prefill at the first length
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
            prefill(model, cache, ids, chunk_size=min(4096, tokens))
            sync(device)
            row["prefill_tok_s"] = tokens / (time.perf_counter() - started)
        else:  # transformers' caches concatenate: one append per layer; hc appends in prefill-sized chunks
            filled = fill(cache, model, tokens, device, dtype, FILL_CHUNK if isinstance(cache, HCCache) else tokens,
                          deadline)
            sync(device)
            row["fill_s"] = time.perf_counter() - started
            if filled < tokens:
                row.update(filled_tokens=filled, skipped="deadline while filling")
                return row
        row["decode_tok_s"], row["decode_steps"] = decode_rate(model, cache, device, deadline)
        if device.type == "cuda":
            row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            row["pinned_host_bytes"] = torch.cuda.host_memory_stats().get("allocated_bytes.current")
        row["host_rss_bytes"] = host_rss()
        if isinstance(cache, HCCache):
            stats = cache.stats()
            row.update(device_bytes=stats.device_bytes, host_bytes=stats.host_bytes,
                       selected_fraction=stats.selected_fraction, kernel=choose(torch.empty(0, device=device), "auto"),
                       host_kernel=choose(torch.empty(0), "auto"))
    except Exception as error:  # noqa: BLE001 - recorded with the row; the next row still runs
        row["error"] = _error(error)
    finally:
        del cache
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", action="store_true", help="toy sizes on any device (what make test runs)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="context lengths, in order (the first gets a real prefill)")
    parser.add_argument("--kernel-lengths", type=int, nargs="*", default=None,
                        help="lengths of the kernel timings (default: --lengths; none: skip them)")
    parser.add_argument("--no-prefill", action="store_true", help="fill the first length directly too")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no end-to-end row starts or goes on filling (GPU time is short)")
    parser.add_argument("--name", default="gpu", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = args.toy or device.type != "cuda"
    shape = TOY if toy else EIGHT_B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    lengths = args.lengths or ([256, 1024] if toy else [32768, 131072, 1048576, 524288])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[dict[str, Any]] = []
    host_kernel = choose(torch.empty(0), "auto")  # builds the CPU kernels now, not inside a timed step
    log.info("host kernels: %s (%.0f s in)", host_kernel, time.perf_counter() - began)

    def save() -> None:
        write_results(args.name, rows, device=name, toy=toy, key_scale=KEY_SCALE, decode_steps=DECODE_STEPS,
                      host_threads=torch.get_num_threads(), host_kernel=host_kernel)

    kernel_shape = dict(heads=2, q_heads=4, dim=32, repeats=2) if toy else {}
    for tokens in lengths if args.kernel_lengths is None else args.kernel_lengths:
        rows += kernel_rows(tokens, device, **kernel_shape)
        log.info("kernels at %d rows: %s", tokens, [(r["what"], r["backend"], r.get("ms", r.get("error")))
                                                      for r in rows if r["tokens"] == tokens and "backend" in r])
        save()
    model = build_model(shape, device, dtype)
    deadline = math.inf if args.deadline is None else began + args.deadline
    for i, tokens in enumerate(lengths):
        for method, make in caches(model, tokens, device).items():
            if isinstance(make, str) or time.perf_counter() > deadline:
                rows.append({"part": "end to end", "tokens": tokens, "cache": method,
                             "skipped": make if isinstance(make, str) else "deadline"})
                continue
            rows.append(end_to_end_row(model, method, make, tokens, i == 0 and not args.no_prefill, device, dtype,
                                       deadline))
            log.info("%s", rows[-1])
            save()
    save()
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
