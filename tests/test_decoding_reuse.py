"""Decoding and prefix reuse on the embedded model: stop strings never leak a partial match, and a
reused prefix answers exactly as a fresh prefill of the same prompt, whatever the preset."""

from __future__ import annotations

import pytest
import torch

from hcmemory import HCContext
from hcmemory.config import PRESETS

COUNTING = "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10."


@pytest.fixture(scope="module")
def counting(smollm2) -> HCContext:
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "full")
    ctx.append(COUNTING, raw=True)
    assert ctx.ask(" Again:", max_new_tokens=17, raw=True) == " 1, 2, 3, 4, 5, 6", "the model must count again"
    return ctx


# --- stop strings -------------------------------------------------------------------------------


def test_a_stop_string_spanning_tokens_leaves_no_partial_match_in_the_answer(counting):
    # "3, 4" arrives as four tokens ("3", ",", " ", "4"): none of them may be shown before it is resolved
    pieces = list(counting.stream(" Again:", max_new_tokens=12, stop=["3, 4"], raw=True))
    assert "".join(pieces) == " 1, 2, ", pieces
    assert counting.ask(" Again:", max_new_tokens=12, stop=["3, 4"], raw=True) == " 1, 2, "


def test_the_earliest_of_several_stop_strings_ends_the_answer(counting):
    assert counting.ask(" Again:", max_new_tokens=12, stop=["5", "2, 3, 9", "3,"], raw=True) == " 1, 2, "


def test_text_held_back_for_a_stop_string_that_never_completes_is_still_returned(counting):
    # every ", N" begins like the stop string ", X" and is held back, then released whole
    pieces = list(counting.stream(" Again:", max_new_tokens=17, stop=[", X"], raw=True))
    assert "".join(pieces) == " 1, 2, 3, 4, 5, 6"
    # and the text held when the answer runs out of tokens is returned too
    assert counting.ask(" Again:", max_new_tokens=8, stop=["3, 4, 9"], raw=True) == " 1, 2, 3"


def test_langchain_cuts_a_partial_stop_string_in_calls_streams_and_async_streams():
    import asyncio

    from hcmemory.integrations.langchain import HCAttentionLLM

    llm = HCAttentionLLM(max_tokens=12, chat_template=False, preset="full", context_id="stop-strings")
    prompt = COUNTING + " Again:"
    assert llm.invoke(prompt, stop=["3, 4"]) == " 1, 2, "
    assert "".join(llm.stream(prompt, stop=["3, 4"])) == " 1, 2, "

    async def pieces() -> tuple[str, dict]:
        streamed = "".join([chunk async for chunk in llm.astream(prompt, stop=["3, 4"])])
        result = await llm.agenerate([prompt], stop=["3, 4"])
        return streamed, result.generations[0][0].generation_info

    streamed, info = asyncio.run(pieces())
    assert streamed == " 1, 2, "
    assert info["finish_reason"] == "stop" and info["tokens_reused"] > 0, "async calls keep the counters"


