"""Batched decode across conversations (``hcmemory.batching``): aggregate decode throughput and a
newcomer's time to first token, batched vs one conversation at a time.

* **Throughput.**  N conversations (1, 2, 4, 8) of L context tokens each (2K and 7.5K of the shipped
  prose filler, ``hc-12.5``) decode ``--tokens`` greedy tokens each.  *Batched*: one thread per
  conversation, every step through one ``Batcher`` (one forward per step for all of them, the pool's and
  the server's default).  *One at a time*: the conversations decoded one after the other with a plain
  forward per token (what the server did before: one model thread, jobs in arrival order).  Aggregate
  tokens/s = N x tokens / wall time; the one-at-a-time time of N conversations is that of the first N of
  one sequential run of the largest N.  Rounds interleave the two arms (their order alternating); medians.
  The conversations are forks of one prefilled context (copy-on-write), each started on a different token,
  and each fork's first step, which copies the shared stores, is outside the timing.
* **Time to first token** of a conversation that arrives (a new ``--newcomer``-token prompt) while 4
  others decode ``--tokens`` tokens each: batched, its prefill chunks run between the others' steps; one at
  a time, it waits for the 4 answers in front of it, then prefills.

Run: ``python -m benchmarks.bench_throughput [--threads 2 --rounds 2 --tokens 8]`` (results in
``benchmarks/results/throughput.json``, rewritten after each length, so a run cut short keeps what it
measured); the torch thread count and the machine's load average are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

from hcmemory import HCConfig, HCContext
from hcmemory.batching import Batcher
from hcmemory.decoding import model_step
from hcmemory.models import shared_model
from hcmemory.prefill import prefill

from .common import haystack_ids, print_table, write_results

PRESET = "hc-12.5"
ARMS = ("batched", "one at a time")


def _forks(base: HCContext, n: int) -> list[HCContext]:
    """``n`` copies of ``base``, each one plain step in (so the copy-on-write copies are made untimed)."""
    forks = [base.fork() for _ in range(n)]
    for i, fork in enumerate(forks):
        model_step(fork.model, fork.cache)(1000 + i)
    return forks


def _greedy(step: Callable[[int], torch.Tensor], token: int, tokens: int) -> None:
    for _ in range(tokens):
        token = int(step(token).argmax(-1))


def batched(base: HCContext, n: int, tokens: int) -> float:
    """Seconds for ``n`` conversations to decode ``tokens`` each, together through one batcher."""
    forks = _forks(base, n)
    batcher = Batcher(base.model)
    start = threading.Barrier(n + 1)

    def run(i: int) -> None:
        with batcher.decoding(forks[i].cache) as step:
            start.wait(timeout=60)
            _greedy(step, 2000 + i, tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    start.wait(timeout=60)
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout=3600)
    return time.perf_counter() - began


def one_at_a_time(base: HCContext, n: int, tokens: int) -> list[float]:
    """Seconds each of ``n`` conversations takes to decode ``tokens``, one after the other: the first k of
    them are the one-at-a-time run of k conversations."""
    forks = _forks(base, n)
    seconds = []
    for i, fork in enumerate(forks):
        began = time.perf_counter()
        _greedy(model_step(fork.model, fork.cache), 2000 + i, tokens)
        seconds.append(time.perf_counter() - began)
    return seconds


def ttft_batched(base: HCContext, newcomer: list[int], tokens: int, chunk_size: int) -> float:
    """Seconds from a newcomer's arrival to its first token while 4 others decode through the batcher."""
    forks = _forks(base, 4)
    batcher = Batcher(base.model)
    decoding = threading.Barrier(5)

    def run(i: int) -> None:
        with batcher.decoding(forks[i].cache) as step:
            decoding.wait(timeout=60)
            _greedy(step, 2000 + i, tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    decoding.wait(timeout=60)
    began = time.perf_counter()
    cache = HCContext(base.model, base.tokenizer, base.config).cache
    logits = prefill(base.model, cache, torch.tensor([newcomer]), chunk_size, False, batcher.prefill_forward(cache))
    int(logits.argmax(-1))
    first = time.perf_counter() - began
    for thread in threads:
        thread.join(timeout=3600)
    return first


def ttft_one_at_a_time(base: HCContext, newcomer: list[int], tokens: int, chunk_size: int) -> float:
    forks = _forks(base, 4)
    began = time.perf_counter()
    for i, fork in enumerate(forks):
        _greedy(model_step(fork.model, fork.cache), 2000 + i, tokens)
    cache = HCContext(base.model, base.tokenizer, base.config).cache
    int(prefill(base.model, cache, torch.tensor([newcomer]), chunk_size, False).argmax(-1))
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 7500])
    parser.add_argument("--conversations", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=8, help="decode tokens per conversation and point")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--newcomer", type=int, default=2000, help="prompt tokens of the late conversation")
    parser.add_argument("--name", default="throughput")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tokenizer = shared_model()
    config = HCConfig.preset(PRESET)
    rows: list[dict] = []
    for length in args.lengths:
        base = HCContext(model, tokenizer, config)
        began = time.perf_counter()
        base.append(haystack_ids(tokenizer, length, seed=1))
        print(f"{length} tokens prefilled in {time.perf_counter() - began:.1f} s", flush=True)
        times: dict[tuple[int, str], list[float]] = {}
        for r in range(args.rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                if arm == "batched":
                    for n in args.conversations:
                        times.setdefault((n, arm), []).append(batched(base, n, args.tokens))
                else:
                    sequence = one_at_a_time(base, max(args.conversations), args.tokens)
                    for n in args.conversations:
                        times.setdefault((n, arm), []).append(sum(sequence[:n]))
            print(f"  round {r + 1} of {length} tokens done", flush=True)
        single = statistics.median(times[(1, "one at a time")])
        for n in args.conversations:
            row = {"part": "throughput", "context_tokens": length, "conversations": n}
            for arm in ("batched", "one at a time"):
                seconds = statistics.median(times[(n, arm)])
                row[f"{arm} tok/s"] = n * args.tokens / seconds
            row["batched / one at a time"] = row["batched tok/s"] / row["one at a time tok/s"]
            row["batched / single conversation"] = row["batched tok/s"] * single / args.tokens
            rows.append(row)
        if length == args.lengths[0]:
            newcomer = haystack_ids(tokenizer, args.newcomer, seed=2)
            ttft: dict[str, list[float]] = {arm: [] for arm in ARMS}
            runs = {"batched": ttft_batched, "one at a time": ttft_one_at_a_time}
            for r in range(args.rounds):
                for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                    ttft[arm].append(runs[arm](base, newcomer, args.tokens, config.chunk_size))
            rows.append({"part": "ttft", "context_tokens": length, "conversations": 4,
                         "newcomer_tokens": args.newcomer,
                         **{f"{arm} ttft_s": statistics.median(values) for arm, values in ttft.items()}})
        base.close()
        path = write_results(args.name, rows, preset=PRESET, tokens=args.tokens, rounds=args.rounds,
                             load_average_before=load_before, load_average_after=os.getloadavg())
    print_table([r for r in rows if r["part"] == "throughput"],
                ["context_tokens", "conversations", "batched tok/s", "one at a time tok/s", "batched / one at a time",
                 "batched / single conversation"], "Aggregate decode throughput (medians)")
    print_table([r for r in rows if r["part"] == "ttft"],
                ["context_tokens", "conversations", "newcomer_tokens", "batched ttft_s", "one at a time ttft_s"],
                "Time to first token of a newcomer while 4 decode (medians)")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
