"""Checkpoints of ``HCContext`` state: many contexts in one SQLite file, or one context in one file.

A checkpoint is the context's cache tensors plus a JSON header (configuration, token ids, per-layer
counters, model and tokenizer fingerprints). Loading rebuilds the context around the stored
tensors, so nothing is prefilled again.

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

``ContextPool`` keeps the recently used contexts of a store live and spills the others to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import safetensors
import safetensors.torch
import torch
from sqlitedict import SqliteDict
from transformers import PreTrainedTokenizerBase

from .cache import HCCache
from .config import HCConfig
from .context import HCContext
from .models import model_fingerprint, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the stored layout changes; a reader refuses checkpoints newer than itself."""
CHUNK_BYTES = 64 * 2**20
"""Most tensor bytes per stored entry: far below SQLite's ~1 GB blob limit, small enough that
reading and hashing a chunk stays cheap."""
DEFAULT_TAG = "latest"
"""The tag a checkpoint gets when none is given; ``ContextPool`` spills under it."""

_TABLE = "hcmemory"
_META = "meta/"
_CHUNK = "chunk/"
_FILE_METADATA_KEY = "hcmemory"
_CHUNK_TENSOR = "rows"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as stored: damaged, truncated, or from a newer hcmemory."""


class CheckpointNotFoundError(KeyError):
    """No checkpoint under the requested context id (and tag)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Header and tensors shared by both layouts
# --------------------------------------------------------------------------------------------


def _bytes_only(value: Any) -> bytes:
    """sqlitedict's value codec: bytes pass through untouched, anything else is refused.

    Used for both directions, so no value is ever pickled on write or unpickled on read.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"ContextStore stores bytes only, got {type(value).__name__}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _header(ctx: HCContext, layer_metas: list[dict[str, int]], context_id: str, tag: str,
            checkpoint_id: str, fingerprints: tuple[str, str]) -> dict[str, Any]:
    """Everything but the tensor manifest; call with ``ctx._lock`` held."""
    return {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "context_id": context_id,
        "tag": tag,
        "created": datetime.now(timezone.utc).isoformat(),
        "model_name": getattr(ctx.model.config, "_name_or_path", "") or ctx.model.config.model_type,
        "model_fingerprint": fingerprints[0],
        "tokenizer_fingerprint": fingerprints[1],
        "config": ctx.config.to_dict(),
        "token_ids": list(ctx.token_ids),
        "tokens_prefilled": ctx.tokens_prefilled,
        "turn_open": ctx.turn_open,
        "layers": [dict(meta) for meta in layer_metas],
    }


def _fingerprints(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    return model_fingerprint(model), tokenizer_fingerprint(tokenizer)


def _check_header(header: Any, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a checkpoint this code cannot read or that belongs to another model or tokenizer.

    Runs before any tensor is read, so a wrong model costs one header read, not a full load.
    """
    if not isinstance(header, dict) or not isinstance(header.get("format_version"), int):
        raise CheckpointError(f"{where}: the checkpoint header is damaged (no format_version); "
                              "restore it from a backup or save the context again")
    version = header["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {version} is newer than this hcmemory "
                              f"supports ({FORMAT_VERSION}); upgrade hcmemory to load it")
    if version < 1:
        raise CheckpointError(f"{where}: unknown checkpoint format version {version}")
    model_fp, tokenizer_fp = _fingerprints(model, tokenizer)
    if header.get("model_fingerprint") != model_fp:
        raise ValueError(f"{where}: checkpoint was made with model {header.get('model_name')!r} "
                         f"(fingerprint {str(header.get('model_fingerprint'))[:12]}…), not the model given "
                         f"(fingerprint {model_fp[:12]}…); load it with that model")
    if header.get("tokenizer_fingerprint") != tokenizer_fp:
        raise ValueError(f"{where}: checkpoint was made with a different tokenizer than the one given "
                         f"(fingerprint {str(header.get('tokenizer_fingerprint'))[:12]}… vs {tokenizer_fp[:12]}…); "
                         "load it with the tokenizer of the model it was made with")


