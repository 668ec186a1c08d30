"""The methods an evaluation compares, on the same token ids and the same greedy decoding.

* ``full`` — transformers' ``DynamicCache``: the accuracy reference.
* any hcmemory preset, or ``preset:field=value,...`` for any ``HCConfig`` (the context is prefilled
  once in chunks; each question runs in a rolled-back overlay of the live state).
* ``quanto-4`` / ``quanto-2`` — transformers' ``QuantizedCache`` with the optimum-quanto backend
  (the one that installs on this CPU machine; HQQ needs a CUDA build of its kernels), groups of 64;
  ``quanto-4:q_group_size=32`` for smaller groups (more bytes: a peer's point above ours on the
  total-bytes axis).
* ``kvpress:<Press>@<ratio>`` — a kvpress press keeping ``ratio`` of a full fp16 cache's bytes next to
  the model (SnapKV, StreamingLLM, Knorm, ExpectedAttention, TOVA, ObservedAttention).

Every transformers-cache method of a haystack shares one recorded prefill: kvpress presses compress
each layer's keys and values after that layer's attention ran over the whole, uncompressed
context, so the prefill itself is the same for all of them; the recording keeps each layer's inputs
and replays ``press.compress`` on them (a test checks the result equals kvpress's own pipeline).
The recording also gives ``full`` and the quantized caches their prefill.

On a model with sliding-window layers (Gemma 3) the presses compress the global layers only, as
kvpress does for Gemma 3: a sliding layer already holds a bounded window.  The recorded caches keep
every row of a sliding layer (the model's mask limits what it sees), so they can be cut back after a
question; memory counts the window's rows there, what a sliding cache holds.

Memory is measured from the stored tensors after the prefill: bytes next to the model and bytes in
total (model side + host), as ratios of a full fp16 cache of the same tokens (a sliding layer's
full cache: its window).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..cache import HCCache
from ..config import HCConfig
from ..decoding import Sampling, decode, stop_token_ids
from ..glue import cache_kwarg
from ..models.kinds import SLIDING, layer_kinds
from ..prefill import prefill

log = logging.getLogger(__name__)

PRESSES = ("SnapKV", "StreamingLLM", "Knorm", "ExpectedAttention", "TOVA", "ObservedAttention")


@dataclass
class Memory:
    """What a method's state holds for the context, measured from its tensors."""

    device_bytes: int
    total_bytes: int
    full_fp16_bytes: int
    selected_fraction: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"device_bytes": self.device_bytes, "total_bytes": self.total_bytes,
                "full_fp16_bytes": self.full_fp16_bytes, "device_ratio": self.device_bytes / self.full_fp16_bytes,
                "total_ratio": self.total_bytes / self.full_fp16_bytes, "selected_fraction": self.selected_fraction}


FIRST_TOP = 20
"""How many of the first answer token's most likely tokens each answer keeps, to compare distributions."""


@dataclass
class Answer:
    text: str
    first: dict[int, float]
    """Log-probabilities of the ``FIRST_TOP`` most likely first answer tokens: how far a method moves the
    model's prediction from full attention's is measured on these (a signal far less noisy than pass/fail)."""
    ids: list[int]
    """The generated token ids."""
    forced: float | None = None
    """Log-probability of ``forced_ids`` under this method, fed one token at a time as decoding would: how
    well the method keeps full attention's whole answer likely."""
    forced_ids: list[int] | None = None
    """What ``forced`` scored: the reference's (full attention's) answer ids, or this method's own answer
    when it ran without a reference (full attention itself).  Stored, so a report can tell which."""


@dataclass(frozen=True)
class Question:
    ids: list[int]
    max_new_tokens: int
    reference: list[int] | None = None
    """Full attention's answer ids, to score with ``Answer.forced``."""


def _first(logits: torch.Tensor) -> dict[int, float]:
    logprobs = torch.log_softmax(logits.float().flatten(), dim=-1)
    values, ids = logprobs.topk(FIRST_TOP)
    return {int(i): float(v) for i, v in zip(ids, values)}


