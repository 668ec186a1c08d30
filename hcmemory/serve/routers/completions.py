"""OpenAI's endpoints: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Each request is answered statelessly, as OpenAI's are (the client sends the whole history), but never
prefilled from scratch when the memory already holds its prefix: a pinned conversation (``x-session-id``,
``session_id`` or ``user``) continues its own context, an unpinned one the tenant's context sharing the
longest exact token prefix.  The answer is committed to that context, so the next turn is served from it.
The context's id comes back in the ``x-context-id`` header, for the ``/v1/contexts`` endpoints.

``tools`` and ``response_format`` constrain the answer with the decode loop's grammar mask
(``hcmemory.constrained``): the tools are listed in the system prompt in SmolLM2's format, the answer is
plain text or ``<tool_call>[...]</tool_call>``, and the calls come back as OpenAI's ``tool_calls`` with
arguments that always parse.  Earlier calls and ``tool`` results in the history are rendered back into
that format, so a conversation re-sent with them continues the state that produced them.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...constrained import (Constraint, HeldCalls, IncompleteOutput, ToolCalls, call_id, chat_turns,
                            response_format_constraint)
from ...decoding import GenerationInfo
from ..deps import CallerDep, ServerDep, get_caller, pinned_context
from ..errors import APIError
from ..generation import (Turn, collect, completion_id, events, finish_reason, first_piece, generate, now, turn_of,
                          usage)
from ..schemas import (ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage, ChatMessageOut, Completion,
                       CompletionChoice, CompletionRequest, ErrorResponse, FunctionCall, ModelCard, ModelList,
                       Sampled, ToolCall, Usage)
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


def _messages(messages: list[ChatMessage], tools: ToolCalls | None) -> list[dict[str, Any]]:
    """The request's messages as the role/content dicts a chat template renders (text only): an assistant's
    ``tool_calls`` and ``tool`` results in the tool-call format, and the tools' system prompt with ``tools``."""
    if not messages:
        raise APIError(400, "messages is empty; send at least one message", "messages", "invalid_value")
    rendered: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise APIError(400, f"a {message.role!r} message cannot carry tool_calls; only assistant messages do",
                           f"messages[{i}].tool_calls", "invalid_value")
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"a {part.type!r} content part cannot be read by this text-only model; send "
                                        "text parts only", f"messages[{i}].content[{j}]", "unsupported_parameter")
            content = "".join(part.text or "" for part in content)
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content or "", "tool_calls": message.tool_calls})
    try:
        return chat_turns(rendered, tools)
    except ValueError as exc:  # names the message: "message 2: the arguments of the call to 'f' are not JSON"
        raise APIError(400, str(exc), "messages", "invalid_value") from exc


def _constraint(body: ChatCompletionRequest) -> tuple[Constraint | None, str | None]:
    """The constraint the request asks for and the field it came from: tools (with ``tool_choice`` and
    ``parallel_tool_calls``) or ``response_format``.  A tool without a name, a ``tool_choice`` naming no
    tool, both kinds at once: 400 naming the field, before anything runs."""
    if body.tools is None:
        for field in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, field) is not None:
                raise APIError(400, f"{field} is only allowed when tools are given", field, "invalid_value")
    elif body.response_format is not None and body.response_format.get("type") != "text":
        raise APIError(400, "tools and response_format cannot be combined: an answer is either tool calls or a "
                            "response in the given format; send one of them", "response_format", "invalid_value")
    if body.tools is not None:
        choice = "auto" if body.tool_choice is None else body.tool_choice
        try:
            return ToolCalls(body.tools, choice, True if body.parallel_tool_calls is None else
                             body.parallel_tool_calls), "tools"
        except ValueError as exc:
            field = "tool_choice" if str(exc).startswith("tool_choice") else "tools"
            raise APIError(400, str(exc), field, "invalid_value") from exc
    if body.response_format is not None:
        try:
            return response_format_constraint(body.response_format), "response_format"
        except ValueError as exc:
            raise APIError(400, str(exc), "response_format", "invalid_value") from exc
    return None, None


