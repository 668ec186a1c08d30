"""ContextStore: checkpoints of many contexts, each under one or more tags, in one database.

A checkpoint is a context's ``ContextState`` (``checkpoint.py``: JSON header + tensors).  Loading
rebuilds the context around the stored tensors, so nothing is prefilled again.

``ContextStore`` does everything that is the same whatever holds the bytes: it splits tensors into
chunks, writes the manifest into the header, verifies every chunk on the way back and turns what it
finds into clear errors.  A ``StoreBackend`` (``base.py``) keeps ``(namespace, context id, tag) ->
version + header + chunks``: ``SQLiteBackend`` (one file, the embedded default) and
``PostgresBackend`` (one database shared by many machines and tenants).

Why it is built this way:

* **No pickle.** Headers are UTF-8 JSON and chunks are the tensors' raw bytes, described by the
  header (dtype, shape, rows, sha256): opening a store someone else wrote cannot execute anything.
* **All or nothing.** A save writes its chunks, then the header, then drops what the previous
  checkpoint alone referenced, in one transaction: an error, a kill or a power cut anywhere leaves
  the previous checkpoint whole and no orphan chunks.
* **Stable row chunks.** Tensors are ``(heads, rows, ...)`` stores that grow by rows.  Each is cut
  into chunks of a fixed number of rows (``rows_per_chunk``, from ``chunk_bytes`` and the row size,
  recorded in the manifest), so after a turn appends tokens every earlier full chunk has the same
  bytes and sha256 as before; the backends address chunks by sha256 and send only those they lack,
  so a save after each turn writes the new rows' chunks, not the whole conversation again.
* **Untrusted bytes are bounded before they are used.** A header is size- and depth-checked
  before it is parsed (``checkpoint.parse_header``), and every tensor's claimed dtype and shape
  is checked against the byte counts of the chunks actually stored before any buffer is allocated;
  the sha256 of every chunk is checked on every load.  Anything wrong raises ``CheckpointError``.
* **Versions.** Every save returns the checkpoint's new version; passing it back as
  ``expected_version`` makes the next save a compare-and-set, so of two replicas that both believe
  they own a conversation (a failover), the stale one is refused instead of overwriting the other.
* **Lock order.** A save copies the context's state (under the context's guard) *before* calling
  the backend, so the store never waits for a context while holding a database lock (``guard.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..checkpoint import (CheckpointError, ContextState, check_compatible, check_version, damaged, dtype_name,
                          encode_header, parse_header, sha256, upgraded_config)
from ..config import HCConfig, is_int
from ..context import HCContext, check_id
from .base import (Chunk, CheckpointNotFoundError, IndexEntry, SavedCheckpoint, StoreBackend, StoredCheckpoint,
                   check_expected_version, check_namespace)
from .chunking import CHUNK_BYTES, encode_checkpoint

log = logging.getLogger(__name__)

DEFAULT_TAG = "latest"
"""The tag a checkpoint gets when none is given; ``ContextPool`` spills under it."""
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


def open_backend(location: str | os.PathLike[str], namespace: str) -> StoreBackend:
    """The backend ``location`` names: a ``postgresql://`` URL, or a file path (``sqlite:///path`` too)."""
    if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
        from .postgres import PostgresBackend  # psycopg is an optional dependency: needed for URLs only

        return PostgresBackend(location, namespace)
    if isinstance(location, str) and location.startswith(SQLITE_SCHEME):
        location = location[len(SQLITE_SCHEME):]
    elif isinstance(location, str) and "://" in location:
        raise ValueError(f"{location.split('://')[0]}:// stores are not supported; pass a file path, "
                         "sqlite:///path or postgresql://user@host/database")
    path = Path(location)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; a store is one SQLite file (e.g. {path / 'memory.sqlite'})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist; create the directory for the store first")
    from .sqlite import SQLiteBackend

    return SQLiteBackend(path, namespace)