@dataclass
class Recording:
    """One plain prefill of a context: every layer's keys, values and attention inputs."""

    context_length: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    position_embeddings: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Each layer's own (cos, sin): Gemma 3's sliding and global layers rotate with different bases."""


def full_fp16_bytes(model: torch.nn.Module, tokens: int) -> int:
    """A full fp16 cache of ``tokens``: every row in a global layer, the window's in a sliding one."""
    mc = model.config
    dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    rows = sum(_kept_rows(model, kind, tokens) for kind in layer_kinds(mc))
    return rows * 2 * mc.num_key_value_heads * dim * 2


def _kept_rows(model: torch.nn.Module, kind: str, rows: int) -> int:
    # a query at position p sees keys at positions > p - window: a sliding layer keeps window - 1 rows
    return min(rows, model.config.sliding_window - 1) if kind == SLIDING else rows


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a tensor, including tensor subclasses that wrap several (quanto's packed tensors)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def cache_bytes(model: torch.nn.Module, cache: Any) -> int:
    """Bytes a transformers cache holds; a sliding layer counts only its window's share of its rows."""
    total = 0
    for i, (layer, kind) in enumerate(zip(cache.layers, layer_kinds(model.config))):
        nbytes = sum(tensor_bytes(t) for t in vars(layer).values())
        rows = cache.get_seq_length(i)
        total += nbytes * _kept_rows(model, kind, rows) // rows if rows else nbytes
    return total


class _RecordingCache(DynamicCache):
    """The model's own cache, which also keeps every key and value row it is given.

    The prefill attends as the model does (a sliding layer over its window only: at 32K, Gemma 3's 15
    sliding layers would otherwise each attend over every row), while the recording holds every layer's
    whole context, a sliding layer's too, for the methods built from it."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.given_keys: defaultdict[int, list[torch.Tensor]] = defaultdict(list)
        self.given_values: defaultdict[int, list[torch.Tensor]] = defaultdict(list)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.given_keys[layer_idx].append(key_states)
        self.given_values[layer_idx].append(value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


RECORD_CHUNK = 2048
"""Tokens per forward of the recorded prefill: one pass over 32K tokens would hold a 32K x 32K causal mask
and each global layer's 32K x 32K attention scores; chunks keep that to 2K x 32K."""


@torch.no_grad()
def record(model: torch.nn.Module, context_ids: list[int]) -> Recording:
    """Prefill ``context_ids`` in chunks, keeping every layer's keys and values and what every press needs."""
    rec = Recording(len(context_ids))
    layers = model.model.layers
    hidden: list[list[torch.Tensor]] = [[] for _ in layers]
    embeddings: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]

    def keep(index: int):
        def hook(module, args, kwargs, output):
            hidden[index].append(kwargs["hidden_states"])
            embeddings[index].append(kwargs["position_embeddings"])
        return hook

    handles = [layer.self_attn.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        cache = _RecordingCache(model.config)
        ids = torch.tensor([context_ids], device=next(model.parameters()).device)
        for start in range(0, ids.shape[1], RECORD_CHUNK):
            model.model(input_ids=ids[:, start:start + RECORD_CHUNK], use_cache=True, **cache_kwarg(model, cache))
    finally:
        for handle in handles:
            handle.remove()
    rec.keys = [torch.cat(cache.given_keys[i], dim=-2) for i in range(len(layers))]
    rec.values = [torch.cat(cache.given_values[i], dim=-2) for i in range(len(layers))]
    rec.hidden = [torch.cat(parts, dim=1) for parts in hidden]
    rec.position_embeddings = [(torch.cat([c for c, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1))
                               for parts in embeddings]
    return rec


class Method:
    """One way of holding the context; ``answer`` returns the answers and the memory it held."""

    name: str
    spec: str
    uses_recording = False

    @property
    def identity(self) -> str:
        """What a cached result was computed with: a cell is reused only under the same identity, so a
        preset whose definition changed is run again rather than reported from its old numbers."""
        return self.spec

    def answer(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, context_ids: list[int],
               questions: list[Question], recording: Recording | None = None) -> tuple[list[Answer], Memory]:
        raise NotImplementedError


class HCMethod(Method):
    def __init__(self, name: str, config: HCConfig, spec: str) -> None:
        self.name, self.config, self.spec = name, config, spec

    @property
    def identity(self) -> str:
        return json.dumps(self.config.to_dict(), sort_keys=True, default=str)

    def answer(self, model, tokenizer, context_ids, questions, recording=None):
        cache = HCCache.for_model(model, self.config, tokenizer)
        prefill(model, cache, torch.tensor([context_ids]), self.config.chunk_size)
        stats = cache.stats()
        answers, fractions = [], []
        for q in questions:
            with cache.transaction(commit=False):
                logits = prefill(model, cache, torch.tensor([q.ids]), self.config.chunk_size)
                pieces = decode(model, tokenizer, cache, logits, Sampling(q.max_new_tokens))
                text = ""
                while True:
                    try:
                        text += next(pieces)
                    except StopIteration as done:
                        generated = done.value[0]
                        break
                if cache.stats().selected_fraction is not None:
                    fractions.append(cache.stats().selected_fraction)
            reference = q.reference if q.reference is not None else generated
            with cache.transaction(commit=False):
                forced = _forced(model, cache, prefill(model, cache, torch.tensor([q.ids]), self.config.chunk_size),
                                 reference, None)
            answers.append(Answer(text, _first(logits), generated, forced, reference))
        memory = Memory(stats.device_bytes, stats.device_bytes + stats.host_bytes, stats.full_fp16_bytes,
                        sum(fractions) / len(fractions) if fractions else None)
        return answers, memory


@torch.no_grad()
def _forced(model: torch.nn.Module, cache: Any, logits: torch.Tensor, reference: list[int], position: int | None
            ) -> float:
    """Log-probability of ``reference`` continuing from ``logits``, its tokens fed one at a time
    (``position``: where the first one sits, for caches whose kept length is not the position)."""
    device = next(model.parameters()).device
    total = 0.0
    for step, token in enumerate(reference):
        total += float(torch.log_softmax(logits.float().flatten(), dim=-1)[token])
        if step == len(reference) - 1:
            break
        extra = {} if position is None else {"position_ids": torch.tensor([[position + step]], device=device)}
        logits = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **extra,
                       **cache_kwarg(model, cache)).logits[0, -1]
    return total


@torch.no_grad()
def _greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cache: Any, ids: list[int], position: int,
            max_new: int) -> tuple[torch.Tensor, list[int], str]:
    """Greedy decoding on a transformers cache whose kept length may differ from the positions
    (compressed caches): positions are passed explicitly, as kvpress's pipeline does.  Returns the
    first answer token's logits, the generated ids and their text."""
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    logits = _prompt(model, cache, ids, position)
    first_logits = logits
    generated: list[int] = []
    position += len(ids)
    for step in range(max_new):
        token = int(logits.argmax())
        generated.append(token)
        if token in stops or step == max_new - 1:
            break
        logits = model(input_ids=torch.tensor([[token]], device=device),
                       position_ids=torch.tensor([[position + step]], device=device), use_cache=True,
                       **cache_kwarg(model, cache)).logits[0, -1]
    return first_logits, generated, tokenizer.decode(generated, skip_special_tokens=True)


