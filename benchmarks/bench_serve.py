"""`hcmemory serve` under conversations, through the real `openai` client, on 127.0.0.1 only.

* **Reuse vs a stateless server.**  N conversations x T turns over the 5.7K-token demo document
  (turn 1: document + first question; later turns: the history + the next question), streamed.
  Each request is sent twice, interleaved: once in its conversation (``x-session-id``: the server
  continues the memory it holds) and once as a stateless server would see it (a new id per request, so
  nothing can be reused: the whole prompt is prefilled, as by a server without a prompt cache).  Both
  arms send the same messages (the history holds the reuse arm's answers).  Reported per turn: time to
  the first streamed token (median over conversations), cached prompt tokens, and the speed-up.
* **Capacity.**  Host bytes one live 8K-token conversation holds (``CacheStats.reserved_bytes``, what
  the server's memory cap counts) for DynamicCache, ``full``, ``hc-12.5`` and ``compact``, and so how
  many fit in 1 GB.

Run: ``python -m benchmarks.bench_serve [--conversations 8 --turns 4]`` (results in
``benchmarks/results/serve.json``).  The first arm's turn 1 prefills the document once per
conversation; the stateless arm prefills it on every request, which is where the time goes on a CPU.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from hcmemory.demo import demo_document

from .common import RESULTS, haystack_ids, print_table, write_results

MODEL = "smollm2-135m-instruct"
MAX_NEW = 16
CAPACITY_TOKENS = 8000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "hcmemory.cli", "serve", "--port", str(port), "--store", str(store)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"hcmemory serve exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("hcmemory serve did not answer /health within 300 s")


def ask(client, messages: list[dict], session: str) -> tuple[float, str, int, int]:
    """(seconds to the first token, answer, prompt tokens, cached tokens) of one streamed request."""
    started, first, pieces, usage = time.perf_counter(), None, [], None
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_headers={"x-session-id": session})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started if first is None else first
            pieces.append(chunk.choices[0].delta.content)
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return first if first is not None else time.perf_counter() - started, "".join(pieces), usage.prompt_tokens, cached


def conversations(port: int, count: int, turns: int) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)
    document, questions = demo_document()
    histories = {c: [] for c in range(count)}
    rows = []
    with tqdm(total=count * turns * 2, desc="requests", unit="req") as progress:
        for turn in range(turns):
            for c in range(count):
                question = questions[(c + turn) % len(questions)]["question"]
                content = f"{document}\n\nAnswer from the document above. {question}" if turn == 0 else question
                messages = [*histories[c], {"role": "user", "content": content}]
                for arm, session in (("reuse", f"bench-{c}"), ("stateless", uuid.uuid4().hex)):
                    first, answer, prompt, cached = ask(client, messages, session)
                    rows.append({"arm": arm, "conversation": c, "turn": turn + 1, "first_token_s": first,
                                 "prompt_tokens": prompt, "cached_tokens": cached})
                    if arm == "reuse":
                        histories[c] = [*messages, {"role": "assistant", "content": answer}]
                    else:  # a stateless server keeps nothing: neither should its stand-in's memory cap
                        client.delete(f"/contexts/{session}", cast_to=object)
                    progress.update()
    return rows


def per_turn(rows: list[dict], turns: int) -> list[dict]:
    table = []
    for turn in range(1, turns + 1):
        reuse = [r for r in rows if r["turn"] == turn and r["arm"] == "reuse"]
        stateless = [r for r in rows if r["turn"] == turn and r["arm"] == "stateless"]
        a = statistics.median(r["first_token_s"] for r in reuse)
        b = statistics.median(r["first_token_s"] for r in stateless)
        table.append({"turn": turn, "prompt_tokens": statistics.median(r["prompt_tokens"] for r in reuse),
                      "cached_share": statistics.median(r["cached_tokens"] / r["prompt_tokens"] for r in reuse),
                      "ttft_reuse_s": a, "ttft_stateless_s": b, "speedup": b / a})
    return table


def capacity() -> list[dict]:
    """Host bytes per live 8K-token conversation, by cache."""
    import torch
    from transformers import DynamicCache

    from hcmemory import HCContext, cache_kwarg
    from hcmemory.models import shared_model

    model, tokenizer = shared_model()
    ids = haystack_ids(tokenizer, CAPACITY_TOKENS)
    rows = []
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for start in range(0, len(ids), 1024):
            model(torch.tensor([ids[start:start + 1024]]), use_cache=True, **cache_kwarg(model, cache))
    dynamic = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    rows.append({"cache": "DynamicCache", "bytes": dynamic})
    del cache
    for preset in ("full", "hc-12.5", "compact"):
        ctx = HCContext(model, tokenizer, preset)
        ctx.append(ids, progress=False)
        rows.append({"cache": preset, "bytes": ctx.cache.stats().reserved_bytes})
        ctx.close()
    for row in rows:
        row["mb"] = row["bytes"] / 2**20
        row["per_gb"] = 2**30 / row["bytes"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--skip-capacity", action="store_true")
    args = parser.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hcmemory-bench-serve-") as store:
        server = start_server(Path(store), port)
        try:
            rows = conversations(port, args.conversations, args.turns)
        finally:
            server.terminate()
            server.wait(timeout=120)
    turns = per_turn(rows, args.turns)
    print_table(turns, ["turn", "prompt_tokens", "cached_share", "ttft_reuse_s", "ttft_stateless_s", "speedup"],
                f"time to first token, {args.conversations} conversations (median), reuse vs stateless")
    caps = [] if args.skip_capacity else capacity()
    if caps:
        print_table(caps, ["cache", "mb", "per_gb"], f"host memory per live {CAPACITY_TOKENS}-token conversation")
    path = write_results("serve", rows, per_turn=turns, capacity=caps, conversations=args.conversations,
                         turns=args.turns, max_new_tokens=MAX_NEW)
    print(f"\nwritten to {path.relative_to(RESULTS.parent) if path.is_relative_to(RESULTS.parent) else path}")


if __name__ == "__main__":
    main()
