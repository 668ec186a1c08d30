"""Constrained decoding on the real 135M model, through the library's own answering path
(``HCContext.generate`` / ``ask`` / ``chat`` / ``stream``, ``ContextPool.generate``): every answer
under a constraint parses and validates, greedy and sampled; tool calls parse for each tool_choice;
overlays, commits, streams, forks and prefix reuse each get their own matcher; a budget that ends
mid-answer raises and keeps nothing; bad constraints are refused before any token is generated;
compiled constraints are cached."""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from hcmemory import ContextPool, HCContext
from hcmemory.constrained import (Choice, IncompleteOutput, JsonObject, JsonSchema, Regex, ToolCalls, cache_info,
                                  chat_turns, clear_cache, compile_constraint)


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: Literal["red", "green", "blue"]
    # multipleOf bounds the digits after the point: a sampled number can otherwise go on until the budget ends
    price: float = Field(ge=0, le=1000, multiple_of=0.01)
    count: int = Field(ge=1, le=9)


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    address: Address


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: list[Literal["new", "paid", "sent"]] = Field(min_length=1, max_length=3)
    total: float = Field(multiple_of=0.01)


SCHEMAS = {  # name: (constraint, validator, prompt)
    "enum_and_numbers": (JsonSchema(Item), Item, "Describe one item for sale as JSON."),
    "nested_object": (JsonSchema(Person), Person, "Describe a person and their address as JSON."),
    # the same shape as Order, given as a plain dict schema
    "array_dict_schema": (JsonSchema(json.dumps(Order.model_json_schema())), Order, "Describe an order as JSON."),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)


class AddArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int
    b: int


ARGUMENTS = {"get_weather": WeatherArgs, "add": AddArgs}


