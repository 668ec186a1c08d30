"""ContextStore: checkpoints of many contexts, each under one or more tags, in one SQLite file.

A checkpoint is a context's ``ContextState`` (``checkpoint.py``: JSON header + tensors).  Loading
rebuilds the context around the stored tensors, so nothing is prefilled again.

Why it is built this way:

* **No pickle.** sqlitedict pickles values by default, and unpickling a file runs code from it.
  Here values are bytes only (the codec refuses anything else): headers are UTF-8 JSON and
  tensors are safetensors blobs, so opening a store someone else wrote cannot execute anything.
* **Crash safety.** A save writes every chunk under new keys, then the header that points at
  them, then drops the previous checkpoint's chunks, and commits all of it as one SQLite
  transaction. A process killed anywhere in between leaves an uncommitted transaction that
  SQLite rolls back on the next open: the previous checkpoint stays whole and no orphan chunks
  remain. sqlitedict switches fsync off, which a power cut could turn into a corrupt file, so
  stores turn it back on.
* **Size.** SQLite refuses blobs near 1 GB, so tensors are stored as row chunks (split along the
  row axis of the ``(heads, rows, ...)`` stores) of at most ``CHUNK_BYTES``.
* **Corruption is detected, not propagated.** Every chunk carries a sha256 in the header; a
  mismatch, an unparsable blob or a damaged database raises ``CheckpointError``.
* **Its own file.** A store refuses a SQLite file that holds other tables rather than adding its
  table to someone else's database.
* **Lock order.** A save copies the context's state (under the context's guard) *before* taking
  the store's lock, so the store never waits for a context while holding its own lock (see
  ``guard.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import safetensors
import safetensors.torch
import torch
from sqlitedict import SqliteDict
from transformers import PreTrainedTokenizerBase

from .checkpoint import CheckpointError, ContextState, check_compatible, dtype_name, sha256
from .context import HCContext, check_id

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20
"""Most tensor bytes per stored entry: far below SQLite's ~1 GB blob limit, small enough that
reading and hashing a chunk stays cheap."""
DEFAULT_TAG = "latest"
"""The tag a checkpoint gets when none is given; ``ContextPool`` spills under it."""

_TABLE = "hcmemory"
_META = "meta/"
_CHUNK = "chunk/"
_CHUNK_TENSOR = "rows"


class CheckpointNotFoundError(KeyError):
    """No checkpoint under the requested context id (and tag)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


