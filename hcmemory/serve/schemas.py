"""Request and response bodies: OpenAI's chat and completion shapes, and the memory endpoints' own.

Requests are validated strictly (``"5"`` is not an int, as with OpenAI) and unknown fields are ignored,
because OpenAI's clients add new optional fields faster than servers learn them.  Fields a client may
send but this server cannot honour (``n`` > 1, penalties, logprobs) are declared so that a
request using them is refused with a message naming the field instead of being answered differently
from what was asked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTEXT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
"""Context and session ids: 1–128 characters, letters, digits and ``._:@-``, not starting with punctuation."""


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Request):
    include_usage: bool = False


class Sampled(Request):
    """The fields both OpenAI generation endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; either may be given."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """0 (greedy) when omitted: a memory server's answers should be reproducible unless asked otherwise."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    """OpenAI's end-user id; pins the conversation when neither ``x-session-id`` nor ``session_id`` is given."""
    session_id: str | None = None
    """Pins the conversation to this context id (``x-session-id`` takes precedence)."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant's earlier calls (``function.arguments`` a JSON string, as OpenAI sends them)."""
    tool_call_id: str | None = None
    """The call a ``tool`` message answers (its content is the result)."""


class ChatCompletionRequest(Sampled):
    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(Sampled):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens served from a live or stored state instead of being prefilled."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The call's arguments as a JSON object in text (``json.dumps``), as OpenAI sends them."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """None when the answer is tool calls."""
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hcmemory"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- the memory endpoints ----------------------------------------------------------------------------
class ContextCreate(Request):
    id: str | None = Field(default=None, pattern=CONTEXT_ID_PATTERN)
    """The new context's id (a session id that chat requests may then send); a random one when omitted."""
    preset: str | None = None
    """How it stores its KV state (``HCConfig`` presets, or ``preset:field=value,...``); the server's when omitted."""


class DocumentsAppend(Request):
    text: str | list[str]
    """Text to read into the context, prefilled once (the next ``ask`` reads it as its document)."""
    raw: bool = False
    """Append verbatim instead of inside a user turn of the chat format."""


class AskRequest(Request):
    question: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    stop: list[str] | None = None
    seed: int | None = None


class ForkRequest(Request):
    id: str | None = Field(default=None, pattern=CONTEXT_ID_PATTERN)
    """The fork's id; a random one when omitted."""


class ContextInfo(BaseModel):
    id: str
    object: Literal["context"] = "context"
    tokens: int
    tokens_prefilled: int
    """Tokens ever prefilled into the committed state: each once, which is the point."""
    preset: str | None
    """The preset the context's configuration equals, or None for a custom one."""
    config: dict[str, Any]
    stats: dict[str, Any]
    """``ContextStats``: bytes held next to the model and on the host, rows kept, compression ratio."""
    text: str | None = None
    """The decoded context, when asked for with ``?include_text=true``."""


class DocumentsAdded(ContextInfo):
    tokens_added: int


class Answer(BaseModel):
    id: str
    object: Literal["context.answer"] = "context.answer"
    answer: str
    finish_reason: str | None
    usage: Usage


class Checkpoint(BaseModel):
    id: str
    object: Literal["context.checkpoint"] = "context.checkpoint"
    checkpoints: list[dict[str, Any]]
    """The context's stored checkpoints (tag, created, tokens, bytes)."""


class Deleted(BaseModel):
    id: str
    object: Literal["context"] = "context"
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok", "degraded"] = "ok"
    """``degraded``: the last checkpoint write failed; answers still come from memory and writes are retried."""
    model: str
    preset: str
    open_tenants: int
    pending: int
    finished: int
    cancelled: int
    replica_id: str | None = None
    """The Ray Serve replica that answered (None for the single server)."""
    checkpoints_pending: int = 0
    """Conversations answered since their last checkpoint (per-turn checkpoints only)."""
    checkpoints_written: int = 0
    checkpoints_refused: int = 0
    """Checkpoints the store refused because another replica had saved the conversation since (compare-and-set
    during a failover); this replica dropped its copy and reloads the stored one when next asked."""
    last_checkpoint_ms: float | None = None
    """How long the last checkpoint write took."""
    store_error: str | None = None
    """Why the store is degraded."""
