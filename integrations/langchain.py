"""LangChain models whose memory is a live, compressed HCAttention KV state.

``HCAttentionLLM`` (a LangChain ``LLM``) and ``ChatHCAttention`` (a ``BaseChatModel``) look like any
local model to a chain, but behind them an ``hcmemory.engine.Engine`` keeps the conversations'
KV states: each call's prompt (document + question, or the whole chat history) is matched against
what a live context already holds and only the new suffix is prefilled; the prompt and the answer
are then committed, so the next turn is served from memory too.  Usage metadata reports it:
``input_token_details.cache_read`` counts the tokens served from the live context, and
``generation_info`` / ``response_metadata`` carry ``tokens_reused`` and ``tokens_prefilled``.

Weights load lazily, on the first call, once per process for every instance naming the same model;
constructing a model object is cheap.  Async calls are LangChain's own: the generation runs in its
executor, so the event loop is never blocked.  Pin a conversation with ``context_id``; without one the longest shared
prefix picks it.  Needs ``pip install 'hcmemory[langchain]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import LLM, BaseChatModel
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk, LLMResult
    from langchain_core.outputs import Generation as LLMGeneration
    from langchain_core.runnables.config import run_in_executor
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hcmemory.integrations.langchain needs langchain-core: pip install 'hcmemory[langchain]'") from exc

from hcmemory.config import HCConfig
from hcmemory.decoding import Generation, GenerationInfo
from hcmemory.engine import DEFAULT_MAX_HOST_BYTES, DEFAULT_PRESET, Engine, shared_engine

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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

    def _start(self, token_ids: Sequence[int], stop: list[str] | None, kwargs: dict[str, Any]) -> Generation:
        return self.engine().generate(
            token_ids, kwargs.get("context_id", self.context_id),
            max_new_tokens=kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
            temperature=kwargs.get("temperature", self.temperature),
            stop=stop if stop is not None else self.stop, timeout=self.timeout)

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


def message_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the role/content dicts a chat template renders (LangChain's own conversion,
    text blocks joined); a non-text block is refused, since a text-only model would answer without it."""
    out = []
    for message in convert_to_openai_messages(list(messages), text_format="string"):
        content = message["content"]
        if not isinstance(content, str):
            kinds = sorted({b.get("type") if isinstance(b, dict) else type(b).__name__ for b in content} - {"text"})
            raise ValueError(f"ChatHCAttention takes text only; {', '.join(map(repr, kinds))} content blocks "
                             "cannot be read by this model")
        out.append({"role": message["role"], "content": content})
    return out


class ChatHCAttention(HCMemorySettings, BaseChatModel):
    """A LangChain chat model over hcmemory: each call re-sends the history, only new messages are prefilled.

    Messages are rendered with the tokenizer's own chat template.  ``usage_metadata.input_tokens``
    counts the whole prompt and ``input_token_details.cache_read`` the part served from the live
    context; ``response_metadata`` names the model, the context and what was prefilled and held.
    """

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

    def _generation(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> Generation:
        return self._start(self.engine().message_ids(message_dicts(messages)), stop, kwargs)

    def _usage(self, info: GenerationInfo) -> UsageMetadata:
        return UsageMetadata(input_tokens=info.prompt_tokens, output_tokens=info.completion_tokens,
                             total_tokens=info.prompt_tokens + info.completion_tokens,
                             input_token_details={"cache_read": info.tokens_reused})

    def _metadata(self, info: GenerationInfo) -> dict[str, Any]:
        return {"model_name": self.model_name, **_counters(info, self.engine())}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        generation = self._generation(messages, stop, kwargs)
        text = "".join(_pieces(generation, run_manager.on_llm_new_token if run_manager else None))
        message = AIMessage(content=text, usage_metadata=self._usage(generation.info),
                            response_metadata=self._metadata(generation.info))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": generation.info.finish_reason})])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        generation = self._generation(messages, stop, kwargs)
        for piece in generation:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        # usage and metadata on one chunk only, as LangChain merges chunks by adding them up
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=self._usage(generation.info),
                                                         response_metadata=self._metadata(generation.info),
                                                         chunk_position="last"),
                                  generation_info={"finish_reason": generation.info.finish_reason})