def _bytes_only(value: Any) -> bytes:
    """sqlitedict's value codec: bytes pass through untouched, anything else is refused.

    Used for both directions, so no value is ever pickled on write or unpickled on read.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"ContextStore stores bytes only, got {type(value).__name__}")
    return value


def _split(tensor: torch.Tensor, chunk_bytes: int) -> tuple[int, list[torch.Tensor]]:
    """(dimension, pieces): rows of ``(heads, rows, ...)`` stores, or dim 0 of 1-D tensors."""
    dim = 1 if tensor.dim() >= 2 else 0
    if tensor.dim() == 0 or tensor.numel() == 0:
        return dim, [tensor]
    row_bytes = tensor.numel() // tensor.shape[dim] * tensor.element_size()
    rows = max(1, chunk_bytes // row_bytes)
    return dim, list(tensor.split(rows, dim))


def _meta_key(context_id: str, tag: str) -> str:
    return f"{_META}{quote(context_id, safe='')}/{quote(tag, safe='')}"


def _chunk_prefix(context_id: str, tag: str) -> str:
    """All chunks of one (context, tag) live under this prefix, whichever checkpoint wrote them."""
    return f"{_CHUNK}{quote(context_id, safe='')}/{quote(tag, safe='')}/"


def _after(prefix: str) -> str:
    """The smallest key above every key starting with ``prefix`` (which ends in ``/``)."""
    return prefix[:-1] + chr(ord("/") + 1)


def _tag(tag: str | None) -> str:
    return DEFAULT_TAG if tag is None else check_id(tag, "tag")


class ContextStore:
    """Checkpoints of many contexts, each under one or more tags, in one SQLite file.

    One process should write a store at a time (SQLite serializes writers; sqlitedict reports
    their errors late). Within a process a store may be shared by threads.
    """

    def __init__(self, path: str | os.PathLike[str], *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, not {type(path).__name__}")
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes!r} must be an int >= 1")
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._lock = threading.RLock()
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory; a store is one SQLite file (e.g. {self.path / 'memory.sqlite'})")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent} does not exist; create the directory for the store first")
        db = None
        try:
            # Probe first: on a damaged file sqlitedict's worker thread dies with a stray traceback.
            with closing(sqlite3.connect(self.path)) as probe:
                tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            foreign = sorted(t for t in tables - {_TABLE} if not t.startswith("sqlite_"))
            if foreign:
                raise ValueError(f"{self.path} is a SQLite database holding other tables ({', '.join(foreign[:5])}); "
                                 "an hcmemory store needs a file of its own — pass another path")
            db = SqliteDict(str(self.path), tablename=_TABLE, flag="c", autocommit=False,
                            encode=_bytes_only, decode=_bytes_only)
            db.conn.execute("PRAGMA synchronous=FULL")
            self._db = db
            self._keys(_META, _after(_META))  # surfaces a damaged index now rather than at first use
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close(force=True)
            raise CheckpointError(f"{self.path}: not a readable hcmemory store ({exc}); restore it from a "
                                  "backup, or move it away to start a new store") from exc

    # --- public API ------------------------------------------------------------------------
    def save(self, ctx: HCContext, context_id: str | None = None, tag: str | None = None) -> str:
        """Checkpoint ``ctx`` under ``(context_id, tag)``, replacing what was there; returns the checkpoint id.

        ``context_id`` defaults to the context's own id and ``tag`` to ``"latest"``. Atomic: on
        any error or crash the previous checkpoint under that name is still there, whole.
        """
        if not isinstance(ctx, HCContext):
            raise TypeError(f"ContextStore.save takes an HCContext, not {type(ctx).__name__}")
        context_id = ctx.context_id if context_id is None else check_id(context_id)
        tag = _tag(tag)
        return self.save_state(ctx.to_state(), context_id, tag)  # copied before the store's lock: see guard.py

    def save_state(self, state: ContextState, context_id: str | None = None, tag: str | None = None) -> str:
        """``save`` for a state already copied out of its context (``HCContext.to_state``/``spill``)."""
        context_id = state.context_id if context_id is None else check_id(context_id)
        tag = _tag(tag)
        checkpoint_id = uuid.uuid4().hex
        prefix = _chunk_prefix(context_id, tag)
        new_chunks = f"{prefix}{checkpoint_id}/"
        started = time.perf_counter()
        header = state.header(tag, checkpoint_id)
        header["context_id"] = context_id
        with self._lock, self._database_errors():
            try:
                header["tensors"], nbytes = self._write_chunks(state.tensors, new_chunks)
                self._keys(_META, _META)  # round trip: raises now if any chunk write failed
                self._db[_meta_key(context_id, tag)] = json.dumps(header).encode()
                self._delete_range(prefix, new_chunks)
                self._delete_range(_after(new_chunks), _after(prefix))
                self._db.commit(blocking=True)
            except BaseException:
                self._rollback()
                raise
        log.info("saved context %r tag %r: %d tokens, %.1f MB in %.2f s", context_id, tag, len(state.token_ids),
                 nbytes / 1e6, time.perf_counter() - started)
        return checkpoint_id

    def load(self, context_id: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             tag: str | None = None) -> HCContext:
        """Rebuild the context saved under ``(context_id, tag)`` for ``model``, without re-prefilling.

        Raises ``CheckpointNotFoundError`` (a ``KeyError``) when there is no such checkpoint,
        ``ValueError`` when it was made with another model or tokenizer, and ``CheckpointError``
        when it is damaged, inconsistent or of another format version. Never changes the store.
        """
        check_id(context_id)
        tag = _tag(tag)
        where = f"{self.path} [{context_id!r}, tag {tag!r}]"
        started = time.perf_counter()
        with self._lock, self._database_errors():
            header = self._header(context_id, tag)
            check_compatible(header, model, tokenizer, where)
            tensors, nbytes = self._read_chunks(header, where)
        ctx = HCContext.from_state(ContextState.from_header(header, tensors, where), model, tokenizer, where)
        log.info("loaded context %r tag %r: %d tokens, %.1f MB in %.2f s", context_id, tag, len(ctx), nbytes / 1e6,
                 time.perf_counter() - started)
        return ctx

    def list(self) -> list[str]:
        """Ids of the contexts that have at least one checkpoint, sorted."""
        with self._lock, self._database_errors():
            ids = {unquote(key[len(_META):].split("/")[0]) for key in self._keys(_META, _after(_META))}
        return sorted(ids)

    def checkpoints(self, context_id: str) -> list[dict[str, Any]]:
        """The checkpoints of one context, oldest first: tag, created (ISO time), tokens, id, bytes."""
        check_id(context_id)
        found = []
        with self._lock, self._database_errors():
            for tag in self._tags(context_id):
                header = self._header(context_id, tag)
                stored = sum(chunk["bytes"] for spec in header.get("tensors", {}).values() for chunk in spec["chunks"])
                found.append({"tag": tag, "created": header.get("created"), "tokens": len(header.get("token_ids", ())),
                              "id": header.get("checkpoint_id"), "bytes": stored})
        return sorted(found, key=lambda item: str(item["created"]))

    def token_ids(self, context_id: str, tag: str | None = None) -> list[int]:
        """The token ids a checkpoint holds, read from its header alone (no tensor is read)."""
        check_id(context_id)
        tag = _tag(tag)
        with self._lock, self._database_errors():
            ids = self._header(context_id, tag).get("token_ids")
        if not isinstance(ids, list):
            raise CheckpointError(f"{self.path} [{context_id!r}, tag {tag!r}]: the checkpoint header has no token ids")
        return ids

    def exists(self, context_id: str, tag: str | None = None) -> bool:
        """Whether a checkpoint is stored under ``(context_id, tag)``."""
        check_id(context_id)
        tag = _tag(tag)
        with self._lock, self._database_errors():
            return _meta_key(context_id, tag) in self._db

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` has any checkpoint."""
        with self._lock, self._database_errors():
            return isinstance(context_id, str) and bool(self._tags(context_id))

    def delete(self, context_id: str, tag: str | None = None) -> None:
        """Remove one checkpoint, or every checkpoint of the context when ``tag`` is None."""
        check_id(context_id)
        if tag is not None:
            check_id(tag, "tag")
        with self._lock, self._database_errors():
            tags = self._tags(context_id) if tag is None else [tag]
            if not tags or (tag is not None and _meta_key(context_id, tag) not in self._db):
                raise self._not_found(context_id, tag)
            for name in tags:
                prefix = _chunk_prefix(context_id, name)
                self._delete_range(prefix, _after(prefix))
                del self._db[_meta_key(context_id, name)]
            self._db.commit(blocking=True)
        log.info("deleted context %r tag(s) %s", context_id, tags)

    def close(self) -> None:
        """Close the file. Every call above has committed already, so nothing is lost here."""
        with self._lock:
            if self._db.conn is not None:
                self._db.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ContextStore({str(self.path)!r})"

    # --- internals -------------------------------------------------------------------------
    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """Turn SQLite's damage reports into ``CheckpointError`` naming the file."""
        if self._db.conn is None:
            raise ValueError(f"{self!r} is closed; open the store again to use it")
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(f"{self.path}: the store file is damaged ({exc}); restore it from a backup") from exc

    def _keys(self, low: str, high: str) -> list[str]:
        """Keys in ``[low, high)``: a range scan of the primary key (sqlitedict has no prefix query).

        Also a round trip through sqlitedict's writer queue, so errors of earlier writes raise here.
        """
        query = f'SELECT key FROM "{self._db.tablename}" WHERE key >= ? AND key < ? ORDER BY key'
        return [row[0] for row in self._db.conn.select(query, (low, high))]

    def _delete_range(self, low: str, high: str) -> None:
        self._db.conn.execute(f'DELETE FROM "{self._db.tablename}" WHERE key >= ? AND key < ?', (low, high))

    def _rollback(self) -> None:
        """Undo the open transaction of a failed save, leaving the store exactly as it was.

        sqlitedict has no rollback, so the statement goes through its queue, after the failed
        save's own writes. Best effort: on a crash instead, SQLite rolls back on the next open.
        """
        try:
            self._db.conn.execute("ROLLBACK")
            self._keys(_META, _META)  # wait for it; "no transaction is active" is fine
        except sqlite3.Error:
            pass
        except Exception:  # the save's own error is the one to report
            log.warning("could not roll back a failed save in %s", self.path, exc_info=True)

    def _tags(self, context_id: str) -> list[str]:
        prefix = f"{_META}{quote(context_id, safe='')}/"
        return [unquote(key[len(prefix):]) for key in self._keys(prefix, _after(prefix))]

    def _not_found(self, context_id: str, tag: str | None) -> CheckpointNotFoundError:
        tags = self._tags(context_id)
        if tags:
            return CheckpointNotFoundError(f"{self.path}: context {context_id!r} has no checkpoint tagged {tag!r}; "
                                           f"its tags are {tags}")
        known = self.list()
        shown = ", ".join(map(repr, known[:10])) + (" …" if len(known) > 10 else "")
        return CheckpointNotFoundError(f"{self.path}: no context {context_id!r} is stored"
                                       + (f"; stored contexts: {shown}" if known else "; the store is empty"))

    def _header(self, context_id: str, tag: str) -> dict[str, Any]:
        try:
            raw = self._db[_meta_key(context_id, tag)]
        except KeyError:
            raise self._not_found(context_id, tag) from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path} [{context_id!r}, tag {tag!r}]: the checkpoint header is damaged "
                                  f"({exc}); restore it from a backup or save the context again") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} [{context_id!r}, tag {tag!r}]: the checkpoint header is damaged")
        return header

    def _write_chunks(self, tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, Any], int]:
        """Queue every tensor as row chunks under ``prefix``; returns (manifest, bytes written)."""
        manifest: dict[str, Any] = {}
        index = total = 0
        for name, tensor in tensors.items():
            dim, pieces = _split(tensor, self.chunk_bytes)
            chunks = []
            for piece in pieces:
                blob = safetensors.torch.save({_CHUNK_TENSOR: piece.detach().cpu().contiguous()})
                key = f"{prefix}{index:08d}"
                self._db[key] = blob
                chunks.append({"key": key, "rows": int(piece.shape[dim]) if piece.dim() else 1,
                               "bytes": len(blob), "sha256": sha256(blob)})
                index += 1
                total += len(blob)
            manifest[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "dim": dim,
                              "chunks": chunks}
        return manifest, total

    def _read_chunks(self, header: dict[str, Any], where: str) -> tuple[dict[str, torch.Tensor], int]:
        """Read, verify and reassemble every tensor of a checkpoint; returns (tensors, bytes read)."""
        tensors: dict[str, torch.Tensor] = {}
        total = 0
        try:
            manifest = header["tensors"].items()
            for name, spec in manifest:
                shape, dim = list(spec["shape"]), int(spec["dim"])
                dtype = getattr(torch, spec["dtype"], None)
                if not isinstance(dtype, torch.dtype):
                    raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {spec['dtype']!r}")
                out = torch.empty(shape, dtype=dtype)
                start = 0
                for chunk in spec["chunks"]:
                    piece = self._read_chunk(chunk, where)
                    expected = shape[:dim] + [piece.shape[dim] if piece.dim() else 1] + shape[dim + 1:]
                    if piece.dtype != dtype or (out.dim() and list(piece.shape) != expected):
                        raise CheckpointError(f"{where}: chunk {chunk['key']!r} holds {piece.dtype} "
                                              f"{tuple(piece.shape)}, not rows of {dtype} {tuple(shape)}")
                    if out.dim() == 0:
                        out = piece.reshape(())
                    else:
                        out.narrow(dim, start, piece.shape[dim]).copy_(piece)
                        start += piece.shape[dim]
                    total += chunk["bytes"]
                if out.dim() and start != shape[dim]:
                    raise CheckpointError(f"{where}: tensor {name!r} has {start} of {shape[dim]} rows")
                tensors[name] = out
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{where}: the checkpoint's tensors do not match its header ({exc}); "
                                  "restore it from a backup or save the context again") from exc
        return tensors, total

    def _read_chunk(self, chunk: dict[str, Any], where: str) -> torch.Tensor:
        try:
            blob = self._db[chunk["key"]]
        except KeyError:
            raise CheckpointError(f"{where}: chunk {chunk['key']!r} is missing; restore the store from a backup "
                                  "or save the context again") from None
        if sha256(blob) != chunk["sha256"]:
            raise CheckpointError(f"{where}: chunk {chunk['key']!r} is corrupted (sha256 mismatch); restore the "
                                  "store from a backup or save the context again")
        try:
            return safetensors.torch.load(blob)[_CHUNK_TENSOR]
        except (safetensors.SafetensorError, KeyError) as exc:
            raise CheckpointError(f"{where}: chunk {chunk['key']!r} cannot be parsed ({exc})") from exc
