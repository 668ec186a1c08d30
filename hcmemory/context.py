"""HCContext: one conversation's live HCAttention state — the object users hold.

Everything appended is prefilled once into the live cache and never again.  Questions are
answered in a temporary overlay (a cache transaction that is rolled back), so asking leaves the
state exactly as it was; ``chat`` commits the turn instead.  Calls are serialized by a guard
(``guard.py``): other threads wait their turn, and a call made from inside another call on the
same thread (in a ``stream()`` loop) raises ``ContextBusyError`` instead of corrupting the state.
Arguments are checked here, at the boundary, with errors that name the argument.

Persistence hangs below: ``to_state()`` copies the state out under the guard, ``from_state()``
rebuilds a context around it without prefilling anything; ``checkpoint.py`` is the format.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .batching import Batcher, Step, solo_step
from .cache import CacheStats, HCCache
from .chat import ChatFormat
from .checkpoint import ContextState, fingerprints, inconsistent, read_file, write_file
from .config import HCConfig, coerce_config, is_int
from .constrained import CompiledConstraint, Constraint
from .decoding import Generation, GenerationInfo, Sampling, compile_for, decode, stop_token_ids
from .guard import CallGuard
from .models import check_model, check_tokenizer
from .prefill import prefill

log = logging.getLogger(__name__)

Content = str | Sequence[str] | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class ContextStats(CacheStats):
    """Cache statistics plus the proof that nothing was re-prefilled."""

    tokens_prefilled: int
    """Tokens prefilled into the committed state (documents, chat turns): each exactly once."""


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_id(value: Any, name: str = "context_id") -> str:
    """A context id or tag: a non-empty string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


