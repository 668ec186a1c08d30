"""OpenAI's endpoints: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Each request is answered statelessly, as OpenAI's are (the client sends the whole history), but never
prefilled from scratch when the memory already holds its prefix: a pinned conversation (``x-session-id``,
``session_id`` or ``user``) continues its own context, an unpinned one the tenant's context sharing the
longest exact token prefix.  The answer is committed to that context, so the next turn is served from it.
The context's id comes back in the ``x-context-id`` header, for the ``/v1/contexts`` endpoints.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...decoding import GenerationInfo
from ..deps import CallerDep, ServerDep, get_caller, pinned_context
from ..errors import APIError
from ..generation import (Turn, collect, completion_id, events, finish_reason, first_piece, generate, now, turn_of,
                          usage)
from ..schemas import (ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage, ChatMessageOut, Completion,
                       CompletionChoice, CompletionRequest, ErrorResponse, ModelCard, ModelList, Sampled, Usage)
from ..server import Server
from ..worker import Run

router = APIRouter(prefix="/v1", dependencies=[Depends(get_caller)],
                   responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)})
SessionHeader = Annotated[str | None, Header(description="pins the conversation to this context id")]


@router.get("/models")
def list_models(server: ServerDep) -> ModelList:
    return ModelList(data=[ModelCard(id=server.model_id, created=server.created)])


def _check_model(server: Server, body: Sampled) -> None:
    if body.model.casefold() != server.model_id.casefold():
        raise APIError(404, f"the model {body.model!r} is not served here; this server serves {server.model_id!r} "
                            "(GET /v1/models)", "model", "model_not_found")


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The request's messages as the role/content dicts a chat template renders (text only)."""
    if not messages:
        raise APIError(400, "messages is empty; send at least one message", "messages", "invalid_value")
    rendered = []
    for i, message in enumerate(messages):
        if message.tool_calls:
            raise APIError(400, "tool calls are not supported by this server", f"messages[{i}].tool_calls",
                           "unsupported_parameter")
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"a {part.type!r} content part cannot be read by this text-only model; send "
                                        "text parts only", f"messages[{i}].content[{j}]", "unsupported_parameter")
            content = "".join(part.text or "" for part in content)
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content or ""})
    return rendered


async def _answer(request: Request, server: Server, turn: Turn, stream: bool, include_usage: bool,
                  shape: "_Shape") -> Any:
    run = server.worker.stream(partial(generate, server, turn))
    if not stream:
        text = await collect(run, request)
        info = run.info or GenerationInfo()  # None only when the client left before the job started
        return JSONResponse(shape.whole(text, info), headers=_headers(run, info))
    first = await first_piece(run, request)
    headers = _headers(run, run.info or GenerationInfo())
    return StreamingResponse(events(run, first, shape.chunk, include_usage, shape.usage_chunk),
                             media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


def _headers(run: Run, info: GenerationInfo) -> dict[str, str]:
    """``x-context-id`` (the context holding the conversation now), ``x-tokens-prefilled`` (prompt tokens
    computed for this answer) and what the job added (``x-restore-ms`` when it loaded a stored context)."""
    if not info.context_id:
        return dict(run.headers)
    return {"x-context-id": info.context_id, "x-tokens-prefilled": str(info.tokens_prefilled), **run.headers}


class _Shape:
    """How one endpoint's answers look, whole and in chunks."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id, self.created = completion_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        self._role_sent = False

    def whole(self, text: str, info: GenerationInfo) -> dict[str, Any]:
        if self.kind == "chat":
            body = ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage(info), choices=[
                ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish_reason(info))])
        else:
            body = Completion(id=self.id, created=self.created, model=self.model, usage=usage(info), choices=[
                CompletionChoice(text=text, finish_reason=finish_reason(info))])
        return body.model_dump()

    def _frame(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        frame = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            frame["usage"] = None  # OpenAI's chunks carry a null usage until the last one
        return frame

    def chunk(self, piece: str | None, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {} if piece is None else {"content": piece}
            if piece is not None and not self._role_sent:  # OpenAI names the role in the first delta only
                delta, self._role_sent = {"role": "assistant", **delta}, True
            return self._frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return self._frame([{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, used: Usage) -> dict[str, Any]:
        return {**self._frame([]), "usage": used.model_dump()}


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, server: ServerDep, caller: CallerDep,
                           x_session_id: SessionHeader = None) -> Any:
    _check_model(server, body)
    for field in ("tools", "response_format"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported by this server; leave it out", field,
                           "unsupported_parameter")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    messages = _messages(body.messages)
    turn = turn_of(body, server.settings, caller.tenant, partial(server.chat_ids, messages),
                   pinned_context(x_session_id, body.session_id, body.user), "messages")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, server, turn, body.stream, include_usage, _Shape("chat", server.model_id,
                                                                                   include_usage))


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, server: ServerDep, caller: CallerDep,
                      x_session_id: SessionHeader = None) -> Any:
    _check_model(server, body)
    refused = {"echo": bool(body.echo), "suffix": bool(body.suffix), "logprobs": body.logprobs is not None,
               "best_of": body.best_of not in (None, 1)}
    for field, bad in refused.items():
        if bad:
            raise APIError(400, f"{field} is not supported by this server; leave it out", field,
                           "unsupported_parameter")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, f"prompt holds {len(prompts)} prompts; this server answers one per request", "prompt",
                       "invalid_value")
    if not prompts[0].strip():
        raise APIError(400, "prompt is empty", "prompt", "invalid_value")
    turn = turn_of(body, server.settings, caller.tenant, partial(server.prompt_ids, prompts[0]),
                   pinned_context(x_session_id, body.session_id, body.user), "prompt")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, server, turn, body.stream, include_usage, _Shape("text", server.model_id,
                                                                                   include_usage))
