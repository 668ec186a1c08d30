"""Constrained decoding: a grammar masks the tokens it forbids before each sampling step, so the
answer always parses (a JSON schema, a regex, a choice among strings, any JSON object, tool calls).

Why a token mask: asked for JSON, the 135M model writes prose or fenced JSON with fields of its own
(all three prompts of tests/test_constrained.py, unmasked); an agent loop needs valid JSON every
time.  Masking the logits of every token that cannot continue a valid answer makes the format a
property of the decoder rather than a hope about the model, on any device, at the cost of one mask
per step (about 0.1 ms on a CPU, against 60-80 ms for the step itself).

Engine: llguidance (``llguidance`` on PyPI), chosen over xgrammar after measuring both on CPU with
SmolLM2-135M-Instruct's tokenizer (docs/constrained.md has the numbers and the command):

- both accepted a valid instance token by token and allowed only EOS once it was complete, and both
  refused a look-behind regex with a clear message;
- llguidance builds a JSON-schema grammar and its first mask in 1-2 ms (its lexer is built lazily)
  against 22-24 ms for xgrammar; xgrammar's later masks are faster (median 2.5-3 us against 20-25
  us), a difference of well under 0.1 % of a decode step of this model on a CPU (60-80 ms);
- llguidance is one 7.6 MB wheel with no Python dependencies; xgrammar needs apache-tvm-ffi (13 MB)
  and, on Linux x86-64, triton (about 1 GB) as hard dependencies;
- llguidance is at 1.x (semantic versioning) and is the ``guidance`` backend of vLLM and SGLang and
  llama.cpp's optional grammar engine; xgrammar is pre-1.0 (0.2.9);
- llguidance never raises mid-generation: a grammar it cannot build is reported by
  ``LLMatcher.validate_grammar`` as a message (``Unimplemented keys: ["if"]``), which is how this
  module refuses a schema before any token is generated; its Lark front end with embedded ``%json``
  and regex negation (``~``) expresses "plain text or a tool call" directly;
- tokenizer: llguidance reads the Rust tokenizer's JSON from a fast Hugging Face tokenizer (byte-level
  BPE included); xgrammar detects the vocabulary's encoding (byte-level here) from the tokenizer.
  Both took under 1 s.

Use::

    compiled = compile_constraint(tokenizer, JsonSchema(MyModel), stop_ids={tokenizer.eos_token_id})
    matcher = compiled.matcher()          # one per generation
    # each step:  matcher.mask(logits); token = sample(logits); matcher.advance(token)
    # at the end: JsonSchema(MyModel).parse(text) raises IncompleteOutput if the budget cut it short

Compiled constraints are cached per (tokenizer fingerprint, stop ids, constraint), so a schema used
by every turn of an agent is compiled once.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import llguidance
import llguidance.hf
import torch

from .models import tokenizer_fingerprint

log = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON is written the way ``json.dumps`` writes it: the spacing the model saw most in training, and
no free whitespace, which a small model can otherwise repeat until its budget runs out."""
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOOL_CHOICES = ("auto", "none", "any", "required")


def call_id() -> str:
    """A new tool call's id, in OpenAI's ``call_…`` form (LangChain and the server hand these out alike)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class IncompleteOutput(ValueError):
    """The answer ended (token budget, timeout, stop string) before the constraint was satisfied.

    Raised instead of returning text that does not parse; ``text`` is what was produced."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


def _incomplete(text: str, what: str, reason: str = "length") -> IncompleteOutput:
    shown = text if len(text) <= 80 else text[:40] + " ... " + text[-35:]
    remedy = "raise the timeout" if reason == "timeout" else "raise max_new_tokens"
    return IncompleteOutput(
        f"the answer ended before the {what} was complete ({len(text)} characters: {shown!r}); {remedy}, "
        "or bound the output in the schema (maxLength on strings, maxItems on arrays)", text)


def _canonical_json(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} is not JSON-serializable: {error}") from None