@dataclass(frozen=True)
class _TensorSpec:
    """One tensor of a manifest, checked for types and against the bytes actually stored."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    dim: int
    chunks: tuple[tuple[int, int, str], ...]
    """``(seq, rows, sha256)`` per chunk, in order."""
    row_bytes: int
    nbytes: int

    def chunk_shape(self, rows: int) -> tuple[int, ...]:
        return self.shape[:self.dim] + (rows,) + self.shape[self.dim + 1:] if self.shape else ()


def _tag(tag: str | None) -> str:
    return DEFAULT_TAG if tag is None else check_id(tag, "tag")


def _where(location: str, context_id: str, tag: str) -> str:
    return f"{location} [{context_id!r}, tag {tag!r}]"


def _tensor_specs(header: dict[str, Any], sizes: dict[int, int] | None, where: str) -> list[_TensorSpec]:
    """The manifest's tensors, every field checked; with ``sizes`` (stored bytes per chunk) also every
    claimed size against what is stored — before anything is allocated from the header's numbers."""
    manifest = header.get("tensors")
    if not isinstance(manifest, dict):
        raise damaged(where, "the checkpoint header has no tensor manifest")
    specs = []
    for name, spec in manifest.items():
        try:
            dtype = getattr(torch, spec["dtype"], None) if isinstance(spec["dtype"], str) else None
            shape, dim, chunks = spec["shape"], spec["dim"], spec["chunks"]
            rows_per_chunk = spec.get("rows_per_chunk")  # absent in checkpoints written before it was recorded
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {spec['dtype']!r}")
            if not (isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape)):
                raise ValueError(f"shape {shape!r} is not a list of sizes")
            if not (is_int(dim) and (0 <= dim < len(shape) or dim == 0 == len(shape))):
                raise ValueError(f"row dimension {dim!r} does not fit shape {shape}")
            if not (isinstance(chunks, list) and all(isinstance(c, dict) and is_int(c["seq"]) and is_int(c["rows"])
                                                     and c["rows"] >= 0 and isinstance(c["sha256"], str)
                                                     for c in chunks)):
                raise ValueError("the chunk list is malformed")
            if rows_per_chunk is not None and not (
                    is_int(rows_per_chunk) and rows_per_chunk >= 1
                    and all(c["rows"] == rows_per_chunk for c in chunks[:-1])
                    and all(c["rows"] <= rows_per_chunk for c in chunks[-1:])):
                raise ValueError(f"the chunks' rows do not follow rows_per_chunk={rows_per_chunk!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(where, f"tensor {name!r} is described wrongly in the header ({exc})") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        rows_total = shape[dim] if shape else 1
        row_bytes = math.prod(shape) // rows_total * itemsize if rows_total else 0
        entries = tuple((c["seq"], c["rows"], c["sha256"]) for c in chunks)
        found = _TensorSpec(name, dtype, tuple(shape), dim, entries, row_bytes, math.prod(shape) * itemsize)
        if sizes is not None:
            missing = [seq for seq, _, _ in entries if seq not in sizes]
            if missing:
                raise damaged(where, f"chunk {missing[0]} of tensor {name!r} is missing")
            stored = sum(sizes[seq] for seq, _, _ in entries)
            if found.nbytes > stored:
                raise damaged(where, f"tensor {name!r} claims {found.nbytes} bytes ({dtype_name(dtype)} "
                                     f"{tuple(shape)}) but its chunks hold only {stored}")
            for seq, rows, _ in entries:
                if sizes[seq] != rows * row_bytes:
                    raise damaged(where, f"chunk {seq} of tensor {name!r} holds {sizes[seq]} bytes, not the "
                                         f"{rows * row_bytes} of its {rows} rows")
        if sum(rows for _, rows, _ in entries) != rows_total:
            raise damaged(where, f"tensor {name!r} has {sum(rows for _, rows, _ in entries)} of {rows_total} rows")
        specs.append(found)
    return specs


class ContextStore:
    """Checkpoints of many contexts, each under one or more tags, in a SQLite file or a PostgreSQL database.

    ``location`` is a file path (or ``sqlite:///path``): one SQLite file, the embedded default; or a
    ``postgresql://user@host/database`` URL: one database that many processes and machines share
    (``pip install 'hcmemory[postgres]'``).  ``namespace`` (a tenant) scopes every id: a store never
    lists, matches, loads or deletes another namespace's checkpoints, so one database can serve many
    tenants; library users keep the default ``""``.

    Safe to share between threads, and between processes (the database serializes writers).
    """

    def __init__(self, location: str | os.PathLike[str], *, namespace: str = "", chunk_bytes: int = CHUNK_BYTES
                 ) -> None:
        if not isinstance(location, (str, os.PathLike)):
            raise TypeError(f"location must be a file path or a postgresql:// URL, not {type(location).__name__}")
        if not is_int(chunk_bytes) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes!r} must be an int >= 1")
        self.namespace = check_namespace(namespace)
        self.chunk_bytes = chunk_bytes
        self._backend: StoreBackend = open_backend(location, self.namespace)
        path = getattr(self._backend, "path", None)
        self.path: Path | None = path
        """The SQLite file, or None for a database server."""

    @property
    def location(self) -> str:
        """Where the checkpoints live: the file path, or the database URL without its password."""
        return self._backend.location

    # --- public API ------------------------------------------------------------------------
    def save(self, ctx: HCContext, context_id: str | None = None, tag: str | None = None, *,
             expected_version: int | None = None) -> SavedCheckpoint:
        """Checkpoint ``ctx`` under ``(context_id, tag)``, replacing what was there.

        ``context_id`` defaults to the context's own id and ``tag`` to ``"latest"``.  With
        ``expected_version`` (the ``version`` of the save or load this writer continues from; 0 when
        it expects nothing stored) the save is a compare-and-set: if another version is stored,
        ``StaleCheckpointError`` is raised and nothing changes.  Atomic: on any error or crash the
        previous checkpoint under that name is still there, whole.
        """
        if not isinstance(ctx, HCContext):
            raise TypeError(f"ContextStore.save takes an HCContext, not {type(ctx).__name__}")
        context_id = ctx.context_id if context_id is None else check_id(context_id)
        tag = _tag(tag)
        check_expected_version(expected_version)
        return self.save_state(ctx.to_state(), context_id, tag,  # copied before any database lock: see guard.py
                               expected_version=expected_version)

    def save_state(self, state: ContextState, context_id: str | None = None, tag: str | None = None, *,
                   expected_version: int | None = None) -> SavedCheckpoint:
        """``save`` for a state already copied out of its context (``HCContext.to_state``/``spill``)."""
        context_id = state.context_id if context_id is None else check_id(context_id)
        tag = _tag(tag)
        check_expected_version(expected_version)
        checkpoint_id = uuid.uuid4().hex
        started = time.perf_counter()
        header = state.header(tag, checkpoint_id)
        header["context_id"] = context_id
        encode_header(header)  # refuse metadata that could not be read back before writing anything
        chunks, full_header = encode_checkpoint(header, state.tensors, self.chunk_bytes)
        counted = 0

        def counting() -> Iterator[Chunk]:
            nonlocal counted
            for chunk in chunks:
                counted += 1
                yield chunk

        result = self._backend.save(context_id, tag, checkpoint_id, counting(), full_header, expected_version)
        log.info("saved context %r tag %r version %d: %d tokens, %d of %d chunks new (%.1f MB) in %.2f s",
                 context_id, tag, result.version, len(state.token_ids), result.new_chunks, counted,
                 result.new_bytes / 1e6, time.perf_counter() - started)
        return SavedCheckpoint(context_id, tag, checkpoint_id, result.version, counted, result.new_chunks,
                               result.new_bytes)

    def load(self, context_id: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             tag: str | None = None) -> HCContext:
        """Rebuild the context saved under ``(context_id, tag)`` for ``model``, without re-prefilling.

        Raises ``CheckpointNotFoundError`` (a ``KeyError``) when there is no such checkpoint,
        ``ValueError`` when it was made with another model or tokenizer, and ``CheckpointError``
        when it is damaged, inconsistent or of another format version. Never changes the store.
        """
        return self.load_versioned(context_id, model, tokenizer, tag)[0]

    def load_versioned(self, context_id: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                       tag: str | None = None) -> tuple[HCContext, int]:
        """``load``, and the version of the checkpoint loaded, read in the same snapshot: the
        ``expected_version`` for the next save of a writer that continues this context."""
        check_id(context_id)
        tag = _tag(tag)
        where = _where(self.location, context_id, tag)
        started = time.perf_counter()
        with self._backend.read(context_id, tag) as stored:
            if stored is None:
                raise self._not_found(context_id, tag)
            header = parse_header(stored.header, where)
            check_compatible(header, model, tokenizer, where)
            tensors, nbytes = self._read_tensors(stored, header, where)
            version = stored.version
        ctx = HCContext.from_state(ContextState.from_header(header, tensors, where), model, tokenizer, where)
        log.info("loaded context %r tag %r version %d: %d tokens, %.1f MB in %.2f s", context_id, tag, version,
                 len(ctx), nbytes / 1e6, time.perf_counter() - started)
        return ctx, version

    def version(self, context_id: str, tag: str | None = None) -> int:
        """The version stored under ``(context_id, tag)``, 0 when nothing is (no tensor is read)."""
        check_id(context_id)
        return self._backend.versions(context_id).get(_tag(tag), 0)

    def list(self) -> list[str]:
        """Ids of the contexts that have at least one checkpoint, sorted."""
        return self._backend.context_ids()

    def checkpoints(self, context_id: str) -> list[dict[str, Any]]:
        """The checkpoints of one context, oldest first: tag, created (ISO time), tokens, id, version, bytes."""
        check_id(context_id)
        found = []
        for _, tag, version, raw in self._backend.headers(context_id):
            where = _where(self.location, context_id, tag)
            header = parse_header(raw, where)
            stored = sum(spec.nbytes for spec in _tensor_specs(header, None, where))
            found.append({"tag": tag, "created": header.get("created"), "tokens": len(header.get("token_ids", ())),
                          "id": header.get("checkpoint_id"), "version": version, "bytes": stored})
        return sorted(found, key=lambda item: str(item["created"]))

    def index(self, tag: str | None = None) -> dict[tuple[str, str], IndexEntry]:
        """Every checkpoint (or every one under ``tag``) by ``(context_id, tag)``, read from headers alone.

        For choosing among stored checkpoints without loading any (``ContextPool`` matches prompts
        against their token ids and skips those of another configuration, model or tokenizer).  A
        checkpoint whose header cannot be read or is of a format this version does not read is left
        out and logged — one damaged entry never hides the others.
        """
        if tag is not None:
            check_id(tag, "tag")
        entries = {}
        for context_id, name, version, raw in self._backend.headers(tag=tag):
            where = _where(self.location, context_id, name)
            try:
                entries[context_id, name] = _index_entry(context_id, name, version, parse_header(raw, where), where)
            except (CheckpointError, KeyError, TypeError, ValueError) as exc:
                log.warning("left out of the index: %s", exc)
        return entries

    def token_ids(self, context_id: str, tag: str | None = None) -> list[int]:
        """The token ids a checkpoint holds, read from its header alone (no tensor is read)."""
        check_id(context_id)
        tag = _tag(tag)
        where = _where(self.location, context_id, tag)
        found = self._backend.headers(context_id, tag)
        if not found:
            raise self._not_found(context_id, tag)
        ids = parse_header(found[0][3], where).get("token_ids")
        if not (isinstance(ids, list) and all(is_int(t) for t in ids)):
            raise damaged(where, "the checkpoint header has no token ids")
        return ids

    def exists(self, context_id: str, tag: str | None = None) -> bool:
        """Whether a checkpoint is stored under ``(context_id, tag)``."""
        return self.version(context_id, tag) > 0

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` has any checkpoint."""
        return isinstance(context_id, str) and bool(self._backend.versions(context_id))

    def delete(self, context_id: str, tag: str | None = None) -> None:
        """Remove one checkpoint, or every checkpoint of the context when ``tag`` is None, with the
        chunks no other checkpoint shares."""
        check_id(context_id)
        if tag is not None:
            check_id(tag, "tag")
        tags = self._backend.delete(context_id, tag)
        if not tags:
            raise self._not_found(context_id, tag)
        log.info("deleted context %r tag(s) %s", context_id, tags)

    def close(self) -> None:
        """Close the store. Every call above has committed already, so nothing is lost here."""
        self._backend.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        namespace = f", namespace={self.namespace!r}" if self.namespace else ""
        return f"ContextStore({self.location!r}{namespace})"

    # --- internals -------------------------------------------------------------------------
    def _not_found(self, context_id: str, tag: str | None) -> CheckpointNotFoundError:
        tags = list(self._backend.versions(context_id))
        if tags:
            return CheckpointNotFoundError(f"{self.location}: context {context_id!r} has no checkpoint tagged "
                                           f"{tag!r}; its tags are {tags}")
        known = self.list()
        shown = ", ".join(map(repr, known[:10])) + (" …" if len(known) > 10 else "")
        return CheckpointNotFoundError(f"{self.location}: no context {context_id!r} is stored"
                                       + (f"; stored contexts: {shown}" if known else "; the store is empty"))

    @staticmethod
    def _read_tensors(stored: StoredCheckpoint, header: dict[str, Any], where: str
                      ) -> tuple[dict[str, torch.Tensor], int]:
        """Read, verify and reassemble every tensor of a checkpoint; returns (tensors, bytes read).

        Every claimed size is checked against the stored byte counts first (``_tensor_specs``), so a
        header cannot make this allocate more than the chunks actually hold.
        """
        tensors: dict[str, torch.Tensor] = {}
        total = 0
        for spec in _tensor_specs(header, stored.chunk_sizes(), where):
            out = torch.empty(spec.shape, dtype=spec.dtype)
            start = 0
            for seq, rows, digest in spec.chunks:
                data = stored.chunk(seq)  # there, of the size checked: one snapshot
                if data is None or sha256(data) != digest:
                    raise damaged(where, f"chunk {seq} of tensor {spec.name!r} is corrupted (sha256 mismatch)")
                if data:
                    piece = torch.frombuffer(bytearray(data), dtype=spec.dtype).reshape(spec.chunk_shape(rows))
                    (out.narrow(spec.dim, start, rows) if spec.shape else out).copy_(piece)
                start += rows
                total += len(data)
            tensors[spec.name] = out
        return tensors, total


def _index_entry(context_id: str, tag: str, version: int, header: dict[str, Any], where: str) -> IndexEntry:
    """The index entry of a parsed header; ``CheckpointError`` (or a ``KeyError``/``TypeError``/
    ``ValueError`` from a malformed field) when it cannot be one."""
    check_version(header, where)
    config = HCConfig.from_dict(upgraded_config(header), complete=True).to_dict()
    ids = header["token_ids"]
    if not (isinstance(ids, list) and all(is_int(t) and t >= 0 for t in ids)):
        raise damaged(where, "the checkpoint header's token ids are not a list of non-negative ints")
    fields = {name: header[name] for name in ("checkpoint_id", "model_fingerprint", "tokenizer_fingerprint", "created")}
    if not all(isinstance(value, str) for value in fields.values()):
        raise damaged(where, "the checkpoint header's ids, fingerprints or time are not strings")
    return IndexEntry(context_id, tag, version=version, token_ids=tuple(ids), config=config, **fields)
