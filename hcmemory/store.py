"""ContextStore: checkpoints of many contexts, each under one or more tags, in one database.

A checkpoint is a context's ``ContextState`` (``checkpoint.py``: JSON header + tensors).  Loading
rebuilds the context around the stored tensors, so nothing is prefilled again.

``ContextStore`` does everything that is the same whatever holds the bytes: it splits tensors into
chunks, writes the manifest into the header, verifies every chunk on the way back and turns what it
finds into clear errors.  A ``StoreBackend`` only keeps ``(context id, tag) -> header + chunks``
and replaces one such checkpoint atomically.  ``SQLiteBackend`` is the one backend today (one file,
two tables); a server database can implement the same protocol.

Why it is built this way:

* **No pickle.** Headers are UTF-8 JSON and chunks are the tensors' raw bytes, described by the
  header (dtype, shape, rows, sha256): opening a store someone else wrote cannot execute anything.
* **All or nothing.** A save writes every chunk under a new checkpoint id, then replaces the header
  row that points at them (which drops the previous chunks), in one transaction.  An error, a kill
  or a power cut anywhere in between leaves the previous checkpoint whole and no orphan chunks
  (SQLite rolls an unfinished transaction back; ``synchronous=FULL`` makes a commit durable).
* **Size.** Tensors are stored as row chunks (split along the row axis of the ``(heads, rows, ...)``
  stores) of at most ``chunk_bytes``: far below SQLite's 1 GB blob limit, cheap to hash.
* **Untrusted bytes are bounded before they are used.** A header is size- and depth-checked
  before it is parsed (``checkpoint.parse_header``), and every tensor's claimed dtype and shape
  is checked against the byte counts of the chunks actually stored before any buffer is allocated;
  a sha256 per chunk catches flipped bits.  Anything wrong raises ``CheckpointError``.
* **Private.** A new store file is created 0600 (SQLite gives its ``-wal``/``-shm`` files the same
  mode): it holds conversations.
* **Its own file.** A store refuses a SQLite file that holds other tables rather than adding its
  tables to someone else's database.
* **Lock order.** A save copies the context's state (under the context's guard) *before* taking
  the store's lock, so the store never waits for a context while holding its own lock (see
  ``guard.py``).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from .checkpoint import (MAX_HEADER_BYTES, CheckpointError, ContextState, check_compatible, check_version, damaged,
                         dtype_name, encode_header, parse_header, sha256, tensor_bytes, upgraded_config)
from .config import HCConfig, is_int
from .context import HCContext, check_id

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20
"""Most tensor bytes per stored chunk: far below SQLite's ~1 GB blob limit, small enough that
reading and hashing a chunk stays cheap."""
DEFAULT_TAG = "latest"
"""The tag a checkpoint gets when none is given; ``ContextPool`` spills under it."""


class CheckpointNotFoundError(KeyError):
    """No checkpoint under the requested context id (and tag)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class IndexEntry:
    """What one stored checkpoint is, read from its header alone (no tensor is read).

    Enough to decide whether the checkpoint can serve a request — same tokens, same configuration,
    same model and tokenizer — before paying for a load.
    """

    context_id: str
    tag: str
    checkpoint_id: str
    token_ids: tuple[int, ...]
    config: dict[str, Any]
    """``HCConfig.to_dict()`` of the configuration it ran with (completed for older formats), so it
    compares equal to ``config.to_dict()`` of the same configuration."""
    model_fingerprint: str
    tokenizer_fingerprint: str
    created: str


# --------------------------------------------------------------------------------------------
# The backend interface
# --------------------------------------------------------------------------------------------


class StoredCheckpoint(Protocol):
    """One checkpoint as a backend holds it, valid inside ``StoreBackend.read``'s block."""

    checkpoint_id: str
    header: bytes
    """The header's UTF-8 JSON; at most ``MAX_HEADER_BYTES + 1`` bytes of it, which is enough for
    ``parse_header`` to refuse a larger one without anyone holding all of it."""

    def chunk_sizes(self) -> dict[int, int]:
        """Stored byte count of every chunk, by sequence number, without reading the chunks."""

    def chunk(self, seq: int) -> bytes | None:
        """The bytes of chunk ``seq``, or None when there is no such chunk."""