def _schema_text(schema: Mapping[str, Any] | str | type, where: str) -> str:
    """A JSON schema given as a dict, a JSON string or a type pydantic can describe (a BaseModel
    subclass, a TypedDict, a dataclass), as JSON text: a hashable value for the cache key."""
    if isinstance(schema, type):
        import pydantic

        try:
            schema = pydantic.TypeAdapter(schema).json_schema()
        except pydantic.PydanticUserError as error:
            raise ValueError(f"{where}: pydantic cannot describe {schema.__name__} as a JSON schema: {error}") from None
    elif isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is a string but not JSON: {error}") from None
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where} must be a JSON schema object (a dict, a JSON string or a pydantic model "
                         f"class), not {type(schema).__name__}")
    return _canonical_json(dict(schema), where)


def _formatted(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with the JSON spacing above, unless it sets its own (llguidance's ``x-guidance``)."""
    return {**schema, "x-guidance": {**_JSON_FORMAT, **schema.get("x-guidance", {})}}


def _lark_string(text: str) -> str:
    """A Lark string literal matching ``text`` exactly (Lark's literals take JSON escapes)."""
    return json.dumps(text, ensure_ascii=False)


class Constraint(ABC):
    """What an answer must look like.  Values are frozen and hashable: they are the cache key."""

    what: ClassVar[str] = "answer"
    """What the answer is, for messages: "the answer ended before the JSON value was complete"."""

    @abstractmethod
    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint; not checked here."""


@dataclass(frozen=True)
class JsonSchema(Constraint):
    """A JSON value valid under ``schema``: a dict, a JSON string, or a pydantic-describable type
    (stored as JSON text).  Keywords the engine does not implement are refused at compile time
    rather than ignored: an ignored keyword would let through answers the schema forbids."""

    schema: str
    what: ClassVar[str] = "JSON value"

    def __init__(self, schema: Mapping[str, Any] | str | type) -> None:
        object.__setattr__(self, "schema", _schema_text(schema, "JsonSchema schema"))

    def grammar(self) -> str:
        return json.dumps({"grammars": [{"json_schema": _formatted(json.loads(self.schema))}]})

    def parse(self, text: str) -> Any:
        """The answer's JSON value; ``IncompleteOutput`` if the answer ended before it was complete."""
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise _incomplete(text, self.what) from None


@dataclass(frozen=True)
class JsonObject(JsonSchema):
    """Any JSON object (OpenAI's ``json_mode``)."""

    def __init__(self) -> None:
        super().__init__({"type": "object"})


@dataclass(frozen=True)
class Regex(Constraint):
    """Text fully matching ``pattern`` (Rust ``regex`` syntax: no look-around, no back-references)."""

    pattern: str
    what: ClassVar[str] = "match of the regex"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"Regex pattern must be a non-empty string, not {self.pattern!r}")

    def grammar(self) -> str:
        return llguidance.LLMatcher.grammar_from_regex(self.pattern)


@dataclass(frozen=True)
class Choice(Constraint):
    """Exactly one of ``options`` (as written, no quotes added)."""

    options: tuple[str, ...]
    what: ClassVar[str] = "choice"

    def __init__(self, options: Sequence[str]) -> None:
        if isinstance(options, str) or not isinstance(options, (list, tuple)):
            raise ValueError(f"Choice options must be a list of strings, e.g. ['yes', 'no'], not {options!r}")
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"Choice options must be one or more non-empty strings, not {options!r}")
        if len(set(options)) != len(options):
            raise ValueError(f"Choice options repeat a string: {options!r}")
        object.__setattr__(self, "options", tuple(options))

    def grammar(self) -> str:
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(_lark_string, self.options)))


