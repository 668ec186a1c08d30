"""LangChain models whose memory is a live, compressed HCAttention KV state.

``HCAttentionLLM`` (a LangChain ``LLM``) and ``ChatHCAttention`` (a ``BaseChatModel``) look like any
local model to a chain, but behind them an ``hcmemory.engine.Engine`` keeps the conversations'
KV states: each call's prompt (document + question, or the whole chat history) is matched against
what a live context already holds and only the new suffix is prefilled; the prompt and the answer
are then committed, so the next turn is served from memory too.  Usage metadata reports it:
``input_token_details.cache_read`` counts the tokens served from the live context, and
``generation_info`` / ``response_metadata`` carry ``tokens_reused`` and ``tokens_prefilled``.

``ChatHCAttention`` calls tools (``bind_tools``) and answers in a schema (``with_structured_output``)
through constrained decoding (``hcmemory.constrained``): a grammar masks every token that would not
continue a valid call or JSON value, so the 135M model's calls and structured answers always parse.
Its chat template renders no tools, so they are listed in the system prompt and calls are written
``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>``, SmolLM2's own format (docs/constrained.md).

Weights load lazily, on the first call, once per process for every instance naming the same model;
constructing a model object is cheap.  Async calls are LangChain's own: the generation runs in its
executor, so the event loop is never blocked.  Pin a conversation with ``context_id``; without one the longest shared
prefix picks it.  Needs ``pip install 'hcmemory[langchain]'``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import LLM, BaseChatModel, LanguageModelInput
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.language_models.chat_models import generate_from_stream
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.outputs import ChatGenerationChunk, ChatResult, GenerationChunk, LLMResult
    from langchain_core.outputs import Generation as LLMGeneration
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from langchain_core.utils.pydantic import is_basemodel_subclass
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hcmemory.integrations.langchain needs langchain-core: pip install 'hcmemory[langchain]'") from exc

from hcmemory import ContextStore
from hcmemory.config import HCConfig
from hcmemory.constrained import (Constraint, HeldCalls, ToolCalls, call_id, chat_turns,
                                  response_format_constraint)
from hcmemory.decoding import Generation, GenerationInfo
from hcmemory.engine import DEFAULT_MAX_HOST_BYTES, DEFAULT_PRESET, Engine, shared_engine
from hcmemory.models import DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)
KV_CHUNK_BYTES = 256 * 2**10
"""Tensor bytes per stored chunk of a step's KV state: small enough that a step rewrites only the
chunks its new rows touch (the others have the same content, stored once)."""
_kv_stores: dict[str, ContextStore] = {}
_kv_stores_lock = threading.Lock()


def kv_store(path: str) -> ContextStore:
    """The process's store of per-step KV states on ``path`` (``KV_CHUNK_BYTES`` chunks)."""
    with _kv_stores_lock:
        key = os.path.abspath(path)
        if key not in _kv_stores:
            _kv_stores[key] = ContextStore(path, chunk_bytes=KV_CHUNK_BYTES)
        return _kv_stores[key]


def task_id(metadata: Mapping[str, Any]) -> str | None:
    """The LangGraph task a model call runs in, from its run metadata; None outside a graph or inside a
    subgraph (whose namespace nests: ``parent:task|child:task``)."""
    namespace = metadata.get("langgraph_checkpoint_ns")
    if not isinstance(namespace, str) or "|" in namespace or ":" not in namespace:
        return None
    return namespace.split(":", 1)[1]


