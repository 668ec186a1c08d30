"""``SQLiteBackend``: a store in one SQLite file, the embedded default.

Tables (layout version 2):

* ``checkpoints (namespace, context_id, tag) -> checkpoint_id, version, header``;
* ``chunks (namespace, sha256) -> data``: content-addressed, each distinct chunk once per namespace;
* ``checkpoint_chunks (checkpoint_id, seq) -> namespace, sha256``: which chunks a checkpoint is made of;
* ``version_counter``: one row, the last version handed out (versions never repeat, deletes included).

Why it is built this way:

* **One writer, whole transactions.** One connection, shared by threads under a lock; every save
  and delete is one ``BEGIN IMMEDIATE`` transaction (the write lock up front, so a writer never fails
  halfway on a lock another connection holds), WAL so that other processes read while one writes,
  ``synchronous=FULL`` so that a commit survives a power cut.  Because SQLite has one writer at a
  time, the compare-and-set of a version and the collection of unreferenced chunks need no more than
  that transaction.
* **Layouts migrate forward.** ``PRAGMA user_version`` is the layout version and ``MIGRATIONS`` the
  SQL steps from each version to the next, applied in order in one transaction when a file is opened;
  a newer layout is refused, not misread.  A file written before version 1 (sqlitedict's one
  key/value table ``hcmemory``) is converted on open, in one transaction, after a copy of it is
  kept as ``<name>.v0.bak``.  A migrated file's rows go to the namespace it is opened with: such a
  file held one namespace's checkpoints.
* **Its own file, private.** A file holding other tables is refused rather than written into; a new
  file is created 0600 (SQLite gives its ``-wal``/``-shm`` files the same mode): it holds conversations.
* **Trouble is told apart from damage.** Busy and disk errors become ``TimeoutError`` and
  ``OSError``; only what is left is reported as a damaged file.  Python 3.11+ gives SQLite's result
  code; on 3.10 the message is read instead, so a busy database is never called damaged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import safetensors
import safetensors.torch
import torch

from ..checkpoint import MAX_HEADER_BYTES, CheckpointError, damaged, parse_header, sha256
from .base import Chunk, StaleCheckpointError, StoredCheckpoint, WriteResult
from .chunking import CHUNK_BYTES, encode_checkpoint

log = logging.getLogger(__name__)

_APPLICATION_ID = 0x48434D53
"""``PRAGMA application_id`` of an hcmemory store ("HCMS"), so a file can be told apart from other
SQLite databases without guessing from table names."""
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: a header row per context id and tag, chunks per checkpoint id
        """CREATE TABLE checkpoints (
            context_id TEXT NOT NULL,
            tag TEXT NOT NULL,
            checkpoint_id TEXT NOT NULL UNIQUE,
            header BLOB NOT NULL,
            PRIMARY KEY (context_id, tag)
        )""",
        """CREATE TABLE chunks (
            checkpoint_id TEXT NOT NULL REFERENCES checkpoints (checkpoint_id)
                ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (checkpoint_id, seq)
        )""",
    ),
    (  # 2: namespaces, versions, content-addressed chunks
        "ALTER TABLE checkpoints RENAME TO checkpoints_v1",
        "ALTER TABLE chunks RENAME TO chunks_v1",
        """CREATE TABLE checkpoints (
            namespace TEXT NOT NULL,
            context_id TEXT NOT NULL,
            tag TEXT NOT NULL,
            checkpoint_id TEXT NOT NULL UNIQUE,
            version INTEGER NOT NULL,
            header BLOB NOT NULL,
            PRIMARY KEY (namespace, context_id, tag)
        )""",
        """CREATE TABLE chunks (
            namespace TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (namespace, sha256)
        )""",
        # A chunk row may be written before the checkpoint row that refers to it (its manifest needs the
        # chunks' hashes), so that reference is checked at commit; a chunk still referred to cannot go.
        """CREATE TABLE checkpoint_chunks (
            checkpoint_id TEXT NOT NULL REFERENCES checkpoints (checkpoint_id)
                ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
            seq INTEGER NOT NULL,
            namespace TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (checkpoint_id, seq),
            FOREIGN KEY (namespace, sha256) REFERENCES chunks (namespace, sha256)
        )""",
        "CREATE INDEX checkpoint_chunks_by_chunk ON checkpoint_chunks (namespace, sha256)",
        "CREATE TABLE version_counter (last INTEGER NOT NULL)",
        "INSERT INTO checkpoints SELECT :namespace, context_id, tag, checkpoint_id, rowid, header FROM checkpoints_v1",
        "INSERT OR IGNORE INTO chunks SELECT :namespace, hcmemory_sha256(data), data FROM chunks_v1",
        "INSERT INTO checkpoint_chunks SELECT checkpoint_id, seq, :namespace, hcmemory_sha256(data) FROM chunks_v1",
        "INSERT INTO version_counter SELECT coalesce(max(version), 0) FROM checkpoints",
        "DROP TABLE chunks_v1",
        "DROP TABLE checkpoints_v1",
    ),
)
"""``MIGRATIONS[n]`` turns layout version ``n`` into ``n + 1`` (a new file starts at 0).  Statements may
use ``:namespace`` (the namespace the file is opened with) and ``hcmemory_sha256(blob)``."""
SCHEMA_VERSION = len(MIGRATIONS)
"""``PRAGMA user_version`` of the layout this code reads and writes."""
_LEGACY_TABLE = "hcmemory"
"""The single key/value table of stores written before layout version 1 (through sqlitedict)."""
_BUSY_TIMEOUT_S = 30.0
_BUSY = {5, 6}
"""SQLite's primary result codes BUSY and LOCKED (spelled out: ``sqlite3.SQLITE_*`` needs Python 3.11)."""
_OS_ERRORS = {13: "the disk is full", 10: "a disk I/O error", 8: "the file is read-only",
              14: "the file cannot be opened", 3: "permission denied"}
