"""The decode loop: sample a token, feed it to the live cache, yield the text that formed.

Text is yielded as soon as it is stable (no half-decoded UTF-8 character at its end, no end that
could be the start of a stop string) and cut at the first stop string, which may span several tokens.  The ids fed to the cache are the
generator's return value, so a caller that commits the turn knows exactly what the state holds.

With a ``matcher`` (``constrained.py``) the grammar masks every token that cannot continue a valid
answer before each sampling step, so greedy and sampled answers alike parse.  Stop strings are then
ignored: the grammar decides where the answer ends, and a stop string met inside a JSON string or a
tool's argument would otherwise cut a valid answer into an invalid one.  An answer the budget (or the
timeout) ends before the grammar is complete raises ``IncompleteOutput`` instead of returning text
that does not parse.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from .config import is_int
from .constrained import CompiledConstraint, Constraint, Matcher, compile_constraint
from .glue import cache_kwarg


@dataclass(frozen=True)
class Sampling:
    """How to pick the next tokens; validated where a user passes it."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout: float | None = None
    """Seconds of decoding after which the answer ends where it is (``finish_reason="timeout"``)."""

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int, not {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise TypeError(f"temperature must be a number, not {type(self.temperature).__name__}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"seed must be an int or None, not {type(self.seed).__name__}")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not self.timeout > 0):
            raise ValueError(f"timeout={self.timeout!r} must be None or a number of seconds > 0")

    @classmethod
    def of(cls, max_new_tokens: int, temperature: float, stop: Sequence[str] | None, seed: int | None = None,
           timeout: float | None = None) -> "Sampling":
        return cls(max_new_tokens, temperature, stop_strings(stop), seed, timeout)


@dataclass
class GenerationInfo:
    """What producing one answer cost; filled in as it runs."""

    context_id: str = ""
    prompt_tokens: int = 0
    tokens_reused: int = 0
    """Prompt tokens served from the live state."""
    tokens_prefilled: int = 0
    """Prompt tokens computed for this call."""
    completion_tokens: int = 0
    finish_reason: str | None = None
    """``stop``, ``length`` or ``timeout``."""
    seconds: float = 0.0
    finalizers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def finish(self) -> None:
        """Run the finalizers, once, however the generation ended (or if it never started)."""
        finalizers, self.finalizers = self.finalizers, []
        for finalizer in finalizers:
            finalizer()


def _timed(run: Callable[[GenerationInfo], Iterator[str]], info: GenerationInfo) -> Iterator[str]:
    started = time.perf_counter()
    try:
        yield from run(info)
    finally:
        info.seconds = time.perf_counter() - started
        info.finish()


class Generation:
    """One answer as it is produced: iterate for its text pieces; ``info`` says what it cost.

    ``tokens_reused`` and ``tokens_prefilled`` are known once the first piece arrives,
    ``completion_tokens`` and ``finish_reason`` once it is finished.  Closing it early (or dropping
    it) ends the call and releases the context at once: nothing in here refers back to this object,
    so dropping it frees it immediately, without waiting for the garbage collector.
    """

    def __init__(self, run: Callable[[GenerationInfo], Iterator[str]]) -> None:
        self.info = GenerationInfo()
        self._pieces = _timed(run, self.info)
        weakref.finalize(self, self.info.finish)  # a generation dropped before its first piece

    def on_close(self, finalizer: Callable[[], None]) -> None:
        """Run ``finalizer`` once the generation has finished or was closed."""
        self.info.finalizers.append(finalizer)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self.info.finish()

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        return "".join(self)


def stop_strings(stop: Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings; a bare string is refused rather than split into characters."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        raise TypeError(f"stop must be a list of strings, e.g. stop=[{stop!r}], not a plain string")
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a list of strings, not {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop contains an empty string, which would stop before the first token; remove it")
    return tuple(stop)


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def compile_for(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                constraint: Constraint | None) -> CompiledConstraint | None:
    """``constraint`` built for this model's tokenizer and end-of-turn tokens (cached), or None.

    Called where a user passes the constraint, so a schema the engine cannot build is refused with a
    ``ValueError`` before any state is touched or any token generated."""
    if constraint is None:
        return None
    return compile_constraint(tokenizer, constraint, stop_token_ids(model, tokenizer))


@torch.no_grad()
def decode(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cache: Cache, logits: torch.Tensor,
           sampling: Sampling, matcher: Matcher | None = None, step: Callable[[int], torch.Tensor] | None = None
           ) -> Iterator[str]:
    """Decode into ``cache`` from ``logits`` (the last prompt position's), yielding new text.

    ``step`` feeds a token to ``cache`` and returns the next logits ``(1, vocab)``: by default a plain
    forward on this thread; ``HCContext`` passes a batched one (``batching.py``), alone or shared with
    other contexts' steps.

    Returns ``(ids, finish_reason)``: the ids fed to the cache, ending with the end-of-turn token
    when the model produced one (fed too, so a committed turn is closed the way the chat format
    expects), and why it ended (``stop``, ``length`` or ``timeout``).  ``matcher`` (a fresh one
    from ``compile_for(...).matcher()``) masks each step; see the module docstring.
    """
    deadline = None if sampling.timeout is None else time.perf_counter() + sampling.timeout
    stop_ids = stop_token_ids(model, tokenizer)
    stop = () if matcher is not None else sampling.stop
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    step = step or model_step(model, cache)
    generated: list[int] = []
    text = emitted = ""
    reason = "length"
    for _ in range(sampling.max_new_tokens):
        if matcher is not None:
            matcher.mask(logits)
        if sampling.temperature == 0:
            token = int(logits.argmax(-1))
        else:
            probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if matcher is not None:
            matcher.advance(token)
        generated.append(token)
        logits = step(token)
        if token in stop_ids:
            reason = "stop"
            break
        text = tokenizer.decode(generated, skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            if hit > len(emitted):
                yield text[len(emitted):hit]
            return generated, "stop"
        stable = len(text) - held_back(text, stop)
        if stable > len(emitted) and not text[:stable].endswith("\ufffd"):
            yield text[len(emitted):stable]
            emitted = text[:stable]
        if deadline is not None and time.perf_counter() > deadline:
            reason = "timeout"
            break
    if matcher is not None and not matcher.is_accepting():
        raise matcher.incomplete(text, reason)  # before the rest is shown: nothing past here is an answer
    rest = text[len(emitted):].removesuffix("\ufffd")  # no stop string completed: what was held back is answer
    if rest:
        yield rest
    return generated, reason


def model_step(model: torch.nn.Module, cache: Cache) -> Callable[[int], torch.Tensor]:
    """One token through ``model`` into any transformers cache, on the calling thread."""
    device = next(model.parameters()).device

    def step(token: int) -> torch.Tensor:
        return model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                     **cache_kwarg(model, cache)).logits[:, -1]
    return step


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop string.

    They are not shown until the next tokens decide: completed, the stop string and everything after
    it is cut; not, they are ordinary answer text."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