@dataclass(frozen=True)
class Tool:
    """One callable tool: its name, what it is for, and a JSON schema of its arguments (JSON text)."""

    name: str
    description: str
    parameters: str

    @classmethod
    def of(cls, spec: Mapping[str, Any], index: int = 0) -> "Tool":
        """From an OpenAI-style tool (``{"type": "function", "function": {...}}``) or its inner
        ``{"name", "description", "parameters"}`` (what LangChain's ``convert_to_openai_tool`` gives)."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"tool {index} must be a dict like {{'type': 'function', 'function': {{'name': ...}}}}, "
                             f"not {type(spec).__name__}")
        function = spec.get("function", spec) if spec.get("type", "function") == "function" else None
        if not isinstance(function, Mapping):
            raise ValueError(f"tool {index} is of type {spec.get('type')!r}; only function tools can be called")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool {index} has no name (give function.name): {dict(spec)!r}")
        if not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ValueError(f"tool {name!r}: description must be a string, not {type(description).__name__}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return cls(name, description, _schema_text(parameters, f"tool {name!r} parameters"))


def _closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameter schema with no arguments beyond those it declares, unless it says otherwise
    (``additionalProperties``): a tool receives only the parameters it names, so an extra key (the 135M
    model adds ``"type": "integer"`` next to an integer, or copies the prompt's example arguments into
    a tool that takes none) would fail at the tool."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def _tool_choice_name(tool_choice: str | Mapping[str, Any]) -> str:
    """``tool_choice`` as one word: auto, none, required, or a tool's name (``any`` is ``required``)."""
    if isinstance(tool_choice, Mapping):  # {"type": "function", "function": {"name": ...}}
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tool_choice {dict(tool_choice)!r} names no tool; give "
                             "{'type': 'function', 'function': {'name': ...}} or a string")
        return name
    if not isinstance(tool_choice, str) or not tool_choice:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'any', 'required' or a tool name, not {tool_choice!r}")
    return "required" if tool_choice == "any" else tool_choice