def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], constraint: Any, max_new_tokens: int,
             temperature: float = 0.0, seed: int | None = None) -> str:
    """A whole chat prompt answered by a fresh context under ``constraint``, greedy or sampled."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ctx = HCContext(model, tokenizer, "full")
    return ctx.generate(ids["input_ids"], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        constraint=constraint).text()


@pytest.mark.parametrize("name,temperature,seed", [(name, 0.0, None) for name in SCHEMAS] + [
    (name, 1.0, seed) for seed, name in enumerate(SCHEMAS)])
def test_json_schema_answers_parse_and_validate(smollm2, name, temperature, seed):
    model, tokenizer = smollm2
    constraint, validator, prompt = SCHEMAS[name]
    messages = [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": prompt}]
    text = generate(model, tokenizer, messages, constraint, 96, temperature, seed)
    validator.model_validate(constraint.parse(text), strict=True)


def test_budget_ending_mid_json_raises_and_keeps_nothing(smollm2):
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "hc-12.5")
    ctx.append("Ada Lovelace lived in London.")
    before, logits = list(ctx.token_ids), ctx.next_logits(" The")
    with pytest.raises(IncompleteOutput, match="max_new_tokens") as raised:
        ctx.chat("Ada as JSON.", max_new_tokens=5, constraint=JsonSchema(Person))
    assert raised.value.text.startswith('{"name": ')
    assert ctx.token_ids == before  # the committed turn was rolled back whole
    torch.testing.assert_close(ctx.next_logits(" The"), logits, atol=1e-5, rtol=0)


def test_regex_and_choice(smollm2):
    model, tokenizer = smollm2
    # [0-9], not \d: the engine's \d is Unicode (it matches every script's digits, as Python's does)
    text = generate(model, tokenizer, [{"role": "user", "content": "When did the Second World War end?"}],
                    Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), 16)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text), text
    options = ["yes", "no", "it depends"]
    text = generate(model, tokenizer, [{"role": "user", "content": "Is the sky blue?"}], Choice(options), 8,
                    temperature=1.0, seed=3)
    assert text in options, text


DOC = ("Order 4471 was paid on Monday and sent on Tuesday; its total is 35.50 euros. The customer, Ines Duarte, "
       "lives in Porto, postcode 40001.")


def test_overlays_commits_streams_and_forks_each_answer_under_their_constraint(smollm2):
    """ask (an overlay, rolled back), chat (committed), a stream and a fork's answer: each parses, and
    each leaves the state exactly as its call says."""
    model, tokenizer = smollm2
    ctx = HCContext(model, tokenizer, "hc-12.5")
    ctx.append(DOC)
    held = list(ctx.token_ids)
    order, _, _ = SCHEMAS["array_dict_schema"]
    asked = ctx.ask("The order as JSON.", max_new_tokens=48, constraint=order)
    Order.model_validate(order.parse(asked), strict=True)
    assert ctx.token_ids == held  # an overlay: nothing kept
    person = JsonSchema(Person)
    pieces = list(ctx.stream("The customer as JSON.", commit=True, max_new_tokens=48, temperature=1.0, seed=5,
                             constraint=person))
    Person.model_validate(person.parse("".join(pieces)), strict=True)
    assert len(pieces) > 1 and len(ctx) > len(held)  # streamed piece by piece, and committed
    twin = ctx.fork()
    # stop strings are ignored under a constraint: the grammar decides where the answer ends
    answer = twin.chat("Was it paid?", max_new_tokens=4, stop=["y", "n"], constraint=Choice(["yes", "no"]))
    assert answer in ("yes", "no") and len(twin) > len(ctx)
    committed = list(ctx.token_ids)
    assert ctx.ask("Was it sent?", max_new_tokens=4, constraint=Choice(["yes", "no"])) in ("yes", "no")
    assert ctx.token_ids == committed


def test_pool_prefix_reuse_answers_under_the_constraint(smollm2):
    model, tokenizer = smollm2
    pool = ContextPool(model, tokenizer, config="hc-12.5")
    doc = tokenizer.apply_chat_template([{"role": "user", "content": DOC}], tokenize=True, return_dict=True)
    prompt = lambda question: doc["input_ids"] + tokenizer(question, add_special_tokens=False).input_ids  # noqa: E731
    first = pool.generate(prompt(" Who is the customer?"), max_new_tokens=8)
    first.text()
    item = JsonSchema(Item)
    second = pool.generate(prompt(" One item of the order as JSON."), max_new_tokens=48, constraint=item)
    Item.model_validate(item.parse(second.text()), strict=True)
    assert second.info.tokens_reused >= len(doc["input_ids"]) - 1 and second.info.finish_reason == "stop"
    with pytest.raises(ValueError, match="Unimplemented keys"):  # refused before the pool changes
        pool.generate(prompt(" Again."), constraint=JsonSchema({"type": "object", "if": {}}))
    assert len(pool.live_ids) == 2


def test_history_with_tool_calls_renders_as_the_grammar_writes_them():
    calls = '<tool_call>[{"name": "add", "arguments": {"a": 3, "b": 4}}]</tool_call>'
    tools = ToolCalls(TOOLS)
    turns = chat_turns([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "3 + 4?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call_1", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"}], tools)
    assert turns[0] == {"role": "system", "content": "Be brief.\n\n" + tools.system_prompt()}
    assert turns[2:] == [{"role": "assistant", "content": calls},
                         {"role": "user", "content": "<tool_response>\n7\n</tool_response>"}]
    assert tools.parse(calls) == [{"name": "add", "arguments": {"a": 3, "b": 4}}]
    with pytest.raises(ValueError, match="message 1: the arguments of the call to 'add' are not JSON"):
        chat_turns([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "add", "arguments": "{a: 3"}}]}])


def _check_calls(calls: list[dict[str, Any]] | None, names: set[str]) -> None:
    assert calls, "a call was required"
    for call in calls:
        assert call["name"] in names, call
        ARGUMENTS[call["name"]].model_validate(call["arguments"], strict=True)


@pytest.mark.parametrize("tool_choice", ["auto", "required", "get_weather", "none"])
def test_tool_calls_parse_for_each_tool_choice(smollm2, tool_choice):
    model, tokenizer = smollm2
    constraint = ToolCalls(TOOLS, tool_choice, parallel=tool_choice != "get_weather")
    messages = [{"role": "system", "content": constraint.system_prompt()},
                {"role": "user", "content": "What is 3 plus 4?"}]
    text = generate(model, tokenizer, messages, constraint, 48)
    calls = constraint.parse(text)
    if tool_choice == "none":
        assert calls is None and text.strip()
    elif tool_choice == "required":
        _check_calls(calls, {"get_weather", "add"})
    elif tool_choice == "get_weather":  # named, not parallel: exactly one call, to that tool, whatever was asked
        _check_calls(calls, {"get_weather"})
        assert len(calls) == 1
    elif calls is None:  # auto: plain text or calls, either complete
        assert text.strip() and not text.lstrip().startswith("<tool_call>")
    else:
        _check_calls(calls, {"get_weather", "add"})


def test_forced_walk_allows_the_instance_then_only_end_of_turn(smollm2):
    """Without the model: a valid answer's tokens are each allowed; once complete only EOS is."""
    _, tokenizer = smollm2
    eos = tokenizer.eos_token_id
    matcher = compile_constraint(tokenizer, JsonSchema(Item)).matcher()
    text = json.dumps({"color": "red", "price": 2.5, "count": 3})
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        assert matcher.allowed()[token]
        matcher.advance(token)
    assert matcher.is_finished() and matcher.is_accepting()
    logits = torch.zeros(1, len(tokenizer) + 64)  # wider than the vocabulary, as padded embeddings are
    matcher.mask(logits)
    assert torch.isfinite(logits).nonzero()[:, 1].tolist() == [eos]
    matcher.advance(eos)
    assert matcher.is_finished()

    matcher = compile_constraint(tokenizer, JsonSchema(Item)).matcher()
    with pytest.raises(ValueError, match="does not fit the JsonSchema constraint"):
        matcher.advance(tokenizer.convert_tokens_to_ids("hello"))
    # a number may go on: EOS and more digits are both allowed once it is a complete answer
    matcher = compile_constraint(tokenizer, JsonSchema({"type": "integer"})).matcher()
    matcher.advance(tokenizer.convert_tokens_to_ids("4"))
    allowed = matcher.allowed()
    assert matcher.is_accepting() and not matcher.is_finished()
    assert allowed[eos] and allowed[tokenizer.convert_tokens_to_ids("2")]


