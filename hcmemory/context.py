"""HCContext: one conversation's live HCAttention state — the object users hold.

Everything appended is prefilled once into the live cache and never again.  Questions are
answered in a temporary overlay (a cache transaction that is rolled back), so asking leaves the
state exactly as it was; ``chat`` commits the turn instead.  Every public call holds the
context's lock, so one context used from several threads serializes its calls, while different
contexts on the same model run independently.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .cache import CacheStats, HCCache
from .chat import ChatFormat
from .config import HCConfig
from .prefill import prefill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextStats(CacheStats):
    """Cache statistics plus the proof that nothing was re-prefilled."""

    tokens_prefilled: int
    """Tokens prefilled into the committed state (documents, chat turns): each exactly once."""


class HCContext:
    """A live, growing KV state over one conversation or document set.

    ``config`` is an ``HCConfig`` or a preset name (default ``full``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: HCConfig | str | None = None, context_id: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = HCConfig.preset(config) if isinstance(config, str) else (config or HCConfig())
        self.context_id = context_id or uuid.uuid4().hex
        self.cache = HCCache(model, self.config, tokenizer)
        self.format = ChatFormat.for_tokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.tokens_prefilled = 0
        self.turn_open = False
        """True while appended documents sit in a user turn that a question will close."""
        self._lock = threading.RLock()

    # --- growing the state -------------------------------------------------------------------
    def append(self, content: str | Sequence[str] | Sequence[int] | torch.Tensor, progress: bool | None = None,
               raw: bool = False) -> int:
        """Prefill only the new tokens into the live state; returns how many were added.

        Text goes into a user turn of the chat format (opened if needed, see ``chat.py``) so the
        next question reads it as its document; token ids and ``raw=True`` text go in verbatim.
        All or nothing: an error or ``KeyboardInterrupt`` midway leaves the context as it was.
        """
        ids, is_text = self._tokenize(content)
        if not ids:
            return 0
        with self._lock:
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
        after_eos = self.tokenizer.decode([last]) if last in self._stop_ids() else None
        return self.format.open_turn(empty=not self.token_ids, after_eos=after_eos)

    def _to_ids(self, content: str | Sequence[str] | Sequence[int] | torch.Tensor) -> list[int]:
        return self._tokenize(content)[0]

    def _tokenize(self, content: str | Sequence[str] | Sequence[int] | torch.Tensor) -> tuple[list[int], bool]:
        """(token ids, whether the content was text)."""
        if isinstance(content, str):
            return self.tokenizer(content, add_special_tokens=False).input_ids, True
        if isinstance(content, torch.Tensor):
            if content.dtype not in (torch.int32, torch.int64) or content.dim() > 2 or (
                    content.dim() == 2 and content.shape[0] != 1):
                raise ValueError("token tensors must be integer ids shaped (n,) or (1, n)")
            content = content.flatten().tolist()
        items = list(content)
        if items and all(isinstance(x, str) for x in items):
            return [t for text in items for t in self.tokenizer(text, add_special_tokens=False).input_ids], True
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            vocab = self.model.config.vocab_size
            bad = [x for x in items if not 0 <= x < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
            return items, False
        raise TypeError("append() takes a string, a list of strings, or a list/tensor of token ids")

    def _prefill(self, ids: list[int], progress: bool | None = None) -> torch.Tensor:
        return prefill(self.model, self.cache, torch.tensor([ids]), self.config.chunk_size, progress)

    # --- answering ---------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0,
            stop: Sequence[str] | None = None, raw: bool = False) -> str:
        """Answer from the whole context without changing it.

        The question is wrapped as a user turn in the tokenizer's chat format; ``raw=True`` feeds
        it verbatim instead (for callers that frame prompts themselves).
        """
        return "".join(self.stream(question, commit=False, max_new_tokens=max_new_tokens,
                                   temperature=temperature, stop=stop, raw=raw))

    def chat(self, message: str, max_new_tokens: int = 256, temperature: float = 0.0,
             stop: Sequence[str] | None = None, raw: bool = False) -> str:
        """Like ``ask``, but the turn and the answer become part of the context."""
        return "".join(self.stream(message, commit=True, max_new_tokens=max_new_tokens,
                                   temperature=temperature, stop=stop, raw=raw))

    def stream(self, message: str, commit: bool = False, max_new_tokens: int = 64, temperature: float = 0.0,
               stop: Sequence[str] | None = None, seed: int | None = None, raw: bool = False) -> Iterator[str]:
        """Yield the answer's text as it is generated (``commit`` keeps the turn, like ``chat``)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        with self._lock, self.cache.transaction(commit=commit):
            prompt = self._turn_ids(message, raw)
            logits = self._prefill(prompt)
            generated = yield from self._generate(logits, max_new_tokens, temperature, list(stop or ()), seed)
            if commit:
                self.token_ids.extend(prompt + generated)
                self.tokens_prefilled += len(prompt)
                self.turn_open = self.turn_open and raw

    @torch.inference_mode()
    def next_logits(self, probe: str | Sequence[int]) -> torch.Tensor:
        """Logits ``(vocab,)`` after the context followed by ``probe``, leaving the context unchanged.

        Two contexts holding the same state give the same logits for any probe, which is how
        checkpoints and forks are checked.
        """
        ids = self._to_ids(probe)
        if not ids:
            raise ValueError("next_logits() needs a non-empty probe")
        with self._lock, self.cache.transaction(commit=False):
            return self._prefill(ids)[0].clone()

    def _turn_ids(self, message: str, raw: bool = False) -> list[int]:
        """The question closing the open user turn (or a whole new turn) and the assistant's opening."""
        if not message.strip():
            raise ValueError("the question or message is empty")
        if raw:
            text = message
        elif self.turn_open:
            text = "\n\n" + message + self.format.close
        else:
            text = self._open_turn() + message + self.format.close
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _stop_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @torch.inference_mode()
    def _generate(self, logits: torch.Tensor, max_new_tokens: int, temperature: float, stop: list[str],
                  seed: int | None) -> Iterator[str]:
        """Decode into the live cache, yielding new text as it forms.

        Returns the ids fed to the cache, ending with the end-of-turn token when the model
        produced one (fed too, so a committed turn is closed the way the chat format expects).
        """
        stop_ids = self._stop_ids()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        device = next(self.model.parameters()).device
        generated: list[int] = []
        emitted = ""
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = int(logits.argmax(-1))
            else:
                probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            generated.append(token)
            logits = self.model(input_ids=torch.tensor([[token]], device=device), past_key_values=self.cache,
                                use_cache=True).logits[:, -1]
            if token in stop_ids:
                break
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if hit >= 0:
                if hit > len(emitted):
                    yield text[len(emitted):hit]
                break
            if len(text) > len(emitted) and not text.endswith("\ufffd"):
                yield text[len(emitted):]
                emitted = text
        return generated

    # --- branching and bookkeeping -----------------------------------------------------------
    def fork(self, context_id: str | None = None) -> "HCContext":
        """A branch sharing this context's stores copy-on-write: cheap to make, independent after."""
        with self._lock:
            return HCContext._restore(self.model, self.tokenizer, self.config, context_id or uuid.uuid4().hex,
                                      self.cache.fork(), list(self.token_ids), self.tokens_prefilled, self.turn_open)

    def stats(self) -> ContextStats:
        with self._lock:
            return ContextStats(**vars(self.cache.stats()), tokens_prefilled=self.tokens_prefilled)

    def reset(self) -> None:
        """Forget everything (the model and configuration stay)."""
        with self._lock:
            self.cache.reset()
            self.token_ids.clear()
            self.tokens_prefilled = 0
            self.turn_open = False

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this context to one safetensors file, atomically (see ``hcmemory.store``)."""
        from .store import save_file  # store builds on this module

        save_file(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: torch.nn.Module,
             tokenizer: PreTrainedTokenizerBase) -> "HCContext":
        """Rebuild a context written by ``save`` for ``model``, without prefilling anything again.

        Raises ``ValueError`` if the file was made with another model or tokenizer, and
        ``hcmemory.store.CheckpointError`` if it is damaged or from a newer hcmemory.
        """
        from .store import load_file

        return load_file(path, model, tokenizer)

    @classmethod
    def _restore(cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: HCConfig,
                 context_id: str, cache: HCCache, token_ids: list[int], tokens_prefilled: int,
                 turn_open: bool) -> "HCContext":
        """A context around an already filled cache (checkpoints): ``__init__`` would start empty.

        Takes every field ``__init__`` sets; a new field must be added here and to the checkpoint.
        """
        ctx = object.__new__(cls)
        ctx.model, ctx.tokenizer, ctx.config, ctx.context_id = model, tokenizer, config, context_id
        ctx.cache, ctx.format = cache, ChatFormat.for_tokenizer(tokenizer)
        ctx.token_ids, ctx.tokens_prefilled, ctx.turn_open = token_ids, tokens_prefilled, turn_open
        ctx._lock = threading.RLock()
        return ctx

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"HCContext(id={self.context_id!r}, tokens={len(self)}, config={self.config.key_codec!r})"