class HCMemorySettings(BaseModel):
    """The fields every hcmemory LangChain model has."""

    model: str | None = None
    """A local Hugging Face model directory; None for the embedded SmolLM2-135M-Instruct."""
    preset: str = DEFAULT_PRESET
    """How the KV state is stored (``HCConfig.presets()``)."""
    config: dict[str, Any] | None = None
    """``HCConfig`` fields overriding the preset, e.g. ``{"top_p": 0.95}``."""
    context_id: str | None = None
    """Pin one conversation; without it the context sharing the longest prefix is continued."""
    max_new_tokens: int = Field(default=256, alias="max_tokens", ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    stop: list[str] | None = None
    timeout: float | None = Field(default=None, gt=0)
    """Seconds of decoding after which an answer ends where it is."""
    store: str | None = None
    """A ContextStore (SQLite file) that conversations are spilled to and reloaded from."""
    max_host_bytes: int = Field(default=DEFAULT_MAX_HOST_BYTES, ge=0)
    """Memory the live conversations may hold before the least recently used are spilled."""

    model_config = ConfigDict(populate_by_name=True)

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL_NAME

    def hc_config(self) -> HCConfig:
        return HCConfig.preset(self.preset, **(self.config or {}))

    def engine(self) -> Engine:
        return shared_engine(self.model, self.hc_config(), self.store, self.max_host_bytes)

    def _start(self, token_ids: Sequence[int], stop: list[str] | None, kwargs: dict[str, Any],
               constraint: Constraint | None = None) -> Generation:
        return self.engine().generate(
            token_ids, kwargs.get("context_id", self.context_id),
            max_new_tokens=kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
            temperature=kwargs.get("temperature", self.temperature),
            stop=stop if stop is not None else self.stop, timeout=self.timeout, constraint=constraint)

    def _params(self) -> dict[str, Any]:
        return {"model": self.model_name, "preset": self.preset, "config": self.config, "context_id": self.context_id,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "store": self.store}


def _counters(info: GenerationInfo, engine: Engine) -> dict[str, Any]:
    return {"context_id": info.context_id, "tokens_reused": info.tokens_reused,
            "tokens_prefilled": info.tokens_prefilled, "finish_reason": info.finish_reason,
            "bytes_held": engine.pool.held_bytes(info.context_id)}


def _pieces(generation: Generation, on_token: Callable[[str], Any] | None) -> Iterator[str]:
    for piece in generation:
        if on_token is not None:
            on_token(piece)
        yield piece


class HCAttentionLLM(HCMemorySettings, LLM):
    """A LangChain LLM over hcmemory: prompts that repeat what the memory holds are not prefilled again.

    The prompt becomes one user turn of the model's chat template (``chat_template=False`` feeds
    it verbatim).  ``generation_info`` carries ``tokens_reused`` / ``tokens_prefilled``.
    """

    chat_template: bool = True

    @property
    def _llm_type(self) -> str:
        return "hcattention"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _generation(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> Generation:
        return self._start(self.engine().prompt_ids(prompt, self.chat_template), stop, kwargs)

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              **kwargs: Any) -> str:
        return self._complete(prompt, stop, run_manager, kwargs).text

    def _complete(self, prompt: str, stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None,
                  kwargs: dict[str, Any]) -> LLMGeneration:
        generation = self._generation(prompt, stop, kwargs)
        text = "".join(_pieces(generation, run_manager.on_llm_new_token if run_manager else None))
        return LLMGeneration(text=text, generation_info=_counters(generation.info, self.engine()))

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        return LLMResult(generations=[[self._complete(p, stop, run_manager, kwargs)] for p in prompts])

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        # LLM's default goes through ``_acall`` and keeps only the text, dropping ``generation_info``
        return await run_in_executor(None, self._generate, prompts, stop,
                                     run_manager.get_sync() if run_manager else None, **kwargs)

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        generation = self._generation(prompt, stop, kwargs)
        for piece in _pieces(generation, run_manager.on_llm_new_token if run_manager else None):
            yield GenerationChunk(text=piece)
        yield GenerationChunk(text="", generation_info=_counters(generation.info, self.engine()))


def message_dicts(messages: Sequence[BaseMessage], tools: ToolCalls | None = None) -> list[dict[str, str]]:
    """LangChain messages as the role/content dicts a chat template renders (LangChain's own conversion,
    text blocks joined; tool calls and tool results in the format of ``hcmemory.constrained.chat_turns``,
    with ``tools`` listed in the system prompt); a non-text block is refused, since a text-only model
    would answer without it."""
    converted = convert_to_openai_messages(list(messages), text_format="string")
    for message in converted:
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            kinds = sorted({b.get("type") if isinstance(b, dict) else type(b).__name__ for b in content} - {"text"})
            raise ValueError(f"ChatHCAttention takes text only; {', '.join(map(repr, kinds))} content blocks "
                             "cannot be read by this model")
    return chat_turns(converted, tools)


def tool_constraint(tools: Sequence[Mapping[str, Any] | type | Callable[..., Any] | BaseTool],
                    tool_choice: str | Mapping[str, Any] | None, parallel_tool_calls: bool | None) -> ToolCalls:
    """Tools in any form LangChain accepts (``BaseTool``, a function, a pydantic model, a TypedDict, an
    OpenAI tool dict) as the ``ToolCalls`` constraint; ``ValueError`` names a tool without a name, a
    ``tool_choice`` naming no given tool, and the like."""
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tools, not {type(tools).__name__}")
    formatted: dict[Any, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        try:
            spec = convert_to_openai_tool(tool)
        except (TypeError, ValueError) as error:
            raise ValueError(f"tool {index} cannot be described as a function: {error}") from None
        function = spec.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        key = name if isinstance(name, str) and name else index  # a tool without a name is refused below
        if key in formatted:
            log.warning("two tools are named %r; the last one bound is used, as LangGraph's ToolNode does", name)
            del formatted[key]
        formatted[key] = spec
    return ToolCalls(list(formatted.values()), tool_choice or "auto",
                     True if parallel_tool_calls is None else parallel_tool_calls)


def _with_parser(llm: Runnable[LanguageModelInput, BaseMessage], parser: Runnable[Any, Any],
                 include_raw: bool) -> Runnable[LanguageModelInput, Any]:
    """``llm | parser``; with ``include_raw`` a dict of ``raw`` (the message), ``parsed`` and
    ``parsing_error``, as every LangChain model's ``with_structured_output`` returns."""
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


class ChatHCAttention(HCMemorySettings, BaseChatModel):
    """A LangChain chat model over hcmemory: each call re-sends the history, only new messages are prefilled.

    Messages are rendered with the tokenizer's own chat template.  ``usage_metadata.input_tokens``
    counts the whole prompt and ``input_token_details.cache_read`` the part served from the live
    context; ``response_metadata`` names the model, the context and what was prefilled and held.
    """

    per_thread: bool = False
    """Give each LangGraph thread its own context: ``context_id`` is the run's ``thread_id`` (LangGraph
    passes it to every model call in the run's metadata); a call outside a thread uses ``context_id``.
    With a ``store``, a call in a graph task then stores its context's KV state under
    ``(thread_id, task id)`` once it answered, which ``integrations.langgraph.KVCheckpointer`` finds for
    every checkpoint that task led to."""

    @property
    def _llm_type(self) -> str:
        return "hcattention-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider="hcmemory", ls_model_name=kwargs.get("model") or self.model_name,
                               ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                               ls_max_tokens=kwargs.get("max_tokens", self.max_new_tokens),
                               ls_stop=stop if stop is not None else self.stop)

    def bind_tools(self, tools: Sequence[Mapping[str, Any] | type | Callable[..., Any] | BaseTool], *,
                   tool_choice: str | Mapping[str, Any] | None = None, parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with ``tools`` it may call (``convert_to_openai_tool`` describes each).

        ``tool_choice``: ``"auto"`` (default: the model chooses between text and calls), ``"any"`` or
        ``"required"`` (at least one call), a tool's name (calls to it only), ``"none"`` (text only).
        ``parallel_tool_calls=False`` allows one call per answer.  Calls come back as
        ``AIMessage.tool_calls`` with ids ``call_...``.  A tool without a name or a ``tool_choice`` that
        names no tool raises ``ValueError`` here; a parameter schema the grammar engine cannot build
        raises at the call, before any token is generated.
        """
        constraint = tool_constraint(tools, tool_choice, parallel_tool_calls)
        return self.bind(tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                                  "parameters": json.loads(t.parameters)}}
                                for t in constraint.tools],
                         tool_choice=constraint.tool_choice, parallel_tool_calls=constraint.parallel, **kwargs)

    def with_structured_output(self, schema: Mapping[str, Any] | type, *,
                               method: Literal["json_schema", "function_calling", "json_mode"] = "function_calling",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """The model answering as ``schema`` (a pydantic model, a TypedDict, a JSON schema or an OpenAI
        tool dict): a pydantic instance for a pydantic model, else a dict.

        ``method``: ``"function_calling"`` (default, as LangChain's own) makes the answer a required
        call to a tool of that schema (``bind_tools``): the schema and its field descriptions are listed
        in the system prompt, which is how the 135M model learns what to put in each field;
        ``"json_schema"`` constrains the answer to the schema itself and shows the model nothing (say
        what you want in the prompt); ``"json_mode"`` constrains it to any JSON object, leaving the keys
        to the prompt.  Output is always strict: the grammar enforces
        the schema whatever ``strict`` says.  An answer the budget ends early raises ``IncompleteOutput``
        (under ``include_raw`` it is raised too: there is no message to return).
        """
        if strict not in (None, True, False):
            raise ValueError(f"strict must be None, True or False, not {strict!r}")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)} for with_structured_output")
        if method == "json_schema":
            json_schema = convert_to_json_schema(schema)
            response_format = {"type": "json_schema", "json_schema": {
                "name": json_schema.get("title", "response"), "schema": json_schema, "strict": True}}
        elif method == "json_mode":
            response_format = {"type": "json_object"}
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', not {method!r}")
        llm = self.bind(response_format=response_format,
                        ls_structured_output_format={"kwargs": {"method": method}, "schema": schema})
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        return _with_parser(llm, parser, include_raw)

    def _request(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> tuple[list[int], Constraint | None]:
        """The prompt's token ids and the constraint of this call (bound tools, or a ``response_format``),
        compiled later by the context before anything runs."""
        tools, response_format = kwargs.get("tools"), kwargs.get("response_format")
        if tools is not None and response_format is not None:
            raise ValueError("a call takes tools or a response_format, not both: bind one of them")
        constraint = None
        if tools is not None:
            constraint = tool_constraint(tools, kwargs.get("tool_choice"), kwargs.get("parallel_tool_calls"))
        elif response_format is not None:
            constraint = response_format_constraint(response_format)
        rendered = message_dicts(messages, constraint if isinstance(constraint, ToolCalls) else None)
        return self.engine().message_ids(rendered), constraint

    def _usage(self, info: GenerationInfo) -> UsageMetadata:
        return UsageMetadata(input_tokens=info.prompt_tokens, output_tokens=info.completion_tokens,
                             total_tokens=info.prompt_tokens + info.completion_tokens,
                             input_token_details={"cache_read": info.tokens_reused})

    def _metadata(self, info: GenerationInfo) -> dict[str, Any]:
        return {"model_name": self.model_name, **_counters(info, self.engine())}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        """The streamed chunks merged (LangChain's ``generate_from_stream``): one path for both."""
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """Text as it forms; an answer that is (or may still become) a tool call is held back and sent as
        ``tool_call_chunks`` once it is complete, so a consumer never sees half a call as text."""
        thread = run_manager.metadata.get("thread_id") if self.per_thread and run_manager else None
        if thread is not None and "context_id" not in kwargs:
            kwargs = {**kwargs, "context_id": str(thread)}
        token_ids, constraint = self._request(messages, kwargs)
        generation = self._start(token_ids, stop, kwargs, constraint)
        held = HeldCalls(constraint)
        for piece in generation:
            if shown := held.feed(piece):
                yield self._chunk(AIMessageChunk(content=shown), run_manager, shown)
        text, calls = held.finish()
        if text:
            yield self._chunk(AIMessageChunk(content=text), run_manager, text)
        for index, call in enumerate(calls or []):
            chunk = AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(
                name=call["name"], args=json.dumps(call["arguments"], ensure_ascii=False), id=call_id(),
                index=index)])
            yield self._chunk(chunk, run_manager, "")
        info = generation.info
        task = task_id(run_manager.metadata) if thread is not None and self.store is not None else None
        if task is not None:  # the KV state this graph task leaves, saved before its writes are checkpointed
            saved = kv_store(self.store).save(self.engine().pool.get(info.context_id), info.context_id, task)
            log.debug("thread %r task %s: KV state stored (%d of %d chunks new)", info.context_id, task,
                      saved.new_chunks, saved.chunks)
        finish_reason = "tool_calls" if calls else info.finish_reason
        # usage and metadata on one chunk only, as LangChain merges chunks by adding them up
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=self._usage(info),
                                                         response_metadata={**self._metadata(info),
                                                                            "finish_reason": finish_reason},
                                                         chunk_position="last"),
                                  generation_info={"finish_reason": finish_reason})

    @staticmethod
    def _chunk(message: AIMessageChunk, run_manager: CallbackManagerForLLMRun | None,
               text: str) -> ChatGenerationChunk:
        chunk = ChatGenerationChunk(message=message)
        if run_manager:
            run_manager.on_llm_new_token(text, chunk=chunk)
        return chunk
