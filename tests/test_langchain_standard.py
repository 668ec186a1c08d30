"""LangChain's own standard suites for chat models, run on the embedded model.

Skipped, because the 135M model cannot do them (the suite skips them from these properties):
tool calling and tool choice (it does not emit tool calls), structured output and JSON mode (it
does not follow schemas reliably), image/audio/PDF inputs (a text-only model), and a per-call
``model=`` override (one engine serves one model; naming another model per call would silently
answer with the wrong one).
"""

from __future__ import annotations

import operator
import uuid
from functools import reduce

from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from hcmemory.integrations.langchain import ChatHCAttention

PARAMS = {"preset": "hc-12.5"}
SHORT = 16
"""Answers are cut at 16 tokens: the suites check behaviour, not prose, and the CPU is slow."""


class TestChatHCAttentionUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatHCAttention]:
        return ChatHCAttention

    @property
    def chat_model_params(self) -> dict:
        return PARAMS

    @property
    def standard_chat_model_params(self) -> dict:
        return {**super().standard_chat_model_params, "max_tokens": SHORT}

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine serves one model (see the module docstring)


class TestChatHCAttentionIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatHCAttention]:
        return ChatHCAttention

    @property
    def chat_model_params(self) -> dict:
        return PARAMS

    @property
    def standard_chat_model_params(self) -> dict:
        return {**super().standard_chat_model_params, "max_tokens": SHORT}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A second turn of a conversation: everything the first call left in memory is read from it."""
        model = ChatHCAttention(**PARAMS, max_tokens=SHORT, context_id=f"cache-read-{uuid.uuid4().hex}")
        history = [HumanMessage("Here are the opening hours: the library opens at nine and closes at five.")]
        first = model.invoke(history)
        history += [first, HumanMessage("When does the library close?")]
        message = reduce(operator.add, model.stream(history)) if stream else model.invoke(history)
        assert message.usage_metadata["input_token_details"]["cache_read"] >= first.usage_metadata["total_tokens"]
        return message
