"""Batched decode across contexts: each context's logits and tokens in a batch are bit-for-bit those it
gets decoded alone; members join and leave at any step; a newcomer's prefill interleaves; a failing
member keeps its error to itself; the pool runs concurrent generations through one batcher."""

from __future__ import annotations

import threading

import pytest
import torch

from hcmemory import ContextPool, HCConfig, HCContext
from hcmemory.batching import STABLE_ROWS, Batcher, batched_step, solo_step

DOC = ("The harbor office keeps its spare keys in the blue cabinet. The night ferry leaves at eleven. "
       "The vault code at the harbor office is 58213. The cafeteria closes at nine. ")
PRESETS = [("full", 1), ("hc-12.5", 6), ("compact", 4), ("full", 3), ("hc-12.5", 2), ("compact", 1)]
"""Presets and document repeats: six members of different lengths, more than ``STABLE_ROWS``."""


@pytest.fixture(scope="module")
def contexts(smollm2) -> list[HCContext]:
    model, tokenizer = smollm2
    made = []
    for preset, repeats in PRESETS:
        ctx = HCContext(model, tokenizer, preset)
        ctx.append(DOC * repeats)
        made.append(ctx)
    return made


def _alone(model, ctx: HCContext, token: int, steps: int) -> list[torch.Tensor]:
    cache = ctx.fork().cache
    step, logits = solo_step(model, cache), []
    for _ in range(steps):
        logits.append(step(token).clone())
        token = int(logits[-1].argmax(-1))
    return logits


def test_a_batch_gives_each_context_the_logits_it_gets_alone(smollm2, contexts):
    model, _ = smollm2
    assert len(contexts) > STABLE_ROWS  # the batch is wider than a lone context's
    steps = 6
    alone = [_alone(model, ctx, 100 + i, steps) for i, ctx in enumerate(contexts)]
    caches = [ctx.fork().cache for ctx in contexts]
    tokens = [100 + i for i in range(len(contexts))]
    for s in range(steps):
        results = batched_step(model, list(zip(caches, tokens)))
        for i, logits in enumerate(results):
            assert torch.equal(logits, alone[i][s]), (i, s)
        tokens = [int(logits.argmax(-1)) for logits in results]
    assert [cache.seen for cache in caches] == [ctx.cache.seen + steps for ctx in contexts]


def test_members_that_sit_out_steps_continue_exactly(smollm2, contexts):
    """A member that leaves for some steps and joins again gets the logits it gets alone at each of its steps."""
    model, _ = smollm2
    steps = 5
    alone = [_alone(model, ctx, 7, steps) for ctx in contexts]
    caches = [ctx.fork().cache for ctx in contexts]
    tokens, done = [7] * len(caches), [0] * len(caches)
    for s in range(steps + 3):
        members = [i for i in range(len(caches)) if done[i] < steps and (s + i) % 3]  # each sits out every third
        for i, logits in zip(members, batched_step(model, [(caches[i], tokens[i]) for i in members])):
            assert torch.equal(logits, alone[i][done[i]])
            tokens[i], done[i] = int(logits.argmax(-1)), done[i] + 1


def test_a_failing_member_gets_its_error_and_the_others_their_logits(smollm2, contexts, monkeypatch):
    model, _ = smollm2
    alone = [_alone(model, ctx, 11, 1)[0] for ctx in contexts]
    forks = [ctx.fork() for ctx in contexts]
    broken = forks[1].cache.layers[3]

    def fail(*args, **kwargs):
        raise RuntimeError("attention broke")

    before = forks[1].next_logits(" The")
    monkeypatch.setattr(broken, "after_attention", fail)  # run after every attention step of this layer
    with forks[1].cache.transaction(commit=False):  # the turn's transaction rolls the partial step back
        results = batched_step(model, [(fork.cache, 11) for fork in forks])
    assert isinstance(results[1], RuntimeError) and "attention broke" in str(results[1])
    for i, result in enumerate(results):
        if i != 1:
            assert torch.equal(result, alone[i])
    monkeypatch.undo()
    assert forks[1].cache.seen == contexts[1].cache.seen
    assert torch.equal(forks[1].next_logits(" The"), before)


