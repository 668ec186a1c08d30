"""HCContext: append without re-prefill, questions that leave no trace, transactions, forks, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from hcmemory import HCConfig, HCContext

DOC = ("The harbor office keeps its spare keys in the blue cabinet. The night ferry leaves at eleven. "
       "The vault code at the harbor office is 58213. The cafeteria closes at nine. ")


def test_append_then_ask_equals_fresh_context_on_concatenated_text(smollm2):
    model, tokenizer = smollm2
    parts = [DOC, "Visitors sign the book at the gate. ", "Boats are refuelled on Tuesdays. "]
    grown = HCContext(model, tokenizer, HCConfig.preset("full", chunk_size=32))
    for part in parts:
        grown.append(part)
    fresh = HCContext(model, tokenizer, "full")
    fresh.append(grown.token_ids)  # the same tokens, prefilled in one go
    question = "\n\nWhat is the vault code at the harbor office?" + grown.format.close
    assert grown.ask(question, max_new_tokens=16, raw=True) == fresh.ask(question, max_new_tokens=16, raw=True)
    assert torch.allclose(grown.next_logits(" The"), fresh.next_logits(" The"), atol=1e-4)
    assert grown.stats().tokens_prefilled == len(grown), "each token is prefilled exactly once"


def test_ask_leaves_state_and_stats_unchanged(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    before_stats, before_logits = ctx.stats(), ctx.next_logits(" The")
    answer = ctx.ask("What is the vault code at the harbor office?", max_new_tokens=20)
    assert "58213" in answer
    assert ctx.stats() == before_stats
    assert torch.allclose(ctx.next_logits(" The"), before_logits, atol=1e-5)


def test_chat_commits_the_turn(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    n = len(ctx)
    reply = ctx.chat("What is the vault code?", max_new_tokens=12)
    assert reply
    assert len(ctx) > n
    assert ctx.cache.get_seq_length() == len(ctx)
    assert ctx.stats().tokens_prefilled < len(ctx), "generated tokens are decoded, not prefilled"


def test_stream_yields_the_same_text_as_ask(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    q = "When does the night ferry leave?"
    assert "".join(ctx.stream(q, max_new_tokens=12)) == ctx.ask(q, max_new_tokens=12)


def test_stop_strings_cut_the_answer(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    full = ctx.ask("Describe the harbor office.", max_new_tokens=24)
    word = full.split()[2]
    cut = ctx.ask("Describe the harbor office.", max_new_tokens=24, stop=[word])
    assert word not in cut and full.startswith(cut)


@pytest.mark.parametrize("preset", ["full", "h2o"])
def test_interrupted_append_rolls_back(smollm2, monkeypatch, preset):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, HCConfig.preset(preset, chunk_size=16))
    ctx.append(DOC)
    before_stats, before_logits, before_ids = ctx.stats(), ctx.next_logits(" The"), list(ctx.token_ids)
    calls = {"n": 0}
    forward = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        ctx.append(DOC * 2)
    monkeypatch.setattr(model, "forward", forward)
    assert ctx.token_ids == before_ids
    assert ctx.stats() == before_stats
    assert torch.allclose(ctx.next_logits(" The"), before_logits, atol=1e-5)


def test_fork_is_independent_and_shares_until_written(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(DOC)
    base_logits = ctx.next_logits(" The")
    branch = ctx.fork()
    layer0 = ctx.cache.layers[0].values.rows
    assert branch.cache.layers[0].values.rows.data.data_ptr() == layer0.data.data_ptr()
    branch.append("The vault code was changed to 77421. ")
    assert torch.allclose(ctx.next_logits(" The"), base_logits, atol=1e-5)
    assert len(branch) > len(ctx)
    assert not torch.allclose(branch.next_logits(" The"), base_logits, atol=1e-3)


def test_bad_input_is_refused_with_a_clear_error(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    with pytest.raises(ValueError, match="vocabulary"):
        ctx.append([1, 2, 10**9])
    with pytest.raises(TypeError, match="string"):
        ctx.append([1.5, 2.5])
    with pytest.raises(ValueError, match="empty"):
        ctx.ask("   ")
    with pytest.raises(ValueError, match="preset"):
        HCContext(model, tokenizer, "no-such-preset")
    assert len(ctx) == 0 and ctx.stats().tokens_seen == 0


def test_threads_do_not_mix_tokens(smollm2):
    """8 threads × 5 contexts: every context ends with exactly the tokens appended to it, in order."""
    model, tokenizer = smollm2
    contexts = [HCContext(model, tokenizer, "full") for _ in range(5)]
    pieces = {i: [[100 + i, 200 + t, 300 + j] for t in range(8) for j in range(2)] for i in range(5)}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i, ctx in enumerate(contexts):
                for j in range(2):
                    ctx.append([100 + i, 200 + t, 300 + j])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i, ctx in enumerate(contexts):
        triples = [ctx.token_ids[k:k + 3] for k in range(0, len(ctx), 3)]
        assert sorted(triples) == sorted(pieces[i])
        assert ctx.cache.get_seq_length() == len(ctx) == 48
        # the live state equals a fresh context given the same tokens in the same order
        fresh = HCContext(model, tokenizer, "full")
        fresh.append(ctx.token_ids)
        assert torch.allclose(ctx.next_logits([5]), fresh.next_logits([5]), atol=1e-4)