@dataclass(frozen=True)
class ToolCalls(Constraint):
    """Plain text or tool calls, in SmolLM2's tool-call format: ``<tool_call>[{"name": ..., "arguments":
    {...}}, ...]</tool_call>``, a JSON list (several calls at once when ``parallel``) whose arguments
    are valid under each tool's parameter schema.

    SmolLM2's chat template renders no tools; this is the format its instruct data used (tools listed
    in the system prompt between ``<tools>`` tags, see ``system_prompt``), so the model has seen it.

    ``tool_choice``: ``"auto"`` plain text or calls, the model chooses (text may not begin with
    ``<tool_call>``, so every answer is one or the other, never a broken call); ``"any"`` or
    ``"required"`` at least one call; a tool's name (or ``{"type": "function", "function": {"name":
    ...}}``) calls to that tool only; ``"none"`` plain text only.  A call's arguments are those its
    tool declares, no others, unless its schema sets ``additionalProperties``.
    """

    tools: tuple[Tool, ...]
    tool_choice: str = "auto"
    parallel: bool = True
    what: ClassVar[str] = "tool call"

    def __init__(self, tools: Sequence[Mapping[str, Any] | Tool], tool_choice: str | Mapping[str, Any] = "auto",
                 parallel: bool = True) -> None:
        if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
            raise ValueError(f"tools must be a list of tool schemas, not {type(tools).__name__}")
        parsed = tuple(t if isinstance(t, Tool) else Tool.of(t, i) for i, t in enumerate(tools))
        names = [t.name for t in parsed]
        if len(set(names)) != len(names):
            raise ValueError(f"two tools share a name: {names}")
        choice = _tool_choice_name(tool_choice)
        if choice not in _TOOL_CHOICES and choice not in names:
            raise ValueError(f"tool_choice {choice!r} is not one of the tools {names} "
                             f"nor one of {list(_TOOL_CHOICES)}")
        if choice != "none" and not parsed:
            raise ValueError(f"tool_choice={choice!r} needs at least one tool; none were given")
        if not isinstance(parallel, bool):
            raise ValueError(f"parallel must be True or False, not {parallel!r}")
        object.__setattr__(self, "tools", parsed)
        object.__setattr__(self, "tool_choice", choice)
        object.__setattr__(self, "parallel", parallel)

    def calls_schema(self) -> dict[str, Any]:
        """The JSON schema of the list between the tool-call tags."""
        allowed = [t for t in self.tools if self.tool_choice in ("auto", "required", t.name)]
        items = [{"type": "object",
                  "properties": {"name": {"const": t.name}, "arguments": _closed(json.loads(t.parameters))},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in allowed]
        schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                                  "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def grammar(self) -> str:
        # plain text: one or more characters, not beginning with the call tag, after white space or not
        # (regex negation, ``~``): parse() reads any answer whose first non-blank text is the tag as a call
        text = f"TEXT: /(.|\\n)+/ & ~/[ \\t\\r\\n]*{re.escape(TOOL_CALL_OPEN)}(.|\\n)*/"
        if self.tool_choice == "none":
            return llguidance.LLMatcher.grammar_from_lark(f"start: TEXT\n{text}")
        schema = json.dumps(_formatted(self.calls_schema()))
        calls = f"calls: {_lark_string(TOOL_CALL_OPEN)} %json {schema} {_lark_string(TOOL_CALL_CLOSE)}"
        start = "start: TEXT | calls" if self.tool_choice == "auto" else "start: calls"
        return llguidance.LLMatcher.grammar_from_lark("\n".join((start, calls, text)))

    def system_prompt(self) -> str:
        """The system message that lists the tools and the call format, in SmolLM2's words."""
        listed = json.dumps([{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": json.loads(t.parameters)}}
                             for t in self.tools], ensure_ascii=False)
        return ("You are an expert in composing functions. You are given a question and a set of possible "
                "functions. Based on the question, you will need to make one or more function/tool calls to "
                "achieve the purpose. If none of the functions can be used, point it out and refuse to answer.\n"
                f"You have access to the following tools:\n<tools>{listed}</tools>\n"
                "To call tools, answer with nothing but this format:\n"
                f'{TOOL_CALL_OPEN}[{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}]{TOOL_CALL_CLOSE}')

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The calls in ``text`` as ``[{"name": ..., "arguments": {...}}]``, or None for a plain-text
        answer.  ``IncompleteOutput`` when the answer ended inside a call, or ended as text where a call
        was required (both mean the budget ran out: the grammar allows neither as a finished answer)."""
        stripped = text.strip()
        if not stripped.startswith(TOOL_CALL_OPEN):
            if self.tool_choice not in ("auto", "none") or not stripped:
                raise _incomplete(text, self.what)
            return None
        body = stripped[len(TOOL_CALL_OPEN):]
        if not body.endswith(TOOL_CALL_CLOSE):
            raise _incomplete(text, self.what)
        try:
            calls = json.loads(body[:-len(TOOL_CALL_CLOSE)])
        except json.JSONDecodeError:
            raise _incomplete(text, self.what) from None
        return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


def response_format_constraint(response_format: Mapping[str, Any]) -> JsonSchema | None:
    """OpenAI's ``response_format`` as a constraint: ``{"type": "json_schema", "json_schema": {"schema":
    {...}, ...}}`` is ``JsonSchema``, ``{"type": "json_object"}`` is ``JsonObject``, ``{"type": "text"}``
    is None (no constraint).  ``strict`` is accepted either way: the grammar always enforces the schema."""
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be a dict like {{'type': 'json_schema', 'json_schema': "
                         f"{{'name': ..., 'schema': {{...}}}}}}, not {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonObject()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ValueError("response_format of type 'json_schema' needs json_schema={'name': ..., 'schema': "
                             f"{{...}}}}, not {spec!r}")
        return JsonSchema(spec["schema"])
    raise ValueError(f"response_format type {kind!r} is not one of 'json_schema', 'json_object', 'text'")


def render_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """Calls (``[{"name": ..., "arguments": {...}}]``) as the answer text the ``ToolCalls`` grammar
    writes, JSON spaced as ``json.dumps`` spaces it: a history re-sent with the calls of an earlier
    answer renders to the tokens the model produced, so the live state holding them is reused."""
    return TOOL_CALL_OPEN + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls],
                                       ensure_ascii=False) + TOOL_CALL_CLOSE


def tool_response(content: str) -> str:
    """A tool's result as the user turn SmolLM2's tool format gives it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def chat_turns(messages: Sequence[Mapping[str, Any]], tools: ToolCalls | None = None) -> list[dict[str, str]]:
    """OpenAI-style chat messages (``role``, ``content`` text, an assistant's ``tool_calls``, ``tool``
    results) as the plain ``role``/``content`` turns a chat template without tool support renders.

    An assistant's calls become the ``<tool_call>[...]</tool_call>`` text the grammar writes (after its
    text, if it has any), a ``tool`` message a user turn ``<tool_response>...</tool_response>``, and with
    ``tools`` their system prompt (``ToolCalls.system_prompt``) follows the conversation's own system
    message, or opens the conversation when it has none.  ValueError names a message that cannot be
    rendered (arguments that are not a JSON object, content that is not text)."""
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message {index} ({role}) has content of type {type(content).__name__}; "
                             "give it as text")
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            parsed = []
            for call in calls:
                function = call.get("function", call)
                arguments = function.get("arguments", {})
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except json.JSONDecodeError as error:
                        raise ValueError(f"message {index}: the arguments of the call to {function.get('name')!r} "
                                         f"are not JSON: {error}") from None
                if not isinstance(arguments, Mapping):
                    raise ValueError(f"message {index}: the arguments of the call to {function.get('name')!r} "
                                     f"must be a JSON object, not {type(arguments).__name__}")
                parsed.append({"name": function.get("name"), "arguments": dict(arguments)})
            content = (content + "\n" if content else "") + render_calls(parsed)
        elif role == "tool":
            role, content = "user", tool_response(content)
        turns.append({"role": role, "content": content})
    if tools is not None:
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + tools.system_prompt()}
        else:
            turns.insert(0, {"role": "system", "content": tools.system_prompt()})
    return turns