class StoreBackend(Protocol):
    """Where a ``ContextStore`` keeps checkpoints: ``(context_id, tag) -> (checkpoint id, header, chunks)``.

    Every method is atomic, safe to call from several threads, and turns the database's own errors
    into ``CheckpointError`` (damage), ``TimeoutError`` (another writer held the lock too long) or
    ``OSError`` (disk full, read-only, ...).  Headers and chunks are opaque bytes here; what they mean
    is ``ContextStore``'s business.
    """

    location: str
    """Where the data lives, for messages (a file path, a database URL without its password)."""

    def save(self, context_id: str, tag: str, checkpoint_id: str, chunks: Iterable[bytes | memoryview],
             header: Callable[[], bytes]) -> None:
        """Store ``chunks`` (numbered 0, 1, ... in order, consumed once) and then ``header()`` (called after
        the last chunk) as checkpoint ``checkpoint_id``, replacing whatever ``(context_id, tag)`` held,
        chunks included — in one transaction: on any error the previous checkpoint stays as it was."""

    def read(self, context_id: str, tag: str) -> AbstractContextManager[StoredCheckpoint | None]:
        """The checkpoint under ``(context_id, tag)`` (None when there is none), from one consistent
        snapshot for the whole block: a concurrent save cannot swap chunks under the reader."""

    def headers(self, context_id: str | None = None, tag: str | None = None) -> list[tuple[str, str, bytes]]:
        """``(context_id, tag, header)`` of every checkpoint, or of those of one context / one tag;
        headers truncated as in ``StoredCheckpoint.header``; sorted by context id, then tag."""

    def tags(self, context_id: str) -> list[str]:
        """The tags ``context_id`` has checkpoints under, sorted (empty when none)."""

    def context_ids(self) -> list[str]:
        """Every context id with at least one checkpoint, sorted."""

    def delete(self, context_id: str, tag: str | None) -> list[str]:
        """Remove one checkpoint, or all of the context's when ``tag`` is None, with their chunks, in one
        transaction; returns the tags removed (empty when there was nothing to remove)."""

    def close(self) -> None:
        """Release the database; every method afterwards raises ``ValueError``."""


# --------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------

_APPLICATION_ID = 0x48434D53
"""``PRAGMA application_id`` of an hcmemory store ("HCMS"), so a file can be told apart from other
SQLite databases without guessing from table names."""
SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the layout below; a newer one is refused, not misread."""
_SCHEMA = (
    """CREATE TABLE checkpoints (
        context_id TEXT NOT NULL,
        tag TEXT NOT NULL,
        checkpoint_id TEXT NOT NULL UNIQUE,
        header BLOB NOT NULL,
        PRIMARY KEY (context_id, tag)
    )""",
    # Chunks may be written before the header row they belong to (its manifest needs their hashes),
    # so the reference is checked at commit; deleting a header row deletes its chunks.
    """CREATE TABLE chunks (
        checkpoint_id TEXT NOT NULL REFERENCES checkpoints (checkpoint_id)
            ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (checkpoint_id, seq)
    )""",
)
_LEGACY_TABLE = "hcmemory"
"""The single key/value table of stores written by hcmemory before this layout (through sqlitedict)."""
_BUSY_TIMEOUT_S = 30.0
_BUSY = {5, 6}
"""SQLite's primary result codes BUSY and LOCKED (spelled out: ``sqlite3.SQLITE_*`` needs Python 3.11)."""
_OS_ERRORS = {13: "the disk is full", 10: "a disk I/O error", 8: "the file is read-only",
              14: "the file cannot be opened", 3: "permission denied"}
"""SQLite's primary result codes FULL, IOERR, READONLY, CANTOPEN and PERM: trouble with the disk, not damage."""


class _SQLiteCheckpoint:
    """``StoredCheckpoint`` over the connection of an open read transaction."""

    def __init__(self, conn: sqlite3.Connection, checkpoint_id: str, header: bytes) -> None:
        self._conn, self.checkpoint_id, self.header = conn, checkpoint_id, header

    def chunk_sizes(self) -> dict[int, int]:
        return dict(self._conn.execute("SELECT seq, length(data) FROM chunks WHERE checkpoint_id = ?",
                                       (self.checkpoint_id,)))

    def chunk(self, seq: int) -> bytes | None:
        row = self._conn.execute("SELECT data FROM chunks WHERE checkpoint_id = ? AND seq = ?",
                                 (self.checkpoint_id, seq)).fetchone()
        return None if row is None else row[0]