@torch.no_grad()
def _prompt(model: torch.nn.Module, cache: Any, ids: list[int], position: int) -> torch.Tensor:
    """The last logits of ``ids`` fed at ``position`` on a recorded cache.  In one pass when every layer
    holds as many rows; otherwise one token at a time: the model builds one causal mask from layer 0's
    length, and a layer kept shorter (a press on Gemma 3's global layers only) would have that mask cut
    to its own length, letting a prompt's tokens see the ones after them.  A single query sees every
    kept row, so token by token is exact."""
    device = next(model.parameters()).device
    lengths = {cache.get_seq_length(i) for i in range(len(cache.layers))}
    steps = [ids] if len(lengths) == 1 else [[token] for token in ids]
    for offset, piece in zip(range(0, len(ids), len(steps[0])), steps):
        at = position + offset
        logits = model(input_ids=torch.tensor([piece], device=device), use_cache=True, logits_to_keep=1,
                       position_ids=torch.arange(at, at + len(piece), device=device)[None],
                       **cache_kwarg(model, cache)).logits[0, -1]
    return logits


class RecordedMethod(Method):
    """A transformers cache built from the shared recording; after each question the cache is cut
    back to what the context left in it (a quantized cache, whose packed tensors cannot be cut or
    copied, is built again instead)."""

    uses_recording = True
    rebuild_per_question = False

    def build(self, model: torch.nn.Module, rec: Recording) -> Any:
        raise NotImplementedError

    def answer(self, model, tokenizer, context_ids, questions, recording=None):
        cache = self.build(model, recording)
        nbytes = cache_bytes(model, cache)
        memory = Memory(nbytes, nbytes, full_fp16_bytes(model, len(context_ids)))
        kept = None if self.rebuild_per_question else [layer.keys.shape[-2] for layer in cache.layers]
        answers = []
        position = recording.context_length
        for i, q in enumerate(questions):
            logits, generated, text = _greedy(model, tokenizer, cache, q.ids, position, q.max_new_tokens)
            cache = self._reset(model, recording, cache, kept)
            start = _prompt(model, cache, q.ids, position)
            reference = q.reference if q.reference is not None else generated
            forced = _forced(model, cache, start, reference, position + len(q.ids))
            cache = self._reset(model, recording, cache, kept)
            answers.append(Answer(text, _first(logits), generated, forced, reference))
        return answers, memory

    def _reset(self, model: torch.nn.Module, recording: Recording, cache: Any, kept: list[int] | None) -> Any:
        """The cache as the context left it (cut back, or built again when it cannot be cut)."""
        if self.rebuild_per_question:
            return self.build(model, recording)
        for layer, n in zip(cache.layers, kept):
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
        return cache