def _restore(header: dict[str, Any], tensors: dict[str, torch.Tensor], model: torch.nn.Module,
             tokenizer: PreTrainedTokenizerBase, where: str) -> HCContext:
    """Build the context from a checked header and its tensors, without prefilling anything."""
    try:
        config = HCConfig.from_dict(header["config"])
        cache = HCCache(model, config, tokenizer, calibrate=False)
        cache.load_state(tensors, header["layers"])
        token_ids = [int(t) for t in header["token_ids"]]
        return HCContext._restore(model, tokenizer, config, header["context_id"], cache, token_ids,
                                  int(header["tokens_prefilled"]), bool(header["turn_open"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the checkpoint does not fit its own header ({exc}); "
                              "restore it from a backup or save the context again") from exc


def _split(tensor: torch.Tensor, chunk_bytes: int) -> tuple[int, list[torch.Tensor]]:
    """(dimension, pieces): rows of ``(heads, rows, ...)`` stores, or dim 0 of 1-D tensors."""
    dim = 1 if tensor.dim() >= 2 else 0
    if tensor.dim() == 0 or tensor.numel() == 0:
        return dim, [tensor]
    row_bytes = tensor.numel() // tensor.shape[dim] * tensor.element_size()
    rows = max(1, chunk_bytes // row_bytes)
    return dim, list(tensor.split(rows, dim))


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------
# Many contexts in one SQLite file
# --------------------------------------------------------------------------------------------


def _meta_key(context_id: str, tag: str) -> str:
    return f"{_META}{quote(context_id, safe='')}/{quote(tag, safe='')}"


def _chunk_prefix(context_id: str, tag: str) -> str:
    """All chunks of one (context, tag) live under this prefix, whichever checkpoint wrote them."""
    return f"{_CHUNK}{quote(context_id, safe='')}/{quote(tag, safe='')}/"


def _after(prefix: str) -> str:
    """The smallest key above every key starting with ``prefix`` (which ends in ``/``)."""
    return prefix[:-1] + chr(ord("/") + 1)


class ContextStore:
    """Checkpoints of many contexts, each under one or more tags, in one SQLite file.

    One process should write a store at a time (SQLite serializes writers; sqlitedict reports
    their errors late). Within a process a store may be shared by threads.
    """

    def __init__(self, path: str | os.PathLike[str], *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be >= 1")
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._lock = threading.RLock()
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent} does not exist; create the directory for the store first")
        db = None
        try:
            # Probe first: on a damaged file sqlitedict's worker thread dies with a stray traceback.
            with closing(sqlite3.connect(self.path)) as probe:
                probe.execute("SELECT name FROM sqlite_master").fetchall()
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
        context_id = ctx.context_id if context_id is None else context_id
        tag = DEFAULT_TAG if tag is None else tag
        for name, value in (("context_id", context_id), ("tag", tag)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        fingerprints = _fingerprints(ctx.model, ctx.tokenizer)
        checkpoint_id = uuid.uuid4().hex
        prefix = _chunk_prefix(context_id, tag)
        new_chunks = f"{prefix}{checkpoint_id}/"
        started = time.perf_counter()
        with self._lock, self._database_errors():
            try:
                with ctx._lock:  # the tensors are views of live buffers: hold still until copied out
                    tensors, layer_metas = ctx.cache.state()
                    header = _header(ctx, layer_metas, context_id, tag, checkpoint_id, fingerprints)
                    header["tensors"], nbytes = self._write_chunks(tensors, new_chunks)
                self._keys(_META, _META)  # round trip: raises now if any chunk write failed
                self._db[_meta_key(context_id, tag)] = json.dumps(header).encode()
                self._delete_range(prefix, new_chunks)
                self._delete_range(_after(new_chunks), _after(prefix))
                self._db.commit(blocking=True)
            except BaseException:
                self._rollback()
                raise
        elapsed = time.perf_counter() - started
        log.info("saved context %r tag %r: %d tokens, %.1f MB in %.2f s", context_id, tag, len(header["token_ids"]),
                 nbytes / 1e6, elapsed)
        return checkpoint_id

    def load(self, context_id: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             tag: str | None = None) -> HCContext:
        """Rebuild the context saved under ``(context_id, tag)`` for ``model``, without re-prefilling.

        Raises ``CheckpointNotFoundError`` (a ``KeyError``) when there is no such checkpoint,
        ``ValueError`` when it was made with another model or tokenizer, and ``CheckpointError``
        when it is damaged or from a newer hcmemory. Never changes the store.
        """
        tag = DEFAULT_TAG if tag is None else tag
        where = f"{self.path} [{context_id!r}, tag {tag!r}]"
        started = time.perf_counter()
        with self._lock, self._database_errors():
            header = self._header(context_id, tag)
            _check_header(header, model, tokenizer, where)
            tensors, nbytes = self._read_chunks(header, where)
        ctx = _restore(header, tensors, model, tokenizer, where)
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
        found = []
        with self._lock, self._database_errors():
            for tag in self._tags(context_id):
                header = self._header(context_id, tag)
                stored = sum(chunk["bytes"] for spec in header.get("tensors", {}).values() for chunk in spec["chunks"])
                found.append({"tag": tag, "created": header.get("created"), "tokens": len(header.get("token_ids", ())),
                              "id": header.get("checkpoint_id"), "bytes": stored})
        return sorted(found, key=lambda item: str(item["created"]))

    def exists(self, context_id: str, tag: str | None = None) -> bool:
        """Whether a checkpoint is stored under ``(context_id, tag)``."""
        with self._lock, self._database_errors():
            return _meta_key(context_id, DEFAULT_TAG if tag is None else tag) in self._db

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` has any checkpoint."""
        with self._lock, self._database_errors():
            return isinstance(context_id, str) and bool(self._tags(context_id))

    def delete(self, context_id: str, tag: str | None = None) -> None:
        """Remove one checkpoint, or every checkpoint of the context when ``tag`` is None."""
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
                blob = safetensors.torch.save({_CHUNK_TENSOR: _host_copy(piece)})
                key = f"{prefix}{index:08d}"
                self._db[key] = blob
                chunks.append({"key": key, "rows": int(piece.shape[dim]) if piece.dim() else 1,
                               "bytes": len(blob), "sha256": _sha256(blob)})
                index += 1
                total += len(blob)
            manifest[name] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape), "dim": dim,
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
        if _sha256(blob) != chunk["sha256"]:
            raise CheckpointError(f"{where}: chunk {chunk['key']!r} is corrupted (sha256 mismatch); restore the "
                                  "store from a backup or save the context again")
        try:
            return safetensors.torch.load(blob)[_CHUNK_TENSOR]
        except (safetensors.SafetensorError, KeyError) as exc:
            raise CheckpointError(f"{where}: chunk {chunk['key']!r} cannot be parsed ({exc})") from exc


# --------------------------------------------------------------------------------------------
# One context in one file
# --------------------------------------------------------------------------------------------


def save_file(ctx: HCContext, path: str | os.PathLike[str]) -> None:
    """Write ``ctx`` to one safetensors file, atomically (a crash leaves the old file or none).

    The JSON header goes into the safetensors metadata; each tensor's sha256 is in it too,
    because safetensors itself checks structure but not content.
    """
    path = Path(path)
    fingerprints = _fingerprints(ctx.model, ctx.tokenizer)
    started = time.perf_counter()
    with ctx._lock:
        state, layer_metas = ctx.cache.state()
        header = _header(ctx, layer_metas, ctx.context_id, DEFAULT_TAG, uuid.uuid4().hex, fingerprints)
        tensors, storages = {}, set()
        for name, tensor in state.items():
            copy = _host_copy(tensor)
            if copy.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
                copy = copy.clone()
            storages.add(copy.untyped_storage().data_ptr())
            tensors[name] = copy
    header["tensors"] = {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                                "sha256": _sha256(_tensor_bytes(t))} for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={_FILE_METADATA_KEY: json.dumps(header)})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    log.info("saved context %r to %s: %.1f MB in %.2f s", ctx.context_id, path, path.stat().st_size / 1e6,
             time.perf_counter() - started)


def load_file(path: str | os.PathLike[str], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> HCContext:
    """Rebuild a context written by ``save_file`` (same errors as ``ContextStore.load``)."""
    path = Path(path)
    where = str(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_FILE_METADATA_KEY)
            if raw is None:
                raise CheckpointError(f"{where}: a safetensors file, but not an hcmemory checkpoint")
            header = json.loads(raw)
            _check_header(header, model, tokenizer, where)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (safetensors.SafetensorError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: the checkpoint file is damaged or truncated ({exc}); "
                              "restore it from a backup or save the context again") from exc
    manifest = header.get("tensors")
    if not isinstance(manifest, dict) or set(manifest) != set(tensors):
        raise CheckpointError(f"{where}: the file's tensors do not match its header")
    for name, tensor in tensors.items():
        if _sha256(_tensor_bytes(tensor)) != manifest[name].get("sha256"):
            raise CheckpointError(f"{where}: tensor {name!r} is corrupted (sha256 mismatch); "
                                  "restore it from a backup or save the context again")
    return _restore(header, tensors, model, tokenizer, where)


# --------------------------------------------------------------------------------------------
# Hot contexts in memory, the rest in a store
# --------------------------------------------------------------------------------------------


class ContextPool:
    """Live contexts under a memory cap, least recently used spilled to ``store`` and reloaded on access.

    The cap counts what the contexts' caches hold (``host_bytes + device_bytes``) and is
    enforced on every ``get``: while the live total exceeds ``max_host_bytes``, the least
    recently used context other than the one just asked for is saved (tag ``"latest"``) and
    dropped. A context handed out by ``get`` must not be used after it has been spilled (it
    would diverge from the stored copy): call ``get`` again instead of keeping references.
    All methods take one lock, so a pool can be shared by threads.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, store: ContextStore,
                 max_host_bytes: int, config: HCConfig | str | None = None) -> None:
        if max_host_bytes < 0:
            raise ValueError(f"max_host_bytes={max_host_bytes} must be >= 0")
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_host_bytes = max_host_bytes
        self.config = config
        self._live: OrderedDict[str, HCContext] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, context_id: str) -> HCContext:
        """The live context ``context_id``: reloaded from the store if spilled, created if unknown."""
        with self._lock:
            ctx = self._live.get(context_id)
            if ctx is not None:
                self._live.move_to_end(context_id)
            else:
                if self.store.exists(context_id):
                    ctx = self.store.load(context_id, self.model, self.tokenizer)
                else:
                    ctx = HCContext(self.model, self.tokenizer, self.config, context_id=context_id)
                self._live[context_id] = ctx
            self._enforce_cap()
            return ctx

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` is live or stored (``get`` would not create it)."""
        with self._lock:
            return context_id in self._live or (isinstance(context_id, str) and self.store.exists(context_id))

    @property
    def live_ids(self) -> list[str]:
        """Live context ids, least recently used first."""
        with self._lock:
            return list(self._live)

    def live_bytes(self) -> int:
        """What the live contexts hold, as the cap counts it."""
        with self._lock:
            return sum(self._bytes(ctx) for ctx in self._live.values())

    def spill(self, context_id: str) -> None:
        """Save a live context to the store and drop it from memory."""
        with self._lock:
            ctx = self._live.get(context_id)
            if ctx is None:
                raise KeyError(f"context {context_id!r} is not live; live contexts: {list(self._live)}")
            self.store.save(ctx)
            del self._live[context_id]
            log.info("spilled context %r (%d tokens) to %s", context_id, len(ctx), self.store.path)

    def close(self) -> None:
        """Save every live context and drop them; the store stays open (it belongs to the caller)."""
        with self._lock:
            for context_id in list(self._live):
                self.spill(context_id)

    def __enter__(self) -> "ContextPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _bytes(ctx: HCContext) -> int:
        stats = ctx.stats()
        return stats.host_bytes + stats.device_bytes

    def _enforce_cap(self) -> None:
        """Spill least recently used contexts until under the cap; the most recent one always stays."""
        sizes = {context_id: self._bytes(ctx) for context_id, ctx in self._live.items()}
        total = sum(sizes.values())
        for context_id in list(self._live)[:-1]:
            if total <= self.max_host_bytes:
                break
            self.spill(context_id)
            total -= sizes[context_id]
        if total > self.max_host_bytes:
            log.warning("context %r alone holds %d bytes, over the pool cap of %d", next(reversed(self._live)),
                        total, self.max_host_bytes)