def test_concurrent_generations_in_a_pool_equal_each_run_alone(smollm2):
    """Generations on several threads decode together (the batch holds several of them at once), join and
    leave at different steps (lengths, a stop string), and give exactly the text and tokens of each run
    alone; a newcomer's chunked prefill runs between their steps."""
    model, tokenizer = smollm2
    config = HCConfig.preset("hc-12.5", chunk_size=64)
    requests = [(DOC * 2 + "Count: 1, 2, 3,", 18, None), (DOC + "Count: 10, 11, 12,", 10, None),
                (DOC * 5 + "Count: 5, 6, 7,", 24, None), ("Count: 1, 2, 3, 4,", 20, [" 9"]),
                (DOC * 3 + "Count: 20, 21, 22,", 16, None)]
    prompts = [tokenizer(text).input_ids for text, _, _ in requests]
    decoding = threading.Event()

    def answer(pool: ContextPool, i: int) -> tuple[str, str | None, tuple[int, ...]]:
        _, max_new, stop = requests[i]
        generation = pool.generate(prompts[i], f"c{i}", max_new_tokens=max_new, stop=stop)
        pieces = []
        for piece in generation:
            pieces.append(piece)
            decoding.set()
        return "".join(pieces), generation.info.finish_reason, tuple(pool.get(f"c{i}").token_ids)

    alone_pool = ContextPool(model, tokenizer, config=config, batching=False)
    alone = [answer(alone_pool, i) for i in range(len(requests))]
    assert alone[3][1] == "stop" and " 9" not in alone[3][0]  # the stop string ended that one early
    decoding.clear()

    batcher = Batcher(model, max_wait=0.05)
    pool = ContextPool(model, tokenizer, config=config)
    pool.batcher = batcher
    results: list[tuple[str, str | None, tuple[int, ...]] | None] = [None] * len(requests)
    start = threading.Barrier(len(requests) - 1)

    def worker(i: int) -> None:
        if i < len(requests) - 1:
            start.wait(timeout=60)
        else:
            assert decoding.wait(timeout=300)  # the newcomer arrives while the others decode
        results[i] = answer(pool, i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
        assert not thread.is_alive()
    assert results == alone
    assert batcher.counts.largest_batch >= 3
    assert batcher.counts.chunks > len(requests)  # prefills ran as chunks on the batcher's thread
    assert batcher._decoders == 0


def test_a_closed_generation_leaves_the_batch_and_keeps_nothing(smollm2):
    model, tokenizer = smollm2
    batcher = Batcher(model, max_wait=0.05)
    pool = ContextPool(model, tokenizer, config="full")
    pool.batcher = batcher
    alone_pool = ContextPool(model, tokenizer, config="full", batching=False)
    prompt = tokenizer(DOC + "Count to forty: 1, 2, 3,").input_ids
    expected = alone_pool.generate(prompt, "other", max_new_tokens=24).text()

    closed_ctx = pool.get("closed")
    closed_ctx.append(DOC)
    held = len(closed_ctx)
    first_piece = threading.Event()
    out: dict[str, str] = {}

    def other() -> None:
        first_piece.wait(timeout=120)
        out["other"] = pool.generate(prompt, "other", max_new_tokens=24).text()

    thread = threading.Thread(target=other)
    thread.start()
    closed = closed_ctx.stream("Count: 1, 2, 3,", commit=True, max_new_tokens=60, raw=True)
    next(closed)
    first_piece.set()
    while batcher.counts.largest_batch < 2:  # both decode in one forward before one leaves
        next(closed)
    closed.close()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert out["other"] == expected
    assert len(closed_ctx) == held and closed_ctx.cache.seen == held  # the closed turn was rolled back


def test_a_forward_that_fails_for_all_fails_each_member_and_each_step_rolls_back(smollm2, contexts, monkeypatch):
    model, _ = smollm2
    forks = [ctx.fork() for ctx in contexts[:2]]
    before = [fork.next_logits(" The") for fork in forks]
    batcher = Batcher(model, max_wait=30.0)  # the step runs once both members have submitted theirs
    joined = threading.Barrier(2)
    errors: list[BaseException | None] = [None, None]

    def broken_head(*args, **kwargs):
        raise RuntimeError("the weights broke")

    monkeypatch.setattr(model.lm_head, "forward", broken_head)

    def member(i: int) -> None:
        with batcher.decoding(forks[i].cache) as step:
            joined.wait(timeout=60)
            try:
                with forks[i].cache.transaction():
                    step(5)
            except RuntimeError as exc:
                errors[i] = exc

    threads = [threading.Thread(target=member, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive()
    monkeypatch.undo()
    assert batcher.counts.forwards == 0 and batcher.counts.largest_batch == 0  # no forward completed
    for error in errors:
        assert error is not None and "2 contexts failed" in str(error) and "the weights broke" in str(error.__cause__)
    assert errors[0] is not errors[1]
    assert all(torch.equal(fork.next_logits(" The"), logits) for fork, logits in zip(forks, before))
    assert [fork.cache.seen for fork in forks] == [ctx.cache.seen for ctx in contexts[:2]]