class FullMethod(RecordedMethod):
    name = spec = "full"

    def build(self, model, rec):
        cache = DynamicCache()  # all rows of every layer, as recorded (see ``record``)
        for i, (k, v) in enumerate(zip(rec.keys, rec.values)):
            cache.update(k, v, i)
        return cache


class QuantoMethod(RecordedMethod):
    rebuild_per_question = True
    GROUP_SIZE = 64
    """transformers' default ``q_group_size``."""

    def __init__(self, bits: int, group_size: int = GROUP_SIZE) -> None:
        self.bits, self.group_size = bits, group_size
        self.name = f"quanto-{bits}" + ("" if group_size == self.GROUP_SIZE else f":q_group_size={group_size}")
        self.spec = self.name

    def build(self, model, rec):
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=model.config, nbits=self.bits, q_group_size=self.group_size)
        for i, (k, v) in enumerate(zip(rec.keys, rec.values)):
            cache.update(k, v, i)
        return cache


class PressMethod(RecordedMethod):
    """A kvpress press keeping ``bytes_ratio`` of a full fp16 cache's bytes (so, on a float32 model,
    half that share of the tokens)."""

    def __init__(self, press: str, bytes_ratio: float) -> None:
        self.press, self.bytes_ratio = press, bytes_ratio
        self.name = self.spec = f"kvpress:{press}@{bytes_ratio:g}"

    def build(self, model, rec):
        import kvpress

        keep = self.bytes_ratio * 2 / rec.keys[0].element_size()
        press = getattr(kvpress, f"{self.press}Press")(compression_ratio=1 - keep)
        cache = DynamicCache()  # every row of a sliding layer, as recorded (see ``record``)
        with press(model):  # sets up what compress needs (e.g. rotary embeddings); no forward runs
            for i, (layer, kind) in enumerate(zip(model.model.layers, layer_kinds(model.config))):
                if kind == SLIDING:
                    cache.update(rec.keys[i], rec.values[i], i)
                    continue
                attentions = _attentions(layer.self_attn, rec, i) if self.press == "ObservedAttention" else None
                with _layer_rotary(model, layer.self_attn):
                    k, v = press.compress(layer.self_attn, rec.hidden[i], rec.keys[i], rec.values[i], attentions,
                                          {"position_embeddings": rec.position_embeddings[i]})
                cache.update(k.contiguous(), v.contiguous(), i)
        return cache


