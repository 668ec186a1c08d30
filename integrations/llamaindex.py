"""LlamaIndex over hcmemory: a long-document query engine whose index is the documents' own KV state,
and an LLM with prefix reuse for LlamaIndex's stock engines.

``HCQueryEngine`` reads documents once into a live ``HCContext`` — split with ``SentenceSplitter``
counting the model's own tokens, so the nodes can be listed and cited — and answers every query from
the whole memory in an overlay: nothing is retrieved, nothing is prefilled again, the memory is not
changed by a query.  ``insert`` appends a document without touching the earlier ones;
``persist`` / ``load`` go through a ``ContextStore``.

``HCAttentionLlamaLLM`` is a ``CustomLLM`` for any LlamaIndex engine (``SummaryIndex(...)
.as_query_engine(llm=...)``): prompts are matched against the memory's live contexts like the
LangChain models do, so an engine that re-sends the same document with another question only
prefills the question.  Chat uses the tokenizer's own chat template.  Needs
``pip install 'hcmemory[llamaindex]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseGen, CompletionResponse,
                                                  CompletionResponseGen, LLMMetadata)
    from llama_index.core.base.response.schema import Response, StreamingResponse
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.schema import Document, NodeWithScore, TextNode
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hcmemory.integrations.llamaindex needs llama-index-core: pip install 'hcmemory[llamaindex]'") \
        from exc

from hcmemory.config import HCConfig
from hcmemory.context import HCContext
from hcmemory.decoding import GenerationInfo
from hcmemory.engine import DEFAULT_MAX_HOST_BYTES, DEFAULT_PRESET, Engine, shared_engine
from hcmemory.models import shared_model
from hcmemory.stores import ContextStore

log = logging.getLogger(__name__)
_NODES_KEY = "llamaindex_nodes"


class HCQueryEngine(CustomQueryEngine):
    """Answers queries from the whole live memory of its documents (see the module docstring).

    ``on_overflow`` says what happens when the documents outgrow the model's window: ``"error"``
    (the default) refuses the document, ``"continue"`` goes on with a warning (quality degrades past
    the window; a bounded preset such as ``hc-12.5-bounded`` keeps memory bounded there).
    """

    context: Any = Field(description="the HCContext holding the documents")
    nodes: list[TextNode] = Field(default_factory=list)
    max_new_tokens: int = 128
    streaming: bool = False
    on_overflow: str = "error"
    chunk_size: int = 512
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @classmethod
    def from_documents(cls, documents: Sequence[Document], model: str | None = None,
                       preset: str = DEFAULT_PRESET, config: dict[str, Any] | None = None, *,
                       max_new_tokens: int = 128, streaming: bool = False, on_overflow: str = "error",
                       chunk_size: int = 512, context_id: str | None = None) -> "HCQueryEngine":
        """A query engine holding ``documents`` (each prefilled once, in order)."""
        if on_overflow not in ("error", "continue"):
            raise ValueError(f"on_overflow={on_overflow!r}; choose 'error' or 'continue'")
        hf_model, tokenizer = shared_model(model)
        ctx = HCContext(hf_model, tokenizer, HCConfig.preset(preset, **(config or {})), context_id)
        engine = cls(context=ctx, max_new_tokens=max_new_tokens, streaming=streaming, on_overflow=on_overflow,
                     chunk_size=chunk_size)
        for document in documents:
            engine.insert(document)
        return engine

    def _splitter(self) -> SentenceSplitter:
        tokenizer = self.context.tokenizer
        return SentenceSplitter(chunk_size=self.chunk_size, chunk_overlap=0,
                                tokenizer=lambda text: tokenizer(text, add_special_tokens=False).input_ids)

    def insert(self, document: Document) -> list[TextNode]:
        """Append ``document`` to the memory (earlier documents are not prefilled again); returns its nodes."""
        if not isinstance(document, Document):
            raise TypeError(f"insert() takes a llama_index Document, not {type(document).__name__}")
        nodes = self._splitter().get_nodes_from_documents([document])
        text = "\n\n".join(node.get_content() for node in nodes)
        window = getattr(self.context.model.config, "max_position_embeddings", None)
        needed = len(self.context) + len(self.context.tokenizer(text, add_special_tokens=False).input_ids)
        if window and needed > window:
            message = (f"the documents would hold {needed} tokens, more than the model's window of {window}: answers "
                       "degrade past it; use preset='hc-12.5-bounded' to keep memory bounded")
            if self.on_overflow == "error":
                raise ValueError(message + ", or on_overflow='continue' to go on anyway")
            log.warning(message)
        self.context.append(text + "\n\n")
        self.nodes.extend(nodes)
        self.context.metadata[_NODES_KEY] = [node.to_dict() for node in self.nodes]
        return nodes

    def _ask(self, query_str: str) -> tuple[Any, GenerationInfo]:
        generation = self.context.stream(query_str, max_new_tokens=self.max_new_tokens)
        return generation, generation.info

    def _response_metadata(self, info: GenerationInfo) -> dict[str, Any]:
        stats = self.context.stats()
        return {"tokens_held": stats.tokens_seen, "tokens_kept": stats.tokens_kept // max(1, stats.layers),
                "device_bytes": stats.device_bytes, "host_bytes": stats.host_bytes,
                "tokens_prefilled": info.tokens_prefilled, "tokens_reused": info.tokens_reused,
                "context_id": self.context.context_id}

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        generation, info = self._ask(query_str)
        sources = [NodeWithScore(node=node) for node in self.nodes]
        if self.streaming:
            return StreamingResponse(response_gen=generation, source_nodes=sources,
                                     metadata={"context_id": self.context.context_id})
        text = generation.text()
        return Response(response=text.strip(), source_nodes=sources, metadata=self._response_metadata(info))

    async def acustom_query(self, query_str: str) -> Response | StreamingResponse:
        import asyncio

        return await asyncio.to_thread(self.custom_query, query_str)

    def persist(self, store: str | Path, context_id: str | None = None) -> str:
        """Save the memory (and its nodes) in a ContextStore; returns the id to ``load`` it by."""
        with ContextStore(store) as opened:
            opened.save(self.context, context_id=context_id)
        return context_id or self.context.context_id

    @classmethod
    def load(cls, store: str | Path, context_id: str, model: str | None = None, **kwargs: Any) -> "HCQueryEngine":
        """The engine ``persist`` saved, without prefilling anything again."""
        hf_model, tokenizer = shared_model(model)
        with ContextStore(store) as opened:
            ctx = opened.load(context_id, hf_model, tokenizer)
        nodes = [TextNode.from_dict(data) for data in ctx.metadata.get(_NODES_KEY, [])]
        return cls(context=ctx, nodes=nodes, **kwargs)


class HCAttentionLlamaLLM(CustomLLM):
    """A LlamaIndex LLM over hcmemory: a prompt that repeats what the memory holds is not prefilled again."""

    model: str | None = None
    """A local Hugging Face model directory; None for the embedded SmolLM2-135M-Instruct."""
    preset: str = DEFAULT_PRESET
    config: dict[str, Any] | None = None
    context_id: str | None = None
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    store: str | None = None
    max_host_bytes: int = DEFAULT_MAX_HOST_BYTES
    chat_template: bool = True
    """Complete a plain prompt as one user turn of the model's chat template."""
    _engine: Engine | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "HCAttentionLlamaLLM"

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = shared_engine(self.model, HCConfig.preset(self.preset, **(self.config or {})), self.store,
                                         self.max_host_bytes)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.engine().window or 8192, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model or "SmolLM2-135M-Instruct")

    def _generate(self, token_ids: list[int], kwargs: dict[str, Any]):
        return self.engine().generate(token_ids, self.context_id,
                                      max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
                                      temperature=kwargs.get("temperature", self.temperature))

    @staticmethod
    def _info(info: GenerationInfo) -> dict[str, Any]:
        return {"context_id": info.context_id, "tokens_reused": info.tokens_reused,
                "tokens_prefilled": info.tokens_prefilled, "finish_reason": info.finish_reason}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        generation = self._generate(self.engine().prompt_ids(prompt, self.chat_template), kwargs)
        text = generation.text()
        return CompletionResponse(text=text, additional_kwargs=self._info(generation.info))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        generation = self._generate(self.engine().prompt_ids(prompt, self.chat_template), kwargs)

        def pieces() -> CompletionResponseGen:
            text = ""
            for piece in generation:
                text += piece
                yield CompletionResponse(text=text, delta=piece)
            yield CompletionResponse(text=text, delta="", additional_kwargs=self._info(generation.info))

        return pieces()

    def _message_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.engine().message_ids([{"role": m.role.value, "content": m.content or ""} for m in messages])

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """The tokenizer's own chat template, not LlamaIndex's ``user: ... assistant:`` rendering."""
        generation = self._generate(self._message_ids(messages), kwargs)
        text = generation.text()
        return ChatResponse(message=ChatMessage(role="assistant", content=text),
                            additional_kwargs=self._info(generation.info))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        generation = self._generate(self._message_ids(messages), kwargs)

        def pieces() -> ChatResponseGen:
            text = ""
            for piece in generation:
                text += piece
                yield ChatResponse(message=ChatMessage(role="assistant", content=text), delta=piece)
            yield ChatResponse(message=ChatMessage(role="assistant", content=text), delta="",
                               additional_kwargs=self._info(generation.info))

        return pieces()