class SQLiteBackend:
    """``StoreBackend`` in one SQLite file: tables ``checkpoints`` (a header row per context id and tag)
    and ``chunks`` (tensor bytes per checkpoint id and sequence number).

    One connection, shared by threads under a lock (SQLite runs one writer at a time anyway), in WAL
    mode so that other processes can read while one writes; a writer waits up to 30 s for another.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._lock = threading.RLock()
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # an empty file is an empty database
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            with self._errors(opening=True):
                self._check_file(conn)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._conn: sqlite3.Connection | None = conn
                self._create_schema()
        except BaseException:
            conn.close()
            raise

    def _check_file(self, conn: sqlite3.Connection) -> None:
        """Refuse a database that is not an hcmemory store of a layout this version reads.

        Read-only: nothing is written to a file that is refused.
        """
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                        if not row[0].startswith("sqlite_"))
        if application_id == _APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise CheckpointError(f"{self.path}: store layout version {version} is newer than this hcmemory "
                                      f"reads ({SCHEMA_VERSION}); upgrade hcmemory to open it")
            return
        if tables == [_LEGACY_TABLE]:
            raise CheckpointError(
                f"{self.path} is a store written by an earlier hcmemory (one key/value table), which this version "
                "does not read. To keep its contexts: with the earlier hcmemory, save each one to a file "
                "(store.load(id, model, tokenizer).save(f'{id}.hcm')); then, with this one, add them to a new "
                "store (ContextStore(new_path).save(HCContext.load(f'{id}.hcm', model, tokenizer))). "
                "Or move the file away to start a new store")
        if tables:
            raise ValueError(f"{self.path} is a SQLite database holding other tables ({', '.join(tables[:5])}); "
                             "an hcmemory store needs a file of its own — pass another path")

    def _create_schema(self) -> None:
        """Turn an empty database into an empty store, once, in one transaction (two processes opening
        a new file at once: the second finds the schema already there)."""
        with self._transaction("IMMEDIATE") as conn:
            if conn.execute("PRAGMA application_id").fetchone()[0] == _APPLICATION_ID:
                return
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- transactions and errors ---------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"the store {self.path} is closed; open it again to use it")
        return self._conn

    @contextmanager
    def _transaction(self, mode: str = "") -> Iterator[sqlite3.Connection]:
        """``with conn:`` semantics with an explicit ``BEGIN``: committed when the block succeeds, rolled
        back on any error or interrupt.  ``IMMEDIATE`` takes the write lock up front, so a writer never
        fails halfway on a lock another connection holds."""
        with self._lock:
            conn = self._connection()
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:  # the block's own error is the one to report
                        log.warning("could not roll back a transaction on %s", self.path, exc_info=True)
                raise

    @contextmanager
    def _errors(self, opening: bool = False) -> Iterator[None]:
        """Turn SQLite's errors into ones that say what happened to the file and what to do."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
            if code in _BUSY:
                raise TimeoutError(f"{self.path}: another connection kept the store locked for over "
                                   f"{_BUSY_TIMEOUT_S:.0f} s ({exc}); retry when it is done") from exc
            if code in _OS_ERRORS:
                raise OSError(f"{self.path}: {_OS_ERRORS[code]} ({exc}); nothing was changed") from exc
            problem = "not a readable hcmemory store" if opening else "the store file is damaged"
            raise damaged(self.location, f"{problem} ({exc})", "move it away to start a new store") from exc

    # --- StoreBackend --------------------------------------------------------------------------
    def save(self, context_id: str, tag: str, checkpoint_id: str, chunks: Iterable[bytes | memoryview],
             header: Callable[[], bytes]) -> None:
        with self._errors(), self._transaction("IMMEDIATE") as conn:
            for seq, data in enumerate(chunks):
                conn.execute("INSERT INTO chunks (checkpoint_id, seq, data) VALUES (?, ?, ?)",
                             (checkpoint_id, seq, data))
            conn.execute("DELETE FROM checkpoints WHERE context_id = ? AND tag = ?", (context_id, tag))
            conn.execute("INSERT INTO checkpoints (context_id, tag, checkpoint_id, header) VALUES (?, ?, ?, ?)",
                         (context_id, tag, checkpoint_id, header()))

    @contextmanager
    def read(self, context_id: str, tag: str) -> Iterator[StoredCheckpoint | None]:
        with self._errors(), self._transaction() as conn:
            row = conn.execute("SELECT checkpoint_id, substr(header, 1, ?) FROM checkpoints "
                               "WHERE context_id = ? AND tag = ?", (MAX_HEADER_BYTES + 1, context_id, tag)).fetchone()
            yield None if row is None else _SQLiteCheckpoint(conn, row[0], row[1])

    def headers(self, context_id: str | None = None, tag: str | None = None) -> list[tuple[str, str, bytes]]:
        with self._errors(), self._lock:
            return self._connection().execute(
                "SELECT context_id, tag, substr(header, 1, :limit) FROM checkpoints WHERE (:context_id IS NULL OR "
                "context_id = :context_id) AND (:tag IS NULL OR tag = :tag) ORDER BY context_id, tag",
                {"limit": MAX_HEADER_BYTES + 1, "context_id": context_id, "tag": tag}).fetchall()

    def tags(self, context_id: str) -> list[str]:
        with self._errors(), self._lock:
            return [row[0] for row in self._connection().execute(
                "SELECT tag FROM checkpoints WHERE context_id = ? ORDER BY tag", (context_id,))]

    def context_ids(self) -> list[str]:
        with self._errors(), self._lock:
            return [row[0] for row in self._connection().execute(
                "SELECT DISTINCT context_id FROM checkpoints ORDER BY context_id")]

    def delete(self, context_id: str, tag: str | None) -> list[str]:
        with self._errors(), self._transaction("IMMEDIATE") as conn:
            which = "WHERE context_id = :context_id AND (:tag IS NULL OR tag = :tag)"
            params = {"context_id": context_id, "tag": tag}
            tags = [row[0] for row in conn.execute(f"SELECT tag FROM checkpoints {which} ORDER BY tag", params)]
            conn.execute(f"DELETE FROM checkpoints {which}", params)  # and, by the foreign key, their chunks
            return tags

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


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