class HeldCalls:
    """An answer's text pieces as they form, with whatever may still become a tool call held back, so
    that a streaming consumer is shown plain text at once and never half a call as text.

    ``feed(piece)`` returns the text to show now (``""`` while the answer may still open with
    ``<tool_call>``); ``finish()`` returns the held text that turned out to be plain text and the
    parsed calls (``ToolCalls.parse``), one of them empty.  Without a ``ToolCalls`` constraint (or
    under ``tool_choice="none"``) every piece is shown as it comes."""

    def __init__(self, constraint: Constraint | None) -> None:
        self.constraint = constraint
        self.held = ""
        """Text held back so far: the start of an answer that may be, or is, a call."""
        self._possible = isinstance(constraint, ToolCalls) and constraint.tool_choice != "none"

    def feed(self, piece: str) -> str:
        if not self._possible:
            return piece
        self.held += piece
        start = self.held.lstrip()
        if start.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(start):
            return ""
        shown, self.held, self._possible = self.held, "", False  # plain text: from here on shown as it forms
        return shown

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """``(text, None)`` for held plain text (``""`` when nothing was held), ``("", calls)`` for calls;
        ``IncompleteOutput`` when the held text is a call the answer ended inside."""
        if not self.held:
            return "", None
        assert isinstance(self.constraint, ToolCalls)
        calls = self.constraint.parse(self.held)
        return ("", calls) if calls is not None else (self.held, None)


@dataclass
class CompiledConstraint:
    """A constraint checked and built for one tokenizer; ``matcher()`` starts a generation."""

    constraint: Constraint
    vocab_size: int
    _template: llguidance.LLMatcher = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def matcher(self) -> "Matcher":
        """A fresh matcher at the start of the grammar (a copy: the built lexer is shared)."""
        with self._lock:
            return Matcher(self._template.deep_copy(), self.vocab_size, self.constraint)


class Matcher:
    """One generation's position in the grammar.

    Each step: ``mask(logits)`` before sampling, ``advance(token)`` after.  Once the grammar is
    complete (``is_finished()``) the mask allows only the end-of-sequence tokens: the loop samples
    one of them (closing the turn) or may feed one without sampling.  While the grammar is
    satisfied but could go on (a number, free text) the end-of-sequence tokens are allowed along
    with the continuations.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, constraint: Constraint) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self.constraint = constraint
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.tokens = 0
        """Tokens advanced so far."""

    def allowed(self) -> torch.Tensor:
        """A bool vector over the tokenizer's vocabulary: which tokens may come next."""
        self._raise_if_error()
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        self._raise_if_error()
        return ((self._bits.unsqueeze(-1) >> self._shifts) & 1).view(-1)[:self._vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of forbidden tokens to -inf, in place.  ``logits`` is ``[vocab]`` or ``[1, vocab]``
        (any device and float dtype); columns past the tokenizer's vocabulary (padding rows of the
        embedding) are forbidden too."""
        allowed = self.allowed()
        width = logits.shape[-1]
        if width > self._vocab_size:
            allowed = torch.cat([allowed, allowed.new_zeros(width - self._vocab_size)])
        logits.masked_fill_(~allowed[:width].to(logits.device, non_blocking=True), float("-inf"))

    def advance(self, token_id: int) -> None:
        """Move past ``token_id``; a token the last mask forbade is a bug in the loop: ValueError."""
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} does not fit the {type(self.constraint).__name__} constraint "
                             f"after {self.tokens} tokens (was mask() applied before sampling?): "
                             f"{self._matcher.get_error()}")
        self.tokens += 1

    def is_finished(self) -> bool:
        """The grammar is complete: nothing but an end-of-sequence token may follow (or one was fed)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def is_accepting(self) -> bool:
        """What was generated so far is a complete answer (it may still go on)."""
        return self._matcher.is_accepting()

    def incomplete(self, text: str, reason: str = "length") -> IncompleteOutput:
        """The error for an answer (``text``) that ended, for ``reason`` (``length`` or ``timeout``), before
        the grammar was complete: what the decode loop raises instead of returning it."""
        return _incomplete(text, self.constraint.what, reason)

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"the {type(self.constraint).__name__} constraint failed after {self.tokens} "
                               f"tokens: {self._matcher.get_error()}")


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    capacity: int