"""SQLite's primary result codes FULL, IOERR, READONLY, CANTOPEN and PERM: trouble with the disk, not damage."""
_CODES_BY_MESSAGE = {"database is locked": 5, "database table is locked": 6, "database schema is locked": 6,
                     "database or disk is full": 13, "disk i/o error": 10, "readonly database": 8,
                     "unable to open database file": 14}
"""SQLite's messages for the codes above, for Pythons whose exceptions carry no ``sqlite_errorcode`` (3.10)."""


def primary_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of ``exc``: from ``sqlite_errorcode`` (Python 3.11+), else from its
    message; 0 when neither tells."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF  # the primary code of an extended one
    message = str(exc).lower()
    return next((code for text, code in _CODES_BY_MESSAGE.items() if text in message), 0)


class _SQLiteCheckpoint:
    """``StoredCheckpoint`` over the connection of an open read transaction."""

    _JOIN = ("FROM checkpoint_chunks r JOIN chunks c ON c.namespace = r.namespace AND c.sha256 = r.sha256 "
             "WHERE r.checkpoint_id = ?")

    def __init__(self, conn: sqlite3.Connection, checkpoint_id: str, version: int, header: bytes) -> None:
        self._conn, self.checkpoint_id, self.version, self.header = conn, checkpoint_id, version, header

    def chunk_sizes(self) -> dict[int, int]:
        return dict(self._conn.execute(f"SELECT r.seq, length(c.data) {self._JOIN}", (self.checkpoint_id,)))

    def chunk(self, seq: int) -> bytes | None:
        row = self._conn.execute(f"SELECT c.data {self._JOIN} AND r.seq = ?", (self.checkpoint_id, seq)).fetchone()
        return None if row is None else row[0]


