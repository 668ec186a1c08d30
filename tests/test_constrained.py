"""Constrained decoding on the real 135M model: every answer under a constraint parses and validates,
greedy and sampled; tool calls parse for each tool_choice; a budget that ends mid-answer raises;
bad constraints are refused before any token is generated; compiled constraints are cached.

The decode loop here is the hook the library's loop uses: ``matcher.mask(logits)`` before sampling,
``matcher.advance(token)`` after, stop at an end-of-turn token."""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from transformers import DynamicCache

from hcmemory.constrained import (Choice, IncompleteOutput, JsonObject, JsonSchema, Regex, ToolCalls, cache_info,
                                  clear_cache, compile_constraint)
from hcmemory.decoding import stop_token_ids
from hcmemory.glue import cache_kwarg


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


@torch.no_grad()
def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], constraint: Any, max_new_tokens: int,
             temperature: float = 0.0, seed: int | None = None) -> tuple[str, Any]:
    """Greedy or sampled decoding with the constraint's mask applied at each step; the text and the matcher."""
    stops = stop_token_ids(model, tokenizer)
    matcher = compile_constraint(tokenizer, constraint, stops).matcher()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache)).logits[:, -1]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    for _ in range(max_new_tokens):
        matcher.mask(logits)
        if temperature == 0:
            token = int(logits.argmax(-1))
        else:
            token = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator))
        matcher.advance(token)
        if token in stops:
            break
        out.append(token)
        logits = model(input_ids=torch.tensor([[token]]), use_cache=True, **cache_kwarg(model, cache)).logits[:, -1]
    return tokenizer.decode(out, skip_special_tokens=True), matcher


@pytest.mark.parametrize("name,temperature,seed", [(name, 0.0, None) for name in SCHEMAS] + [
    (name, 1.0, seed) for seed, name in enumerate(SCHEMAS)])
def test_json_schema_answers_parse_and_validate(smollm2, name, temperature, seed):
    model, tokenizer = smollm2
    constraint, validator, prompt = SCHEMAS[name]
    messages = [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": prompt}]
    text, matcher = generate(model, tokenizer, messages, constraint, 96, temperature, seed)
    assert matcher.is_finished(), f"budget ran out: {text!r}"
    validator.model_validate(constraint.parse(text), strict=True)


def test_budget_ending_mid_json_raises_instead_of_returning_broken_json(smollm2):
    model, tokenizer = smollm2
    constraint = JsonSchema(Person)
    text, matcher = generate(model, tokenizer, [{"role": "user", "content": "A person as JSON."}], constraint, 5)
    assert not matcher.is_accepting() and not matcher.is_finished()
    with pytest.raises(IncompleteOutput, match="max_new_tokens") as raised:
        constraint.parse(text)
    assert raised.value.text == text


def test_regex_and_choice(smollm2):
    model, tokenizer = smollm2
    # [0-9], not \d: the engine's \d is Unicode (it matches every script's digits, as Python's does)
    text, matcher = generate(model, tokenizer, [{"role": "user", "content": "When did the Second World War end?"}],
                             Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), 16)
    assert matcher.is_finished() and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text), text
    options = ["yes", "no", "it depends"]
    text, matcher = generate(model, tokenizer, [{"role": "user", "content": "Is the sky blue?"}], Choice(options), 8,
                             temperature=1.0, seed=3)
    assert matcher.is_finished() and text in options, text


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
    text, matcher = generate(model, tokenizer, messages, constraint, 48)
    assert matcher.is_finished(), f"budget ran out: {text!r}"
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
