"""The checkpoint format: one context's state as a JSON header plus named tensors.

``ContextState`` is what ``HCContext.to_state()`` hands over (copies taken under the context's
lock) and what ``HCContext.from_state()`` rebuilds from.  This module turns it into a header and
back, and owns every check that can be made without building a cache: the format version, the
model and tokenizer fingerprints (checked before any tensor is read), the header's types, and its
consistency (token ids vs tokens seen in every layer, prefilled counts).  The cache then checks
the tensors against the configuration (``HCLayer.load_state``); a checkpoint that loads is
consistent, not just intact.  Both layouts use it: ``stores.ContextStore`` (many contexts in a database)
and the one-file layout below (safetensors with the header in its metadata).

No pickle anywhere: tensors are safetensors (or raw bytes described by the header), everything else JSON.

Headers are read from bytes anyone may have written, so ``parse_header`` bounds them before parsing:
at most ``MAX_HEADER_BYTES`` and ``MAX_HEADER_DEPTH`` levels of nesting (Python's JSON parser recurses,
and a document nested thousands deep would end in a ``RecursionError``, or worse with a raised
recursion limit).  ``encode_header`` applies the same bounds when writing, so nothing is ever saved
that could not be read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from transformers import PreTrainedTokenizerBase

from .config import HCConfig, is_int, with_added_fields
from .files import atomic_path
from .models import GLOBAL, check_layer_kinds, layer_kinds, model_fingerprint, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 7
"""Bumped whenever the stored layout changes.  A reader refuses newer versions, and older ones
unless ``config.ADDED_FIELDS`` says exactly what they lack — never today's defaults by accident.
2: complete configs, per-layer ``calibrated``, ``exact_keys`` (was ``host_keys``), the user's
``metadata``.  3: ``HCConfig.rescore_residual``.  4: ``HCConfig.quant_group_size``.
5: ``HCConfig.residual_symmetric`` and ``quant_rotation`` (fitted rotating key codecs store their signs).
6: ``HCConfig.full_precision_window`` (its copies are stored as ``window.*`` layer tensors).
7: each layer's ``kind`` (``global`` or ``sliding``, ``models/kinds.py``); older checkpoints were made
with every layer global."""
OLDEST_READABLE = 2
MAX_HEADER_BYTES = 64 * 2**20
"""Largest header read or written: room for about eight million token ids, while a damaged or hostile
header cannot make a reader parse gigabytes of JSON."""
MAX_HEADER_DEPTH = 64
"""Deepest nesting of lists and objects in a header.  hcmemory's own fields nest five deep; the rest
is for the user's ``metadata``."""
_FILE_METADATA_KEY = "hcmemory"
_LAYER_KEYS = {"seen", "selected_rows", "selectable_rows", "calibrated", "kind"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as stored: damaged, inconsistent, or from another format version."""


@dataclass
class ContextState:
    """Everything a context is, detached from live buffers."""

    context_id: str
    config: HCConfig
    token_ids: list[int]
    tokens_prefilled: int
    turn_open: bool
    layers: list[dict[str, Any]]
    """Per-layer counters from ``HCLayer.state``."""
    tensors: dict[str, torch.Tensor] = field(repr=False)
    model_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The user's own JSON-serializable notes about the context (``HCContext.metadata``)."""

    def header(self, tag: str, checkpoint_id: str) -> dict[str, Any]:
        """The JSON header, without the tensor manifest (each layout adds its own)."""
        return {
            "format_version": FORMAT_VERSION,
            "checkpoint_id": checkpoint_id,
            "context_id": self.context_id,
            "tag": tag,
            "created": datetime.now(timezone.utc).isoformat(),
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "config": self.config.to_dict(),
            "token_ids": list(self.token_ids),
            "tokens_prefilled": self.tokens_prefilled,
            "turn_open": self.turn_open,
            "metadata": self.metadata,
            "layers": [dict(meta) for meta in self.layers],
        }

    @classmethod
    def from_header(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> "ContextState":
        """Rebuild from a header already accepted by ``check_compatible``; raises ``CheckpointError``
        when its fields have the wrong types or contradict each other."""
        try:
            config = HCConfig.from_dict(upgraded_config(header), complete=True)
            token_ids, layers = header["token_ids"], upgraded_layers(header)
            _require(isinstance(header["context_id"], str) and header["context_id"], "context_id is not a string")
            _require(isinstance(token_ids, list) and all(is_int(t) and t >= 0 for t in token_ids),
                     "token_ids is not a list of non-negative ints")
            _require(isinstance(layers, list) and layers and all(
                isinstance(m, dict) and set(m) == _LAYER_KEYS for m in layers), "per-layer counters are malformed")
            seen = {m["seen"] for m in layers}
            _require(seen == {len(token_ids)}, f"layers have seen {sorted(map(str, seen))} tokens but "
                                               f"{len(token_ids)} token ids are stored")
            prefilled = header["tokens_prefilled"]
            _require(is_int(prefilled) and 0 <= prefilled <= len(token_ids),
                     f"tokens_prefilled={prefilled!r} does not fit {len(token_ids)} tokens")
            _require(isinstance(header["turn_open"], bool), "turn_open is not a bool")
            _require(isinstance(header["metadata"], dict), "metadata is not a JSON object")
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(where, f"the checkpoint header is inconsistent ({exc})") from exc
        return cls(header["context_id"], config, token_ids, prefilled, header["turn_open"], layers, tensors,
                   header["model_fingerprint"], header["tokenizer_fingerprint"], header.get("model_name", ""),
                   header["metadata"])


def upgraded_layers(header: dict[str, Any]) -> list[Any]:
    """The stored per-layer counters; before format 7 every layer was built as a global one."""
    layers = header["layers"]
    if header["format_version"] >= 7 or not isinstance(layers, list):
        return layers
    return [{**meta, "kind": GLOBAL} if isinstance(meta, dict) else meta for meta in layers]


def upgraded_config(header: dict[str, Any]) -> dict[str, Any]:
    """The stored config; an older format's is completed with the fields added since, at the values it ran with."""
    config = header["config"]
    return with_added_fields(config) if header["format_version"] < FORMAT_VERSION else config


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def fingerprints(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    return model_fingerprint(model), tokenizer_fingerprint(tokenizer)


def check_version(header: Any, where: str) -> None:
    """Refuse a header without a format version, or of one this hcmemory does not read."""
    if not isinstance(header, dict) or not is_int(header.get("format_version")):
        raise damaged(where, "the checkpoint header is damaged (no format_version)")
    version = header["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {version} is newer than this hcmemory "
                              f"supports ({FORMAT_VERSION}); upgrade hcmemory to load it")
    if version < OLDEST_READABLE:
        raise CheckpointError(f"{where}: checkpoint format version {version} is older than this hcmemory reads "
                              f"({OLDEST_READABLE} to {FORMAT_VERSION}); load it with the hcmemory release that "
                              "wrote it and rebuild the context, or re-append its text")


def check_compatible(header: Any, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a checkpoint of another format version, made with another model or tokenizer, or whose
    layers are of other kinds (global / sliding) than the model's.

    Runs before any tensor is read, so a wrong model costs one header read, not a full load.
    """
    check_version(header, where)
    model_fp, tokenizer_fp = fingerprints(model, tokenizer)
    if header.get("model_fingerprint") != model_fp:
        raise ValueError(f"{where}: checkpoint was made with model {header.get('model_name')!r} "
                         f"(fingerprint {str(header.get('model_fingerprint'))[:12]}…), not the model given "
                         f"(fingerprint {model_fp[:12]}…); load it with that model")
    if header.get("tokenizer_fingerprint") != tokenizer_fp:
        raise ValueError(f"{where}: checkpoint was made with a different tokenizer than the one given "
                         f"(fingerprint {str(header.get('tokenizer_fingerprint'))[:12]}… vs {tokenizer_fp[:12]}…); "
                         "load it with the tokenizer of the model it was made with")
    layers = header.get("layers")
    if isinstance(layers, list) and all(isinstance(meta, dict) for meta in layers):
        try:
            check_layer_kinds([meta.get("kind") for meta in upgraded_layers(header)], layer_kinds(model.config))
        except ValueError as exc:
            older = header["format_version"] < 7
            raise ValueError(f"{where}: {exc}" + ("; this older checkpoint built every layer as a global one, so "
                                                  "re-append the context's text instead" if older else "")) from exc


def damaged(where: str, problem: str, otherwise: str = "save the context again") -> CheckpointError:
    """The error for stored data that cannot be used as it is, with the ways out of it."""
    return CheckpointError(f"{where}: {problem}; restore it from a backup or {otherwise}")


def inconsistent(where: str, exc: Exception) -> CheckpointError:
    """The error for tensors that do not fit their header or the configuration."""
    return damaged(where, f"the checkpoint does not fit its own header ({exc})")


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = np.zeros(256, dtype=np.int64)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def _nesting(text: str) -> int:
    """How deeply lists and objects nest in the JSON ``text``, found without recursing.

    Brackets inside strings do not count.  On text that is not JSON the count may be off, but only
    past the first syntax error, where the parser stops anyway.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    return int(np.cumsum(_BRACKET_STEP[np.frombuffer(brackets, dtype=np.uint8)]).max())


def _bounds_problem(size: int, text: str) -> str | None:
    """Why a header of ``size`` bytes is outside the bounds, or None."""
    if size > MAX_HEADER_BYTES:
        return f"the header is larger than {MAX_HEADER_BYTES} bytes"
    if _nesting(text) > MAX_HEADER_DEPTH:
        return f"the header is nested more than {MAX_HEADER_DEPTH} levels deep"
    return None


def encode_header(header: dict[str, Any]) -> bytes:
    """``header`` as UTF-8 JSON; ``ValueError`` when it could not be read back (too large, nested too
    deeply, or holding values JSON cannot express — the user's ``metadata`` usually)."""
    try:
        text = json.dumps(header)  # ASCII: as many bytes as characters
        problem = _bounds_problem(len(text), text)
    except RecursionError:
        problem = f"the header is nested more than {MAX_HEADER_DEPTH} levels deep"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the checkpoint header cannot be written as JSON ({exc}); keep the context's metadata "
                         "to JSON values (dict, list, str, int, float, bool, None)") from exc
    if problem:
        raise ValueError(f"{problem}, so it could not be read back; keep the context's metadata smaller and flatter")
    return text.encode("ascii")


def parse_header(raw: bytes | str, where: str) -> dict[str, Any]:
    """The header dict stored as ``raw``, bounded before parsing; ``CheckpointError`` when it is
    too large, nested too deeply, not JSON or not an object."""
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8"))
        problem = _bounds_problem(size, text)
        if problem:
            raise damaged(where, problem)
        header = json.loads(text)
    except (UnicodeError, json.JSONDecodeError) as exc:
        raise damaged(where, f"the checkpoint header is damaged ({exc})") from exc
    if not isinstance(header, dict):
        raise damaged(where, "the checkpoint header is damaged (not a JSON object)")
    return header


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# One context in one file
# --------------------------------------------------------------------------------------------


def write_file(state: ContextState, path: str | os.PathLike[str], checkpoint_id: str) -> None:
    """Write ``state`` to one safetensors file, atomically (a crash leaves the old file or none).

    The JSON header goes into the safetensors metadata; each tensor's sha256 is in it too,
    because safetensors itself checks structure but not content.
    """
    started = time.perf_counter()
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.tensors.items()}
    header = state.header("latest", checkpoint_id)
    header["tensors"] = {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": sha256(tensor_bytes(t))}
                         for name, t in tensors.items()}
    metadata = {_FILE_METADATA_KEY: encode_header(header).decode()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    log.info("saved context %r to %s: %.1f MB in %.2f s", state.context_id, path, Path(path).stat().st_size / 1e6,
             time.perf_counter() - started)


def read_file(path: str | os.PathLike[str], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
              ) -> ContextState:
    """The state ``write_file`` wrote, checked for integrity and header consistency."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, not {type(path).__name__}")
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise ValueError(f"{where} is a directory; pass the checkpoint file that HCContext.save wrote")
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such checkpoint file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_FILE_METADATA_KEY)
            if raw is None:
                raise CheckpointError(f"{where}: a safetensors file, but not an hcmemory checkpoint")
            header = parse_header(raw, where)
            check_compatible(header, model, tokenizer, where)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except safetensors.SafetensorError as exc:
        raise damaged(where, f"the checkpoint file is damaged or truncated ({exc})") from exc
    manifest = header.get("tensors")
    if not isinstance(manifest, dict) or set(manifest) != set(tensors):
        raise CheckpointError(f"{where}: the file's tensors do not match its header")
    for name, tensor in tensors.items():
        if sha256(tensor_bytes(tensor)) != manifest[name].get("sha256"):
            raise damaged(where, f"tensor {name!r} is corrupted (sha256 mismatch)")
    return ContextState.from_header(header, tensors, where)
