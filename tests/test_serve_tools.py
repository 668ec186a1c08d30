"""Tool calls and structured output on ``/v1/chat/completions``: the ``openai`` client and LangChain's
``ChatOpenAI`` against a live server on the 135M model.  ``tool_choice`` names the tool (or requires a
call) wherever the test needs a call, so what is checked is the format and the round trip, not the
small model's judgement; schemas bound their strings so an answer cannot run past the budget."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import pytest

from tests.ports import free_port
from tests.test_serve import LIMITS, MODEL, _client, _running, httpx, openai

jsonschema = pytest.importorskip("jsonschema")
langchain_openai = pytest.importorskip("langchain_openai")

from pydantic import BaseModel, Field  # noqa: E402

from hcmemory.serve import ServeSettings  # noqa: E402

WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The local time in a city.",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Sky(BaseModel):
    """A weather report (bounded fields: the 135M model cannot loop inside them)."""

    city: str = Field(max_length=16)
    sky: Literal["sunny", "cloudy", "rainy"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    with _running(ServeSettings(port=free_port(), store=tmp_path_factory.mktemp("tools"), **LIMITS)) as base:
        yield base


def _arguments(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    return arguments


def test_named_tool_call_then_the_result_answered_in_text(server: str) -> None:
    client = _client(server)
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice=NAMED, max_tokens=48)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    _arguments(call)

    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "degrees": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=12)
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.message.content.strip()
    assert answer.finish_reason in ("stop", "length")
    # the call re-sent as JSON text renders to the tokens the model produced: the first turn is not prefilled again
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + 1


def test_auto_gives_text_or_calls_that_parse(server: str) -> None:
    answer = _client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello to Ada."}], tools=[WEATHER], max_tokens=32)
    choice = answer.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            _arguments(call)
    else:
        assert choice.finish_reason in ("stop", "length") and "<tool_call>" not in choice.message.content


def test_streamed_tool_calls(server: str) -> None:
    stream = _client(server).chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER],
                                                     tool_choice="required", parallel_tool_calls=False,
                                                     max_tokens=48, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas), "a call was shown as text"
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1
    assert calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    _arguments(calls[0])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_langchain_bind_tools(server: str) -> None:
    llm = langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, max_tokens=48,
                                      temperature=0, max_retries=0)
    message = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke("What is the weather in Rome?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER_PARAMETERS)


def test_langchain_structured_output_json_schema(server: str) -> None:
    llm = langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, max_tokens=40,
                                      temperature=0, max_retries=0)
    report = llm.with_structured_output(Sky, method="json_schema").invoke("Describe the weather in Oslo as JSON.")
    assert isinstance(report, Sky) and len(report.city) <= 16


def test_answers_cut_by_the_budget_end_as_length(server: str) -> None:
    """A cut JSON answer comes with the text so far, as OpenAI's JSON mode does; a cut call is never a call,
    and the turn it cut leaves the conversation usable."""
    client = _client(server)
    sky = {"type": "json_schema", "json_schema": {"name": "Sky", "schema": Sky.model_json_schema()}}
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3,
                                         response_format=sky).choices[0]
    assert cut.finish_reason == "length" and cut.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.message.content)
    call = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required",
                                          max_tokens=6).choices[0]
    assert call.finish_reason == "length" and call.message.tool_calls is None
    assert call.message.content.startswith("<tool_call>")
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required",
                                           max_tokens=48).choices[0]
    assert again.finish_reason == "tool_calls", "the cut turn left the conversation's context unusable"


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "has no name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice",
     "get_news"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}}, "response_format", "if"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "if": {"required": ["a"]}}}}]}, "tools", "if"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "messages", "not JSON"),
])
def test_bad_input_is_refused_in_openai_shape(server: str, extra: dict, param: str, words: str) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **extra}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(**body)