def test_chat_messages_are_rendered_as_text_and_other_blocks_refused():
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from hcmemory.integrations.langchain import message_dicts

    assert message_dicts([SystemMessage("Be brief."), HumanMessage([{"type": "text", "text": "Hi"}]),
                          AIMessage("Hello.")]) == [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello."}]
    with pytest.raises(ValueError, match="text only; 'image_url'"):
        message_dicts([HumanMessage([{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}])])


# --- prefix reuse -------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Reuse and a fresh prefill run the same rows through forwards of different lengths; with several
    threads the BLAS splits them differently, and the last-bit differences that leaves are amplified by
    the quantizing presets (VQ codes flip): ~5e-3 on the logits at 2 threads.  On one thread the
    arithmetic is the same, so these tests can ask for the same logits, not merely close ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FACT = "The vault code is 58213. "
DETOUR = ("The ferry leaves at nine, the cafeteria closes on Sundays, and the lighthouse keeper, who "
          "has lived on the island for thirty years, repaints the stairs every spring before the storms. ")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_reused_prefix_answers_exactly_as_a_fresh_prefill_of_the_same_prompt(smollm2, preset, one_thread):
    model, tokenizer = smollm2
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    prompt = ids(FACT + "Question: what is the vault code? Answer:")
    held = ids(FACT + 2 * DETOUR)  # past sink_tokens + recent_tokens, so the fact's rows left the recent window
    assert len(held) > 68 + 8 and len(prompt) < 40
    reused = HCContext(model, tokenizer, preset)
    reused.append(held)
    fresh = HCContext(model, tokenizer, preset)
    answers = [ctx.generate(prompt, max_new_tokens=6) for ctx in (reused, fresh)]
    texts = [answer.text() for answer in answers]
    assert answers[1].info.tokens_reused == 0
    # attention mass folded into the rows by the detour would steer later evictions: nothing is reused then
    assert (answers[0].info.tokens_reused > 0) != reused.cache.layers[0].observes_attention
    assert texts[0] == texts[1]
    assert reused.token_ids == fresh.token_ids
    torch.testing.assert_close(reused.next_logits(" The"), fresh.next_logits(" The"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_truncate_leaves_exactly_a_context_that_stopped_there(smollm2, preset, one_thread):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, preset)
    ctx.append(FACT, raw=True)
    short, reference = list(ctx.token_ids), ctx.next_logits(" The")
    ctx.append(2 * DETOUR, raw=True)
    ctx.truncate(len(short))
    assert ctx.token_ids == short and ctx.cache.seen == len(short) and ctx.stats().tokens_prefilled == len(short)
    torch.testing.assert_close(ctx.next_logits(" The"), reference, atol=1e-4, rtol=0)


# --- the C++ kernels: built only where used, named by what they are built from --------------------


def test_kernel_builds_are_named_by_their_inputs_not_by_the_torch_version_alone():
    import torch

    from hcmemory.kernels import cpu_kernels

    name = cpu_kernels.build_name(["-O3"], [])
    assert name == cpu_kernels.build_name(["-O3"], []), "the name must be stable, or every load rebuilds"
    assert name != cpu_kernels.build_name(["-O3", "-mavx2"], []) != cpu_kernels.build_name(["-O3"], ["-fopenmp"])
    assert torch.__version__.replace(".", "_") not in name


def test_a_context_that_runs_no_kernel_never_builds_or_loads_them():
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        from hcmemory import HCContext, load_model
        from hcmemory.kernels import cpu_kernels

        model, tokenizer = load_model()
        for preset in ("full", "kivi-4", "streaming"):
            ctx = HCContext(model, tokenizer, preset)
            ctx.append("The ferry leaves at nine. " * 4)
            ctx.ask("When does the ferry leave?", max_new_tokens=2)
        print("loaded" if cpu_kernels._module is not None or cpu_kernels.failure() else "never loaded")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "never loaded"


# --- the example agent's tools on model output ----------------------------------------------------


def test_the_calculator_refuses_huge_numbers_at_once_and_still_does_arithmetic(tmp_path):
    import time

    from hcmemory.integrations.langgraph import Tools, calculate

    tools = Tools(tmp_path / "none.txt")
    assert calculate("2 + 3 * 4") == 14 and calculate("2 ** 10 / 4") == 256 and calculate("-(7 % 4) // 2") == -2
    started = time.perf_counter()
    for expression in ("9**9**9", "(10**99)**2", "10**99 * 10**99", "2**-10**200", "(-8) ** 0.5", "1" * 150):
        with pytest.raises(ValueError):
            calculate(expression)
    assert time.perf_counter() - started < 1.0
    for expression in ("__import__('os').system('true')", "x + 1", "abs(-1)", "'a' * 10", "(" * 300 + "1" + ")" * 300):
        assert tools.run("calculator", expression).startswith("calculator error:"), expression
    assert tools.run("calculator", "9**9**9") == "calculator error: 9**387420489 has more than 100 digits"


def test_read_page_answers_the_model_about_a_bad_page_number(tmp_path):
    from hcmemory.integrations.langgraph import Tools

    (tmp_path / "log.txt").write_text("a" * 25)
    tools = Tools(tmp_path / "log.txt", page_chars=10)
    assert tools.run("read_page", " '2' ") == "Page 2 of 3:\n" + "a" * 10
    for argument in ("²", "٣", "0", "4", "two", "", "1e3", "99999999999999999999"):
        assert tools.run("read_page", argument) == (
            f"read_page takes a page number from 1 to 3, e.g. read_page(1); {argument.strip()!r} is not one.")