def _split(tensor: torch.Tensor, chunk_bytes: int) -> tuple[int, list[torch.Tensor]]:
    """(dimension, pieces): rows of ``(heads, rows, ...)`` stores, or dim 0 of 1-D tensors."""
    dim = 1 if tensor.dim() >= 2 else 0
    if tensor.dim() == 0 or tensor.numel() == 0:
        return dim, [tensor]
    row_bytes = tensor.numel() // tensor.shape[dim] * tensor.element_size()
    rows = max(1, chunk_bytes // row_bytes)
    return dim, list(tensor.split(rows, dim))


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
    """Checkpoints of many contexts, each under one or more tags, in one SQLite file.

    Safe to share between threads, and between processes (SQLite serializes writers; a writer
    waits up to 30 s for another).
    """

    def __init__(self, path: str | os.PathLike[str], *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file path, not {type(path).__name__}")
        if not is_int(chunk_bytes) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes!r} must be an int >= 1")
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory; a store is one SQLite file "
                             f"(e.g. {self.path / 'memory.sqlite'})")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent} does not exist; create the directory for the store first")
        self._backend: StoreBackend = SQLiteBackend(self.path)

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
        started = time.perf_counter()
        header = state.header(tag, checkpoint_id)
        header["context_id"] = context_id
        encode_header(header)  # refuse metadata that could not be read back before writing anything
        manifest: dict[str, Any] = {}
        written = 0

        def chunks() -> Iterator[memoryview]:
            """Each tensor's row chunks in order, filling in the manifest as it goes."""
            nonlocal written
            seq = 0
            for name, tensor in state.tensors.items():
                dim, pieces = _split(tensor, self.chunk_bytes)
                entries = []
                for piece in pieces:
                    data = tensor_bytes(piece)
                    entries.append({"seq": seq, "rows": int(piece.shape[dim]) if piece.dim() else 1,
                                    "sha256": sha256(data)})
                    written += data.nbytes
                    yield data
                    seq += 1
                manifest[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "dim": dim,
                                  "chunks": entries}

        self._backend.save(context_id, tag, checkpoint_id, chunks(),
                           lambda: encode_header({**header, "tensors": manifest}))
        log.info("saved context %r tag %r: %d tokens, %.1f MB in %.2f s", context_id, tag, len(state.token_ids),
                 written / 1e6, time.perf_counter() - started)
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
        where = _where(self._backend.location, context_id, tag)
        started = time.perf_counter()
        with self._backend.read(context_id, tag) as stored:
            if stored is None:
                raise self._not_found(context_id, tag)
            header = parse_header(stored.header, where)
            check_compatible(header, model, tokenizer, where)
            tensors, nbytes = self._read_tensors(stored, header, where)
        ctx = HCContext.from_state(ContextState.from_header(header, tensors, where), model, tokenizer, where)
        log.info("loaded context %r tag %r: %d tokens, %.1f MB in %.2f s", context_id, tag, len(ctx), nbytes / 1e6,
                 time.perf_counter() - started)
        return ctx

    def list(self) -> list[str]:
        """Ids of the contexts that have at least one checkpoint, sorted."""
        return self._backend.context_ids()

    def checkpoints(self, context_id: str) -> list[dict[str, Any]]:
        """The checkpoints of one context, oldest first: tag, created (ISO time), tokens, id, bytes."""
        check_id(context_id)
        found = []
        for _, tag, raw in self._backend.headers(context_id):
            where = _where(self._backend.location, context_id, tag)
            header = parse_header(raw, where)
            stored = sum(spec.nbytes for spec in _tensor_specs(header, None, where))
            found.append({"tag": tag, "created": header.get("created"), "tokens": len(header.get("token_ids", ())),
                          "id": header.get("checkpoint_id"), "bytes": stored})
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
        for context_id, name, raw in self._backend.headers(tag=tag):
            where = _where(self._backend.location, context_id, name)
            try:
                entries[context_id, name] = _index_entry(context_id, name, parse_header(raw, where), where)
            except (CheckpointError, KeyError, TypeError, ValueError) as exc:
                log.warning("left out of the index: %s", exc)
        return entries

    def token_ids(self, context_id: str, tag: str | None = None) -> list[int]:
        """The token ids a checkpoint holds, read from its header alone (no tensor is read)."""
        check_id(context_id)
        tag = _tag(tag)
        where = _where(self._backend.location, context_id, tag)
        found = self._backend.headers(context_id, tag)
        if not found:
            raise self._not_found(context_id, tag)
        ids = parse_header(found[0][2], where).get("token_ids")
        if not (isinstance(ids, list) and all(is_int(t) for t in ids)):
            raise damaged(where, "the checkpoint header has no token ids")
        return ids

    def exists(self, context_id: str, tag: str | None = None) -> bool:
        """Whether a checkpoint is stored under ``(context_id, tag)``."""
        check_id(context_id)
        return _tag(tag) in self._backend.tags(context_id)

    def __contains__(self, context_id: object) -> bool:
        """Whether ``context_id`` has any checkpoint."""
        return isinstance(context_id, str) and bool(self._backend.tags(context_id))

    def delete(self, context_id: str, tag: str | None = None) -> None:
        """Remove one checkpoint, or every checkpoint of the context when ``tag`` is None."""
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
        return f"ContextStore({str(self.path)!r})"

    # --- internals -------------------------------------------------------------------------
    def _not_found(self, context_id: str, tag: str | None) -> CheckpointNotFoundError:
        location = self._backend.location
        tags = self._backend.tags(context_id)
        if tags:
            return CheckpointNotFoundError(f"{location}: context {context_id!r} has no checkpoint tagged {tag!r}; "
                                           f"its tags are {tags}")
        known = self.list()
        shown = ", ".join(map(repr, known[:10])) + (" …" if len(known) > 10 else "")
        return CheckpointNotFoundError(f"{location}: no context {context_id!r} is stored"
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
                if sha256(data) != digest:
                    raise damaged(where, f"chunk {seq} of tensor {spec.name!r} is corrupted (sha256 mismatch)")
                if data:
                    piece = torch.frombuffer(bytearray(data), dtype=spec.dtype).reshape(spec.chunk_shape(rows))
                    (out.narrow(spec.dim, start, rows) if spec.shape else out).copy_(piece)
                start += rows
                total += len(data)
            tensors[spec.name] = out
        return tensors, total


def _index_entry(context_id: str, tag: str, header: dict[str, Any], where: str) -> IndexEntry:
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
    return IndexEntry(context_id, tag, token_ids=tuple(ids), config=config, **fields)