class _TypedRotary(torch.nn.Module):
    """``rotary(x, positions)`` for one kind of layer (a Module: kvpress registered ``rotary_emb`` as one)."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str) -> None:
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, layer_type=self.layer_type)


@contextmanager
def _layer_rotary(model: torch.nn.Module, attention: torch.nn.Module) -> Iterator[None]:
    """Give a press the rotary embedding of this layer's own kind while it compresses the layer.

    kvpress hands every layer the model's ``rotary_emb`` and calls it as ``rotary_emb(x, positions)``
    (ExpectedAttention rotates its expected query that way); Gemma 3's takes the layer's type as well
    (its global and sliding layers rotate with different bases) and fails without it."""
    rotary = model.model.rotary_emb
    layer_type = getattr(attention, "layer_type", None)
    if layer_type is None or "layer_type" not in inspect.signature(rotary.forward).parameters:
        yield
        return
    attention.rotary_emb = _TypedRotary(rotary, layer_type)
    try:
        yield
    finally:
        attention.rotary_emb = rotary


def _attentions(module: torch.nn.Module, rec: Recording, index: int) -> torch.Tensor:
    """The causal attention weights of a layer's prefill (what eager attention would output)."""
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    queries = get_prerope_query_states(module, rec.hidden[index])
    queries, _ = apply_rotary_pos_emb(queries, queries, *rec.position_embeddings[index])
    keys = repeat_kv(rec.keys[index], queries.shape[1] // rec.keys[index].shape[1])
    scores = queries @ keys.transpose(-1, -2) * module.scaling
    n = scores.shape[-1]
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    return scores.softmax(-1)


def parse_method(spec: str) -> Method:
    """``full``, ``quanto-4[:q_group_size=N]``, ``kvpress:SnapKV@0.125``, a preset name, or
    ``preset:field=value,...``."""
    if spec == "full":
        return FullMethod()
    quanto = re.fullmatch(r"quanto-([24])(?::q_group_size=([1-9][0-9]*))?", spec)
    if quanto:
        return QuantoMethod(int(quanto[1]), int(quanto[2] or QuantoMethod.GROUP_SIZE))
    if spec.startswith("quanto"):
        raise ValueError(f"unknown quantized cache {spec!r}: quanto-4 or quanto-2, optionally with "
                         f":q_group_size=N (N dividing the head dimension)")
    if spec.startswith("kvpress:"):
        press, _, ratio = spec[len("kvpress:"):].partition("@")
        if press not in PRESSES:
            raise ValueError(f"unknown kvpress press {press!r}; known: {', '.join(PRESSES)}")
        return PressMethod(press, float(ratio or 0.125))
    return HCMethod(spec, HCConfig.from_spec(spec), spec)


def available(method: Method) -> str | None:
    """Why a method cannot run in this environment, or None."""
    try:
        if isinstance(method, PressMethod):
            import kvpress  # noqa: F401
        if isinstance(method, QuantoMethod):
            import optimum.quanto  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (the bench extra, in the transformers 5.2 environment: make bench)"
    return None