async def _answer(request: Request, server: Server, turn: Turn, stream: bool, include_usage: bool,
                  shape: "_Shape") -> Any:
    run = server.worker.stream(partial(generate, server, turn))
    if not stream:
        text = await collect(run, request)
        info = run.info or GenerationInfo()  # None only when the client left before the job started
        return JSONResponse(shape.whole(text, info), headers=_headers(run, info))
    first = await first_piece(run, request)
    headers = _headers(run, run.info or GenerationInfo())
    return StreamingResponse(events(run, first, shape.chunks, include_usage, shape.usage_chunk),
                             media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


def _headers(run: Run, info: GenerationInfo) -> dict[str, str]:
    """``x-context-id`` (the context holding the conversation now), ``x-tokens-prefilled`` (prompt tokens
    computed for this answer) and what the job added (``x-restore-ms`` when it loaded a stored context)."""
    if not info.context_id:
        return dict(run.headers)
    return {"x-context-id": info.context_id, "x-tokens-prefilled": str(info.tokens_prefilled), **run.headers}


def _tool_calls(calls: list[dict[str, Any]]) -> list[ToolCall]:
    return [ToolCall(id=call_id(), function=FunctionCall(
        name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False))) for call in calls]


def _finish(held: HeldCalls, reason: str | None) -> tuple[str, list[ToolCall] | None, str | None]:
    """The end of a chat answer that ended for ``reason`` (OpenAI's words): the text still held back, the
    calls, the finish reason (``tool_calls`` for calls).  Held text that is not a whole call stays text
    with the run's reason: a call the budget cut (``length``), never returned as a call whose arguments
    would not parse, or an answer of white space alone."""
    try:
        text, calls = held.finish()
    except IncompleteOutput:
        return held.held, None, reason
    if calls:
        return text, _tool_calls(calls), "tool_calls"
    return text, None, reason


class _Shape:
    """How one endpoint's answers look, whole and in chunks; a chat answer that may be tool calls is
    held back until it is known to be text (``HeldCalls``)."""

    def __init__(self, kind: str, model: str, include_usage: bool, constraint: Constraint | None = None) -> None:
        self.kind, self.model, self.include_usage, self.constraint = kind, model, include_usage, constraint
        self.id, self.created = completion_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        self._role_sent = False
        self._held = HeldCalls(constraint)

    def whole(self, text: str, info: GenerationInfo) -> dict[str, Any]:
        if self.kind == "chat":
            held = HeldCalls(self.constraint)
            shown = held.feed(text)
            rest, calls, finish = _finish(held, finish_reason(info))
            message = ChatMessageOut(content=None if calls else shown + rest, tool_calls=calls)
            body = ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage(info), choices=[
                ChatChoice(message=message, finish_reason=finish)])
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

    def _chat_frame(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if delta and not self._role_sent:  # OpenAI names the role in the first delta only
            delta, self._role_sent = {"role": "assistant", **delta}, True
        return self._frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def chunks(self, piece: str | None, finish: str | None) -> list[dict[str, Any]]:
        """The chunks for one piece (``None``: the end, with its finish reason): none while the piece is held
        back; at the end, held text or one ``delta.tool_calls`` chunk per call, then the finishing chunk."""
        if self.kind != "chat":
            return [self._frame([{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}])]
        if piece is not None:
            shown = self._held.feed(piece)
            return [self._chat_frame({"content": shown})] if shown else []
        text, calls, reason = _finish(self._held, finish)
        frames = [self._chat_frame({"content": text})] if text else []
        frames += [self._chat_frame({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                                     "function": call.function.model_dump()}]})
                   for index, call in enumerate(calls or [])]
        return frames + [self._chat_frame({}, reason)]

    def usage_chunk(self, used: Usage) -> dict[str, Any]:
        return {**self._frame([]), "usage": used.model_dump()}


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, server: ServerDep, caller: CallerDep,
                           x_session_id: SessionHeader = None) -> Any:
    _check_model(server, body)
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    constraint, constraint_param = _constraint(body)
    messages = _messages(body.messages, constraint if isinstance(constraint, ToolCalls) else None)
    turn = turn_of(body, server.settings, caller.tenant, partial(server.chat_ids, messages),
                   pinned_context(x_session_id, body.session_id, body.user), "messages", constraint, constraint_param)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, server, turn, body.stream, include_usage,
                         _Shape("chat", server.model_id, include_usage, constraint))


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