def test_json_object_and_plain_text_parse(smollm2):
    _, tokenizer = smollm2
    matcher = compile_constraint(tokenizer, JsonObject()).matcher()
    assert not matcher.allowed()[tokenizer.convert_tokens_to_ids("[")]
    tools = ToolCalls(TOOLS, "required")
    with pytest.raises(IncompleteOutput):  # text where a call was required: the budget ended before the call
        tools.parse("I think")
    with pytest.raises(IncompleteOutput):
        tools.parse('<tool_call>[{"name": "add", "arguments": {"a": 1')
    assert ToolCalls(TOOLS).parse("Hello") is None
    # white space before the call tag is no way around it: such text is refused as text (parse() reads
    # any answer whose first non-blank text is the tag as a call, so the two agree)
    matcher = compile_constraint(tokenizer, ToolCalls(TOOLS, "auto")).matcher()
    tag = tokenizer("\n <tool_call>", add_special_tokens=False).input_ids
    for token in tag[:-1]:
        matcher.advance(token)
    assert not matcher.allowed()[tag[-1]]
    assert tools.parse('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>') == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}]


@pytest.mark.parametrize("make,match", [
    (lambda: JsonSchema({"type": "object", "if": {"type": "object"}}), "Unimplemented keys"),
    (lambda: JsonSchema({"type": "strin"}), "Invalid type: strin"),
    (lambda: JsonSchema("{not json"), "not JSON"),
    (lambda: JsonSchema(42), "must be a JSON schema object"),
    (lambda: JsonSchema({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
    (lambda: Regex("a(b"), "unclosed group"),
    (lambda: Choice([]), "one or more non-empty strings"),
    (lambda: Choice("yes"), "must be a list of strings"),
    (lambda: ToolCalls([{"type": "function", "function": {"description": "no name"}}]), "tool 0 has no name"),
    (lambda: ToolCalls(TOOLS, "search"), "tool_choice 'search' is not one of the tools"),
    (lambda: ToolCalls(TOOLS, {"type": "function", "function": {"name": "search"}}), "'search' is not one of"),
    (lambda: ToolCalls([], "required"), "needs at least one tool"),
    (lambda: ToolCalls([ADD, ADD]), "two tools share a name"),
    (lambda: ToolCalls([{"name": "f", "parameters": {"type": "object", "if": {}}}]), "Unimplemented keys"),
], ids=["unimplemented-keyword", "bad-type", "not-json", "not-object", "look-behind", "bad-regex", "no-options",
        "options-string", "tool-without-name", "unknown-tool-choice", "unknown-tool-choice-dict", "no-tools",
        "duplicate-tool", "bad-tool-parameters"])
def test_bad_constraints_are_refused_before_generation(smollm2, make, match):
    """Construction or compilation raises, naming the problem; both come before the first token."""
    _, tokenizer = smollm2
    with pytest.raises(ValueError, match=re.escape(match)):
        compile_constraint(tokenizer, make())


def test_compiled_constraints_are_cached_per_tokenizer_and_constraint(smollm2):
    model, tokenizer = smollm2
    clear_cache()
    first = compile_constraint(tokenizer, JsonSchema(Person))
    assert cache_info().misses == 1 and cache_info().hits == 0
    # an equal constraint given another way (the schema as a dict) is the same key
    assert compile_constraint(tokenizer, JsonSchema(TypeAdapter(Person).json_schema())) is first
    assert cache_info().hits == 1
    assert compile_constraint(tokenizer, JsonSchema(Person), stop_ids=[0, 2]) is not first  # other stop tokens
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(compile_constraint(tokenizer, Choice(["a", "b"]))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(r) for r in results}) == 1
    # matchers from one compiled constraint are independent
    a, b = first.matcher(), first.matcher()
    token = int(a.allowed().nonzero()[0])  # '{"': the schema forces it
    a.advance(token)
    assert a.tokens == 1 and b.tokens == 0
    assert b.allowed()[token] and not a.allowed()[token]