class SQLiteBackend:
    """``StoreBackend`` for one namespace of one SQLite file."""

    def __init__(self, path: Path, namespace: str) -> None:
        self.path = path
        self.location = str(path)
        self.namespace = namespace
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # an empty file is an empty database
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.create_function("hcmemory_sha256", 1, lambda data: hashlib.sha256(data).hexdigest(), deterministic=True)
        try:
            with self._errors(opening=True):
                legacy = self._check_file(conn)
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._conn = conn
                if legacy:
                    self._migrate_legacy()
                conn.execute("PRAGMA journal_mode=WAL")
                self._migrate()
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _check_file(self, conn: sqlite3.Connection) -> bool:
        """Refuse a database that is not an hcmemory store of a layout this version reads; True when it
        is a store of the layout before version 1, to be converted.  Read-only: nothing is written to a
        file that is refused."""
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                        if not row[0].startswith("sqlite_"))
        if application_id == _APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise CheckpointError(f"{self.path}: store layout version {version} is newer than this hcmemory "
                                      f"reads ({SCHEMA_VERSION}); upgrade hcmemory to open it")
            return False
        if tables == [_LEGACY_TABLE]:
            return True
        if tables:
            raise ValueError(f"{self.path} is a SQLite database holding other tables ({', '.join(tables[:5])}); "
                             "an hcmemory store needs a file of its own — pass another path")
        return False

    def _migrate(self) -> None:
        """Bring the file to ``SCHEMA_VERSION``, in one transaction (two processes opening it at once:
        the second finds the work done)."""
        with self._transaction("IMMEDIATE") as conn:
            self._apply_migrations(conn)

    def _apply_migrations(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if conn.execute("PRAGMA application_id").fetchone()[0] != _APPLICATION_ID:
            version = 0
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement, {"namespace": self.namespace})
        if version and version < SCHEMA_VERSION:  # a new file is simply created at the current layout
            log.info("%s: store layout migrated from version %d to %d", self.path, version, SCHEMA_VERSION)
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_legacy(self) -> None:
        """Convert a store of sqlitedict's layout (one key/value table) to this one, in one transaction,
        after copying the file to ``<name>.v0.bak``; the copy is removed again if the conversion fails."""
        backup = self.path.with_name(self.path.name + ".v0.bak")
        if backup.exists():
            raise CheckpointError(f"{self.path} is a store of an earlier hcmemory layout to be converted, but "
                                  f"{backup} (its copy from an earlier attempt?) is in the way; move it away and "
                                  "open the store again")
        conn = self._connection()
        os.close(os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            with sqlite3.connect(backup) as copy:
                conn.backup(copy)
            copy.close()
            with self._transaction("IMMEDIATE"):
                if [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] \
                        != [_LEGACY_TABLE]:
                    raise CheckpointError(f"{self.path} changed while it was being converted; open it again")
                self._apply_migrations(conn)
                count = 0
                for context_id, tag, checkpoint_id, chunks, header in _legacy_checkpoints(conn, self.location):
                    self._write(conn, context_id, tag, checkpoint_id, chunks, header, None)
                    count += 1
                conn.execute(f'DROP TABLE "{_LEGACY_TABLE}"')
        except BaseException:
            backup.unlink(missing_ok=True)
            raise
        log.warning("%s: converted %d checkpoints from the key/value layout of earlier hcmemory releases to "
                    "layout version %d; the original file is kept as %s", self.path, count, SCHEMA_VERSION, backup)

    # --- transactions and errors ---------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"the store {self.path} is closed; open it again to use it")
        return self._conn

    @contextmanager
    def _transaction(self, mode: str = "") -> Iterator[sqlite3.Connection]:
        """``with conn:`` semantics with an explicit ``BEGIN``: committed when the block succeeds, rolled
        back on any error or interrupt."""
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
            code = primary_code(exc)
            if code in _BUSY:
                raise TimeoutError(f"{self.path}: another connection kept the store locked for over "
                                   f"{_BUSY_TIMEOUT_S:.0f} s ({exc}); retry when it is done") from exc
            if code in _OS_ERRORS:
                raise OSError(f"{self.path}: {_OS_ERRORS[code]} ({exc}); nothing was changed") from exc
            problem = "not a readable hcmemory store" if opening else "the store file is damaged"
            raise damaged(self.location, f"{problem} ({exc})", "move it away to start a new store") from exc

    # --- StoreBackend --------------------------------------------------------------------------
    def save(self, context_id: str, tag: str, checkpoint_id: str, chunks: Iterable[Chunk],
             header: Callable[[], bytes], expected_version: int | None) -> WriteResult:
        with self._errors(), self._transaction("IMMEDIATE") as conn:
            return self._write(conn, context_id, tag, checkpoint_id, chunks, header, expected_version)

    def _write(self, conn: sqlite3.Connection, context_id: str, tag: str, checkpoint_id: str,
               chunks: Iterable[Chunk], header: Callable[[], bytes], expected_version: int | None) -> WriteResult:
        """The body of ``save``, inside the caller's write transaction."""
        ns = self.namespace
        current = conn.execute("SELECT version, checkpoint_id FROM checkpoints WHERE namespace = ? AND "
                               "context_id = ? AND tag = ?", (ns, context_id, tag)).fetchone()
        if expected_version is not None and (current[0] if current else 0) != expected_version:
            raise StaleCheckpointError(f"{self.location} [{context_id!r}, tag {tag!r}]", expected_version,
                                       current[0] if current else 0)
        new_chunks = new_bytes = 0
        refs = []
        for seq, (digest, data) in enumerate(chunks):
            if conn.execute("SELECT 1 FROM chunks WHERE namespace = ? AND sha256 = ?", (ns, digest)).fetchone() is None:
                conn.execute("INSERT INTO chunks (namespace, sha256, data) VALUES (?, ?, ?)", (ns, digest, data))
                new_chunks += 1
                new_bytes += memoryview(data).nbytes
            refs.append((checkpoint_id, seq, ns, digest))
        released: list[str] = []
        if current is not None:
            released = [row[0] for row in conn.execute("SELECT sha256 FROM checkpoint_chunks WHERE checkpoint_id = ?",
                                                       (current[1],))]
            conn.execute("DELETE FROM checkpoints WHERE checkpoint_id = ?", (current[1],))  # its refs cascade
        conn.execute("UPDATE version_counter SET last = last + 1")
        version = conn.execute("SELECT last FROM version_counter").fetchone()[0]
        conn.execute("INSERT INTO checkpoints (namespace, context_id, tag, checkpoint_id, version, header) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (ns, context_id, tag, checkpoint_id, version, header()))
        conn.executemany("INSERT INTO checkpoint_chunks (checkpoint_id, seq, namespace, sha256) VALUES (?, ?, ?, ?)",
                         refs)
        self._collect(conn, released)
        return WriteResult(version, new_chunks, new_bytes)

    def _collect(self, conn: sqlite3.Connection, candidates: Iterable[str]) -> None:
        """Delete the chunks among ``candidates`` that no checkpoint references any more."""
        conn.executemany("DELETE FROM chunks WHERE namespace = ? AND sha256 = ? AND NOT EXISTS (SELECT 1 FROM "
                         "checkpoint_chunks r WHERE r.namespace = chunks.namespace AND r.sha256 = chunks.sha256)",
                         [(self.namespace, digest) for digest in set(candidates)])

    @contextmanager
    def read(self, context_id: str, tag: str) -> Iterator[StoredCheckpoint | None]:
        with self._errors(), self._transaction() as conn:
            row = conn.execute("SELECT checkpoint_id, version, substr(header, 1, ?) FROM checkpoints "
                               "WHERE namespace = ? AND context_id = ? AND tag = ?",
                               (MAX_HEADER_BYTES + 1, self.namespace, context_id, tag)).fetchone()
            yield None if row is None else _SQLiteCheckpoint(conn, *row)

    def headers(self, context_id: str | None = None, tag: str | None = None) -> list[tuple[str, str, int, bytes]]:
        with self._errors(), self._lock:
            return self._connection().execute(
                "SELECT context_id, tag, version, substr(header, 1, :limit) FROM checkpoints WHERE namespace = :ns "
                "AND (:context_id IS NULL OR context_id = :context_id) AND (:tag IS NULL OR tag = :tag) "
                "ORDER BY context_id, tag",
                {"limit": MAX_HEADER_BYTES + 1, "ns": self.namespace, "context_id": context_id, "tag": tag}).fetchall()

    def versions(self, context_id: str) -> dict[str, int]:
        with self._errors(), self._lock:
            return dict(self._connection().execute(
                "SELECT tag, version FROM checkpoints WHERE namespace = ? AND context_id = ? ORDER BY tag",
                (self.namespace, context_id)))

    def context_ids(self) -> list[str]:
        with self._errors(), self._lock:
            return [row[0] for row in self._connection().execute(
                "SELECT DISTINCT context_id FROM checkpoints WHERE namespace = ? ORDER BY context_id",
                (self.namespace,))]

    def delete(self, context_id: str, tag: str | None) -> list[str]:
        with self._errors(), self._transaction("IMMEDIATE") as conn:
            which = "WHERE namespace = :ns AND context_id = :context_id AND (:tag IS NULL OR tag = :tag)"
            params = {"ns": self.namespace, "context_id": context_id, "tag": tag}
            tags = [row[0] for row in conn.execute(f"SELECT tag FROM checkpoints {which} ORDER BY tag", params)]
            released = [row[0] for row in conn.execute(
                f"SELECT sha256 FROM checkpoint_chunks WHERE checkpoint_id IN (SELECT checkpoint_id FROM checkpoints "
                f"{which})", params)]
            conn.execute(f"DELETE FROM checkpoints {which}", params)  # and, by the foreign key, their references
            self._collect(conn, released)
            return tags

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _legacy_checkpoints(conn: sqlite3.Connection, location: str
                        ) -> Iterator[tuple[str, str, str, Iterator[Chunk], Callable[[], bytes]]]:
    """Every checkpoint of a sqlitedict-layout store as ``(context_id, tag, checkpoint_id, chunks, header)``
    for ``SQLiteBackend._write``, each chunk checked against the sha256 its old manifest recorded.

    That layout kept a JSON header under ``meta/<context id>/<tag>`` (URL-quoted) and each row chunk as a
    one-tensor safetensors blob (tensor ``rows``) under the key its manifest names.
    """
    for key, value in conn.execute(f"SELECT key, value FROM \"{_LEGACY_TABLE}\" WHERE key >= 'meta/' AND key < 'meta0' "
                                   "ORDER BY key").fetchall():
        parts = key[len("meta/"):].split("/")
        where = f"{location} [{key}]"
        try:
            context_id, tag = map(unquote, parts)
            header = parse_header(value, where)
            manifest = header.pop("tensors")
            tensors = {}
            for name, spec in manifest.items():
                dtype, shape, dim = getattr(torch, spec["dtype"]), list(spec["shape"]), int(spec["dim"])
                pieces = []
                for chunk in spec["chunks"]:
                    row = conn.execute(f'SELECT value FROM "{_LEGACY_TABLE}" WHERE key = ?', (chunk["key"],)).fetchone()
                    if row is None or sha256(row[0]) != chunk["sha256"]:
                        raise ValueError(f"chunk {chunk['key']!r} is missing or corrupted")
                    pieces.append(safetensors.torch.load(row[0])["rows"])
                tensor = torch.cat(pieces, dim) if shape else pieces[0].reshape(())
                if tensor.dtype != dtype or list(tensor.shape) != shape:
                    raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, not {dtype} {shape}")
                tensors[name] = tensor
            checkpoint_id = header["checkpoint_id"]
            if not isinstance(checkpoint_id, str):
                raise ValueError("its checkpoint id is not a string")
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, safetensors.SafetensorError) as exc:
            raise damaged(where, f"this checkpoint of an earlier hcmemory's store cannot be converted ({exc}); the "
                                 "file was left as it was", "delete that entry with the earlier hcmemory") from exc
        chunks, full_header = encode_checkpoint(header, tensors, CHUNK_BYTES)
        yield context_id, tag, checkpoint_id, chunks, full_header