class _LRU:
    """A thread-safe least-recently-used map.  Building an entry happens outside the lock (a schema
    takes milliseconds, a tokenizer most of a second); two threads building the same key keep the first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any, build: Any) -> Any:
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
            self.misses += 1
        value = build()
        with self._lock:
            value = self._items.setdefault(key, value)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, len(self._items), self.capacity)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0


_tokenizers = _LRU(8)
_compiled = _LRU(256)


def _engine_tokenizer(tokenizer: Any, fingerprint: str, stop_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    def build() -> llguidance.LLTokenizer:
        log.debug("building the grammar engine's view of tokenizer %s", fingerprint[:12])
        try:
            return llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids))
        except ValueError as error:
            raise ValueError(f"constrained decoding needs a fast (Rust) Hugging Face tokenizer: {error}") from None
    return _tokenizers.get((fingerprint, stop_ids), build)


def compile_constraint(tokenizer: Any, constraint: Constraint,
                       stop_ids: Iterable[int] | None = None) -> CompiledConstraint:
    """``constraint`` checked and built for ``tokenizer``, cached; ValueError naming the problem if the
    engine cannot build it (an unimplemented schema keyword, a bad regex), before any generation.

    ``stop_ids`` are the tokens that end an answer (the decode loop's end-of-turn tokens; default the
    tokenizer's EOS): once the grammar is complete, only they are allowed."""
    if not isinstance(constraint, Constraint):
        raise TypeError(f"constraint must be a Constraint (JsonSchema, JsonObject, Regex, Choice, ToolCalls), "
                        f"not {type(constraint).__name__}")
    stops = tuple(sorted({int(t) for t in (stop_ids if stop_ids is not None else [tokenizer.eos_token_id])
                          if t is not None}))
    if not stops:
        raise ValueError("constrained decoding needs an end-of-sequence token: the tokenizer has none; pass stop_ids")
    fingerprint = tokenizer_fingerprint(tokenizer)
    engine_tokenizer = _engine_tokenizer(tokenizer, fingerprint, stops)

    def build() -> CompiledConstraint:
        grammar = constraint.grammar()
        problem = llguidance.LLMatcher.validate_grammar(grammar, engine_tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise ValueError(f"cannot build a grammar for {_describe(constraint)}: {problem.strip()}")
        if problem:
            log.warning("grammar for %s: %s", _describe(constraint), problem.strip())
        template = llguidance.LLMatcher(engine_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"cannot build a grammar for {_describe(constraint)}: {template.get_error()}")
        return CompiledConstraint(constraint, engine_tokenizer.vocab_size, template)

    return _compiled.get((fingerprint, stops, constraint), build)


def cache_info() -> CacheInfo:
    """Hits, misses and size of the compiled-constraint cache."""
    return _compiled.info()


def clear_cache() -> None:
    """Forget every compiled constraint and tokenizer view (for tests and to free memory)."""
    _compiled.clear()
    _tokenizers.clear()


def _describe(constraint: Constraint) -> str:
    text = repr(constraint)
    return text if len(text) <= 200 else text[:200] + "...)"
