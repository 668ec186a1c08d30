"""``ChatHCAttention.bind_tools`` and ``with_structured_output`` on the embedded model: calls come back
as ``AIMessage.tool_calls`` with ids, parallel calls where allowed, ``tool_call_chunks`` when streamed;
a history with calls and results is served from the live context; structured answers validate for each
method and schema kind; bad input is refused before any generation."""

from __future__ import annotations

import operator
import re
from functools import reduce
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from hcmemory.constrained import IncompleteOutput
from hcmemory.integrations.langchain import ChatHCAttention


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return "sunny"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Color(BaseModel):
    """A color and how much the user likes it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12, description="the color's name")
    score: int = Field(ge=1, le=10, description="how much, from 1 to 10")


class ColorDict(TypedDict):
    """A color and how much the user likes it."""

    name: str
    score: int


def model(**kwargs: Any) -> ChatHCAttention:
    return ChatHCAttention(max_tokens=kwargs.pop("max_tokens", 48), **kwargs)


def test_calls_parallel_calls_and_streamed_chunks():
    chat = model()
    both = chat.bind_tools([get_weather, add], tool_choice="required")
    reply = both.invoke("What is the weather in Paris and in Oslo? Call get_weather for each city.")
    assert reply.tool_calls and reply.content == "" and reply.response_metadata["finish_reason"] == "tool_calls"
    for call in reply.tool_calls:
        assert call["id"].startswith("call_") and call["type"] == "tool_call"
        assert (call["name"], set(call["args"])) in (("get_weather", {"city"}), ("add", {"a", "b"}))
    assert len({call["id"] for call in reply.tool_calls}) == len(reply.tool_calls)
    one = chat.bind_tools([get_weather, add], tool_choice="add", parallel_tool_calls=False)
    chunks = list(one.stream("What is 3 plus 4?"))
    assert all(not chunk.content for chunk in chunks)  # a call is never shown as text
    assert [c["name"] for chunk in chunks for c in chunk.tool_call_chunks] == ["add"]
    merged = reduce(operator.add, chunks)
    (call,) = merged.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    text = chat.bind_tools([get_weather, add], tool_choice="none").invoke("Say hello.")
    assert text.content.strip() and not text.tool_calls


def test_a_history_with_calls_and_results_is_served_from_the_live_context():
    chat = model(context_id="tool-history")
    history: list[Any] = [HumanMessage("What is 3 plus 4? Use the add tool.")]
    call = chat.bind_tools([add], tool_choice="any").invoke(history)
    history += [call, ToolMessage(str(add.invoke(call.tool_calls[0]["args"])), tool_call_id=call.tool_calls[0]["id"])]
    answer = chat.bind_tools([add], tool_choice="none").invoke(history)
    assert answer.content.strip() and not answer.tool_calls
    held = call.usage_metadata["input_tokens"] + call.usage_metadata["output_tokens"]
    assert answer.usage_metadata["input_token_details"]["cache_read"] >= held - 2  # the call was not re-read
    assert answer.response_metadata["tokens_prefilled"] < 40  # the tool's result and the turn framing


@pytest.mark.parametrize("schema,method", [(Color, "json_schema"), (Color, "function_calling"),
                                           (ColorDict, "json_schema"), (Color.model_json_schema(), "function_calling"),
                                           (Color, "json_mode")])
def test_structured_output_validates(schema, method):
    chat = model(max_tokens=40).with_structured_output(schema, method=method, include_raw=True)
    result = chat.invoke("My favourite color is green; I like it 8 out of 10. Answer as JSON with the keys "
                         "name and score.")
    assert result["parsing_error"] is None and isinstance(result["raw"], AIMessage)
    parsed = result["parsed"]
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        assert isinstance(parsed, Color)
    else:
        assert isinstance(parsed, dict) and set(parsed) == {"name", "score"}


def test_a_structured_answer_the_budget_cuts_raises():
    with pytest.raises(IncompleteOutput, match="max_new_tokens"):
        model(max_tokens=4).with_structured_output(Color, method="json_schema").invoke("My favourite color?")


BAD_TOOLS = {
    "tool without a name": (lambda chat: chat.bind_tools([{"type": "function", "function": {"description": "x"}}]),
                            "tool 0 has no name"),
    "unknown tool_choice": (lambda chat: chat.bind_tools([add], tool_choice="search"),
                            "tool_choice 'search' is not one of the tools ['add']"),
    "schema the engine cannot build": (
        lambda chat: chat.bind_tools([{"name": "f", "parameters": {"type": "object", "if": {}}}]).invoke("Hi"),
        "Unimplemented keys"),
    "response_format of no known type": (lambda chat: chat.invoke("Hi", response_format={"type": "xml"}),
                                         "response_format type 'xml'"),
    "tools and response_format": (lambda chat: chat.bind_tools([add]).invoke("Hi", response_format={
        "type": "json_object"}), "tools or a response_format, not both"),
    "structured output method": (lambda chat: chat.with_structured_output(Color, method="xml"), "method must be"),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_bad_tools_and_schemas_are_refused_before_any_generation(case):
    call, match = BAD_TOOLS[case]
    chat = model(context_id=f"bad-{case}")
    pool = chat.engine().pool
    with pytest.raises(ValueError, match=re.escape(match)):
        call(chat)
    assert f"bad-{case}" not in pool.live_ids  # no context was made: nothing ran