class HCContext:
    """A live, growing KV state over one conversation or document set.

    ``config`` is a preset name, an ``HCConfig`` or a dict of its fields (default ``full``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: HCConfig | str | dict | None = None, context_id: str | None = None) -> None:
        check_model(model)
        check_tokenizer(tokenizer)
        config = coerce_config(config)
        context_id = uuid.uuid4().hex if context_id is None else check_id(context_id)
        self._setup(model, tokenizer, config, context_id, HCCache.for_model(model, config, tokenizer), [], 0, False)

    def _setup(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: HCConfig, context_id: str,
               cache: HCCache, token_ids: list[int], tokens_prefilled: int, turn_open: bool,
               metadata: dict[str, Any] | None = None) -> None:
        """Every field a context has; ``__init__`` starts empty, ``from_state`` and ``fork`` start filled."""
        self.model, self.tokenizer, self.config, self.context_id = model, tokenizer, config, context_id
        self.cache = cache
        self.format = ChatFormat.for_tokenizer(tokenizer)
        self.token_ids = token_ids
        self.tokens_prefilled = tokens_prefilled
        self.turn_open = turn_open
        """True while appended documents sit in a user turn that a question will close."""
        self.metadata: dict[str, Any] = dict(metadata or {})
        """Your own notes about this context (JSON-serializable); saved and loaded with it."""
        self._guard = CallGuard()
        self._closed: str | None = None
        self.batcher: Batcher | None = None
        """Where this context's forwards run: None, on the calling thread (decode steps as a batch of
        one, so the logits are those of any batch); a ``ContextPool`` sets its ``Batcher``, whose model
        thread runs them together with other contexts' steps."""

    @property
    def closed(self) -> bool:
        """Whether ``close()`` or a pool's spill released this context's state (any later call raises)."""
        return self._closed is not None

    def _check_live(self) -> None:
        """Refuse to run on a closed context or on a cache someone changed behind this context's back."""
        if self._closed:
            raise RuntimeError(f"context {self.context_id!r} was {self._closed}; get it again (e.g. pool.get(...))")
        if self.cache.seen != len(self.token_ids):
            raise RuntimeError(
                f"context {self.context_id!r} holds {len(self.token_ids)} tokens but its cache has seen "
                f"{self.cache.seen}: the cache was used directly (e.g. model.generate on ctx.cache); use ctx.fork().cache "
                "for that, or reset() this context")

    # --- growing the state -------------------------------------------------------------------
    def append(self, content: Content, progress: bool | None = None, raw: bool = False) -> int:
        """Prefill only the new tokens into the live state; returns how many were added.

        Text goes into a user turn of the chat format (opened if needed, see ``chat.py``) so the
        next question reads it as its document; token ids and ``raw=True`` text go in verbatim.
        All or nothing: an error or ``KeyboardInterrupt`` midway leaves the context as it was.
        """
        ids, is_text = self._tokenize(content)
        with self._guard.hold("append"):
            self._check_live()
            if not ids:
                return 0
            frame = is_text and not raw and not self.turn_open
            if frame:
                ids = self._to_ids(self._open_turn()) + ids
            with self.cache.transaction():
                self._prefill(ids, progress)
            self.token_ids.extend(ids)
            self.tokens_prefilled += len(ids)
            self.turn_open = self.turn_open or frame
        return len(ids)

    def _open_turn(self) -> str:
        last = self.token_ids[-1] if self.token_ids else None
        after_eos = self.tokenizer.decode([last]) if last in stop_token_ids(self.model, self.tokenizer) else None
        return self.format.open_turn(empty=not self.token_ids, after_eos=after_eos)

    def _to_ids(self, content: Content) -> list[int]:
        return self._tokenize(content)[0]

    def _tokenize(self, content: Content) -> tuple[list[int], bool]:
        """(token ids, whether the content was text)."""
        if isinstance(content, str):
            return self.tokenizer(content, add_special_tokens=False).input_ids, True
        if isinstance(content, (bytes, bytearray, memoryview)):
            raise TypeError("append() takes text (str), not bytes; decode it first, e.g. data.decode('utf-8')")
        if isinstance(content, torch.Tensor):
            if content.dtype not in (torch.int32, torch.int64) or content.dim() > 2 or (
                    content.dim() == 2 and content.shape[0] != 1):
                raise ValueError("token tensors must be integer ids shaped (n,) or (1, n)")
            content = content.flatten().tolist()
        if not isinstance(content, (list, tuple)):
            raise TypeError("append() takes a string, a list of strings, or a list/tensor of token ids, "
                            f"not {type(content).__name__}")
        items = list(content)
        if items and all(isinstance(x, str) for x in items):
            return [t for text in items for t in self.tokenizer(text, add_special_tokens=False).input_ids], True
        if all(is_int(x) for x in items):
            vocab = self.model.config.vocab_size
            bad = [x for x in items if not 0 <= x < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
            return items, False
        raise TypeError("append() takes a string, a list of strings, or a list/tensor of token ids; "
                        f"got a list holding {sorted({type(x).__name__ for x in items})}")

    def _prefill(self, ids: list[int], progress: bool | None = None) -> torch.Tensor:
        forward = None if self.batcher is None else self.batcher.prefill_forward(self.cache)
        return prefill(self.model, self.cache, torch.tensor([ids]), self.config.chunk_size, progress, forward)

    def _decoding(self) -> AbstractContextManager[Step]:
        """The decode step function for one answer: joined to the batcher for the answer's decode loop."""
        if self.batcher is None:
            return nullcontext(solo_step(self.model, self.cache))
        return self.batcher.decoding(self.cache)

    # --- answering ---------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0,
            stop: Sequence[str] | None = None, raw: bool = False, constraint: Constraint | None = None) -> str:
        """Answer from the whole context without changing it.

        The question is wrapped as a user turn in the tokenizer's chat format; ``raw=True`` feeds
        it verbatim instead (for callers that frame prompts themselves).  ``constraint``
        (``hcmemory.constrained``: ``JsonSchema``, ``Regex``, ``Choice``, ``ToolCalls``...) makes the
        answer one the grammar accepts; an answer the budget ends first raises ``IncompleteOutput``.
        """
        return "".join(self.stream(question, commit=False, max_new_tokens=max_new_tokens,
                                   temperature=temperature, stop=stop, raw=raw, constraint=constraint))

    def chat(self, message: str, max_new_tokens: int = 256, temperature: float = 0.0,
             stop: Sequence[str] | None = None, raw: bool = False, constraint: Constraint | None = None) -> str:
        """Like ``ask``, but the turn and the answer become part of the context."""
        return "".join(self.stream(message, commit=True, max_new_tokens=max_new_tokens,
                                   temperature=temperature, stop=stop, raw=raw, constraint=constraint))

    def stream(self, message: str, commit: bool = False, max_new_tokens: int = 64, temperature: float = 0.0,
               stop: Sequence[str] | None = None, seed: int | None = None, raw: bool = False,
               constraint: Constraint | None = None) -> Generation:
        """Yield the answer's text as it is generated (``commit`` keeps the turn, like ``chat``).

        Arguments are checked now, and ``constraint`` compiled (a schema the grammar engine cannot
        build raises ``ValueError`` here); the context is held from the first piece until the
        generation ends or is closed (a stream stopped early keeps nothing, even with ``commit=True``).
        Under a constraint, stop strings are ignored (the grammar decides where the answer ends) and an
        answer that ends before the grammar is complete raises ``IncompleteOutput`` after its last
        piece, keeping nothing.
        """
        if not isinstance(message, str):
            raise TypeError(f"the question or message must be a string, not {type(message).__name__}")
        if not message.strip():
            raise ValueError("the question or message is empty")
        sampling = Sampling.of(max_new_tokens, temperature, stop, seed)
        compiled = compile_for(self.model, self.tokenizer, constraint)
        return Generation(lambda gen: self._run(gen, "stream", lambda: self.token_ids + self._turn_ids(message, raw),
                                                sampling, commit, keep_turn=raw, compiled=compiled))

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 stop: Sequence[str] | None = None, seed: int | None = None, timeout: float | None = None,
                 commit: bool = True, constraint: Constraint | None = None) -> Generation:
        """Answer a whole prompt (token ids) sent again by a stateless caller — a chat history, a
        document plus a question — reusing the longest prefix this context already holds.

        Only the rest is prefilled; anything the context holds beyond the shared prefix is cropped
        (inside the call's transaction, so a failed call changes nothing).  The answer is the one a
        fresh prefill of the prompt gives: where the state below the shared prefix was shaped by the
        cropped tokens (``HCCache.exact_prefix``), prefilling starts earlier.  With ``commit`` the
        prompt and the answer become the context, so the next turn (history + answer + new
        message) is served from it.  The ``Generation`` reports ``tokens_reused`` and
        ``tokens_prefilled``.  ``constraint`` as in ``stream``.
        """
        sampling = Sampling.of(max_new_tokens, temperature, stop, seed, timeout)
        ids = self._prompt_ids(prompt, sampling.max_new_tokens)
        compiled = compile_for(self.model, self.tokenizer, constraint)
        return Generation(lambda gen: self._run(gen, "generate", lambda: ids, sampling, commit, keep_turn=False,
                                                compiled=compiled))

    def _prompt_ids(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple, torch.Tensor)):
            raise TypeError(f"generate() takes the prompt as token ids (a list of ints), not {type(prompt).__name__}; "
                            "tokenize text with the context's tokenizer first")
        ids, is_text = self._tokenize(prompt)
        if is_text:
            raise TypeError("generate() takes the prompt as token ids, not strings; tokenize text first")
        if not ids:
            raise ValueError("the prompt is empty")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's window of {limit}; shorten it "
                             "or use a bounded preset over appended text")
        self._check_room(len(ids), max_new_tokens)
        return ids

    def _check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse an answer that would cross the model's window: positions past it are not what the model
        learned.  A context already past it (text appended under a bounded preset, warned about then) may
        still answer; it is the crossing that would silently turn a good answer into a degraded one."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and prompt_tokens <= limit < prompt_tokens + max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} after the prompt's {prompt_tokens} tokens runs past the "
                             f"model's window of {limit} tokens; ask for at most {limit - prompt_tokens} new tokens "
                             "or shorten the prompt")

    def _run(self, gen: GenerationInfo, call: str, prompt: Callable[[], list[int]], sampling: Sampling, commit: bool,
             keep_turn: bool, compiled: CompiledConstraint | None) -> Iterator[str]:
        """The one answering path: reuse the shared prefix, prefill the rest, decode (masked by a fresh
        matcher of ``compiled``, if given), commit or roll back."""
        self._guard.acquire(call)
        try:
            self._check_live()
            ids = prompt()
            self._check_room(len(ids), sampling.max_new_tokens)
            # >= 1 token is prefilled for the logits; from where the state stops being what a fresh prefill holds
            common = self.cache.exact_prefix(min(_shared_prefix(self.token_ids, ids), len(ids) - 1))
            gen.context_id, gen.prompt_tokens = self.context_id, len(ids)
            gen.tokens_reused, gen.tokens_prefilled = common, len(ids) - common
            with self.cache.transaction(commit=commit):
                self.cache.crop(common)
                matcher = compiled.matcher() if compiled is not None else None
                logits = self._prefill(ids[common:])
                with self._decoding() as step:
                    pieces = decode(self.model, self.tokenizer, self.cache, logits, sampling, matcher, step)
                    while True:
                        try:
                            piece = next(pieces)
                        except StopIteration as done:
                            generated, gen.finish_reason = done.value
                            break
                        yield piece
                        self._guard.resumed()
            gen.completion_tokens = len(generated)
            if commit:
                del self.token_ids[common:]
                self.token_ids.extend(ids[common:] + generated)
                self.tokens_prefilled = min(self.tokens_prefilled, common) + len(ids) - common
                self.turn_open = self.turn_open and keep_turn
        finally:
            self._guard.release()

    @torch.no_grad()
    def next_logits(self, probe: str | Sequence[int]) -> torch.Tensor:
        """Logits ``(vocab,)`` after the context followed by ``probe``, leaving the context unchanged.

        Two contexts holding the same state give the same logits for any probe, which is how
        checkpoints and forks are checked.
        """
        ids = self._to_ids(probe)
        if not ids:
            raise ValueError("next_logits() needs a non-empty probe")
        with self._guard.hold("next_logits"):
            self._check_live()
            with self.cache.transaction(commit=False):
                return self._prefill(ids)[0].clone()

    def _turn_ids(self, message: str, raw: bool = False) -> list[int]:
        """The question closing the open user turn (or a whole new turn) and the assistant's opening."""
        if raw:
            text = message
        elif self.turn_open:
            text = "\n\n" + message + self.format.close
        else:
            text = self._open_turn() + message + self.format.close
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # --- branching and bookkeeping -----------------------------------------------------------
    def fork(self, context_id: str | None = None) -> "HCContext":
        """A branch sharing this context's stores copy-on-write: cheap to make, independent after."""
        context_id = uuid.uuid4().hex if context_id is None else check_id(context_id)
        with self._guard.hold("fork"):
            self._check_live()
            twin = object.__new__(HCContext)
            twin._setup(self.model, self.tokenizer, self.config, context_id, self.cache.fork(), list(self.token_ids),
                        self.tokens_prefilled, self.turn_open, copy.deepcopy(self.metadata))
            return twin

    def restore(self, source: "HCContext") -> None:
        """Become exactly ``source``, a context loaded from a checkpoint of this conversation: its cache,
        tokens and metadata replace this context's state in one step under both guards, and ``source``
        is closed.  Holders of this object (a pool, by its id) then see the checkpoint's state with
        nothing prefilled: how a LangGraph thread travels back to one of its checkpoints
        (``integrations/langgraph.py``).  ``ValueError`` when ``source`` runs another model, tokenizer
        or configuration; nothing changes then."""
        if not isinstance(source, HCContext):
            raise TypeError(f"restore() takes an HCContext, not {type(source).__name__}")
        if source is self:
            raise ValueError("a context cannot be restored from itself")
        if source.model is not self.model or source.tokenizer is not self.tokenizer or source.config != self.config:
            raise ValueError(f"context {source.context_id!r} runs another model, tokenizer or configuration than "
                             f"context {self.context_id!r}; load it with this context's model and tokenizer")
        with self._guard.hold("restore"):
            if self._closed:
                raise RuntimeError(f"context {self.context_id!r} was {self._closed}")
            with source._guard.hold("restore"):
                source._check_live()
                self.cache, self.token_ids, self.tokens_prefilled = source.cache, source.token_ids, source.tokens_prefilled
                self.turn_open, self.metadata = source.turn_open, source.metadata
                source._closed = f"restored into context {self.context_id!r}"

    def truncate(self, tokens: int) -> None:
        """Forget everything after the first ``tokens`` tokens: the context is then exactly one that was
        given only those tokens.  Where the state below that point was shaped by what came after it
        (evicted rows, attention mass, trimmed 16-bit copies: ``HCCache.exact_prefix``), the tokens
        from there on are prefilled again.  The chat framing restarts: the next text appended or
        asked opens a new user turn."""
        if not is_int(tokens):
            raise TypeError(f"tokens must be an int, not {type(tokens).__name__}")
        with self._guard.hold("truncate"):
            self._check_live()
            if not 0 <= tokens <= len(self.token_ids):
                raise ValueError(f"tokens={tokens} is outside [0, {len(self.token_ids)}] for this context")
            if tokens < len(self.token_ids):
                exact = self.cache.exact_prefix(tokens)
                with self.cache.transaction():
                    self.cache.crop(exact)
                    if exact < tokens:
                        self._prefill(self.token_ids[exact:tokens])
                del self.token_ids[tokens:]
                self.tokens_prefilled = min(self.tokens_prefilled, exact) + tokens - exact
                self.turn_open = False

    def stats(self) -> ContextStats:
        with self._guard.hold("stats"):
            return ContextStats(**vars(self.cache.stats()), tokens_prefilled=self.tokens_prefilled)

    def reset(self) -> None:
        """Forget everything (the model and configuration stay)."""
        with self._guard.hold("reset"):
            if self._closed:
                raise RuntimeError(f"context {self.context_id!r} was {self._closed}")
            self.cache.reset()
            self.token_ids.clear()
            self.tokens_prefilled = 0
            self.turn_open = False

    def close(self) -> None:
        """Release the state; any later call raises."""
        with self._guard.hold("close"):
            self._closed = "closed"
            self.cache.reset()

    # --- persistence -------------------------------------------------------------------------
    def to_state(self) -> ContextState:
        """A copy of everything this context is, taken under the guard (for a checkpoint)."""
        with self._guard.hold("to_state"):
            return self._copy_state()

    def _copy_state(self) -> ContextState:
        self._check_live()
        tensors, layers = self.cache.state()
        model_fp, tokenizer_fp = fingerprints(self.model, self.tokenizer)
        name = getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        return ContextState(self.context_id, self.config, list(self.token_ids), self.tokens_prefilled,
                            self.turn_open, layers, tensors, model_fp, tokenizer_fp, name,
                            json.loads(json.dumps(self.metadata)))

    def spill(self, save: Callable[[ContextState], Any], blocking: bool = True) -> bool:
        """Hand the state to ``save`` and close this context, as one step no other call can
        interleave with (a pool spilling it to its store).  With ``blocking=False`` a context that
        is in use is left alone and False returned; so is one closed already (nothing is left to save)."""
        if not self._guard.acquire("spill", blocking):
            return False
        try:
            if self._closed:
                return False
            save(self._copy_state())
            self._closed = "spilled to its store"
            self.cache.reset()
        finally:
            self._guard.release()
        return True

    @classmethod
    def from_state(cls, state: ContextState, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                   where: str = "checkpoint") -> "HCContext":
        """Rebuild a context around ``state`` without prefilling anything; ``CheckpointError`` when
        the tensors do not fit the configuration or the model."""
        check_model(model)
        check_tokenizer(tokenizer)
        try:
            vocab = model.config.vocab_size
            if any(t >= vocab for t in state.token_ids):
                raise ValueError(f"token ids beyond the model's vocabulary of {vocab}")
            cache = HCCache(model, state.config)
            cache.load_state(state.tensors, state.layers)
        except ValueError as exc:
            raise inconsistent(where, exc) from exc
        ctx = object.__new__(cls)
        ctx._setup(model, tokenizer, state.config, state.context_id, cache, list(state.token_ids),
                   state.tokens_prefilled, state.turn_open, state.metadata)
        return ctx

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this context to one safetensors file, atomically (see ``checkpoint.py``)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, not {type(path).__name__}")
        write_file(self.to_state(), path, uuid.uuid4().hex)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: torch.nn.Module,
             tokenizer: PreTrainedTokenizerBase) -> "HCContext":
        """Rebuild a context written by ``save`` for ``model``, without prefilling anything again.

        Raises ``ValueError`` if the file was made with another model or tokenizer, and
        ``hcmemory.CheckpointError`` if it is damaged, inconsistent or of another format version.
        """
        check_model(model)
        check_tokenizer(tokenizer)
        return cls.from_state(read_file(path, model, tokenizer), model, tokenizer, where=str(path))

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"HCContext(id={self.context_id!r}, tokens={len(self)}, config={self.config.key_codec!r})"
