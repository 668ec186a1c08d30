"""``PostgresBackend``: a store in a PostgreSQL database that many processes, machines and tenants share.

Tables (schema version 1; every name starts with ``hcmemory_`` so a database can hold other things):

* ``hcmemory_checkpoints (namespace, context_id, tag) -> checkpoint_id, version, header``;
* ``hcmemory_chunks (namespace, sha256) -> data``: content-addressed, each distinct chunk once per
  namespace (two conversations with a common prefix share its chunks);
* ``hcmemory_checkpoint_chunks (checkpoint_id, seq) -> namespace, sha256``: which chunks a checkpoint is
  made of; a chunk still referenced cannot be deleted (foreign key);
* ``hcmemory_versions``: a sequence, so versions never repeat, not even after a delete;
* ``hcmemory_schema``: the schema version.  ``MIGRATIONS[n]`` turns version ``n`` into ``n + 1``; the
  first process to connect applies what is missing in one transaction under an advisory lock, so two
  processes setting up an empty database at once cannot both create the tables.

How a save stays correct with many writers (READ COMMITTED, one transaction):

1. *Early refusal.* The stored version is read first: a stale writer is refused before it sends bytes.
2. *Chunks.* For each chunk, ``SELECT ... FOR KEY SHARE`` asks whether the namespace has it (and keeps
   it from being collected until the save commits); only a missing chunk's bytes are sent, with
   ``INSERT ... ON CONFLICT DO NOTHING`` (another writer may be sending the same chunk).
3. *Compare-and-set.* The checkpoint row is locked (``FOR UPDATE``) and its version compared again:
   whoever committed first wins, the other is refused with ``StaleCheckpointError``.  Then the old row
   and its references go, the new row (the header, written after every chunk) and its references come.
4. *Collection.* Chunks only the replaced checkpoint referenced are locked ``FOR UPDATE SKIP LOCKED``
   (skipping those an unfinished save holds) and then, in a later statement whose snapshot sees every
   committed reference, deleted if nothing references them.

Reads run in a REPEATABLE READ, read-only transaction: one snapshot for the header and every chunk.
Connections come from a ``psycopg_pool.ConnectionPool`` shared by every store this process opens on the
same URL (the server opens one store per tenant); each checked before use, so after the database
restarts the next call reconnects.  A database that cannot be reached raises ``ConnectionError`` naming
the URL (never its password) within ``connect_timeout`` seconds (a URL parameter, default 10).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
try:
    import psycopg
    import psycopg.errors
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("a postgresql:// store needs psycopg 3 and psycopg-pool: pip install 'hcmemory[postgres]'") \
        from exc

from ..checkpoint import MAX_HEADER_BYTES, CheckpointError, damaged
from .base import Chunk, StaleCheckpointError, StoredCheckpoint, WriteResult, redacted

log = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1
        """CREATE TABLE hcmemory_checkpoints (
            namespace text NOT NULL,
            context_id text NOT NULL,
            tag text NOT NULL,
            checkpoint_id text NOT NULL UNIQUE,
            version bigint NOT NULL,
            header bytea NOT NULL,
            PRIMARY KEY (namespace, context_id, tag)
        )""",
        """CREATE TABLE hcmemory_chunks (
            namespace text NOT NULL,
            sha256 text NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (namespace, sha256)
        )""",
        # Tensor bytes barely compress: store them out of line without spending CPU on trying.
        "ALTER TABLE hcmemory_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        """CREATE TABLE hcmemory_checkpoint_chunks (
            checkpoint_id text NOT NULL REFERENCES hcmemory_checkpoints (checkpoint_id) ON DELETE CASCADE,
            seq integer NOT NULL,
            namespace text NOT NULL,
            sha256 text NOT NULL,
            PRIMARY KEY (checkpoint_id, seq),
            FOREIGN KEY (namespace, sha256) REFERENCES hcmemory_chunks (namespace, sha256)
        )""",
        "CREATE INDEX hcmemory_checkpoint_chunks_by_chunk ON hcmemory_checkpoint_chunks (namespace, sha256)",
        "CREATE SEQUENCE hcmemory_versions",
    ),
)
"""``MIGRATIONS[n]`` turns schema version ``n`` into ``n + 1`` (an empty database is version 0)."""
SCHEMA_VERSION = len(MIGRATIONS)
_MIGRATION_LOCK = 0x48434D53_00000001
"""The advisory lock key that serializes schema migrations ("HCMS", 1)."""
DEFAULT_CONNECT_TIMEOUT_S = 10
POOL_SIZE = 8
"""Most connections one process keeps open to one database, whatever the number of stores on it."""
_SAVE_ATTEMPTS = 3
"""How often an unconditional save retries the compare-and-set after another writer created the row
between its check and its insert (each retry sees that writer's row and replaces it)."""


class _Database:
    """One connection pool per database, shared by every store (namespace) this process opened on it."""

    _open: dict[str, "_Database"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, conninfo: str, location: str, timeout: float) -> None:
        self.location, self.timeout, self.users = location, timeout, 0
        self.conninfo = conninfo
        self.pool = ConnectionPool(conninfo, min_size=1, max_size=POOL_SIZE, open=False, timeout=timeout,
                                   check=ConnectionPool.check_connection, kwargs={"autocommit": True},
                                   name=f"hcmemory {location}")

    @classmethod
    def acquire(cls, url: str) -> "_Database":
        """The database at ``url``, its schema migrated, its pool opened on first use."""
        conninfo, location, timeout = _conninfo(url)
        with cls._registry_lock:
            database = cls._open.get(conninfo)
            if database is None:
                database = cls(conninfo, location, timeout)
                with _errors(location):
                    migrate(conninfo, location)
                    database.pool.open(wait=False)
                cls._open[conninfo] = database
            database.users += 1
            return database

    def release(self) -> None:
        with self._registry_lock:
            self.users -= 1
            if self.users == 0:
                del self._open[self.conninfo]
                self.pool.close()


def _conninfo(url: str) -> tuple[str, str, float]:
    """``(conninfo, location for messages, connect timeout)`` of a ``postgresql://`` URL."""
    location = redacted(url)
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:  # its message quotes the URL, password included: not chained
        raise ValueError(f"{location} is not a valid PostgreSQL URL ({str(exc).strip().replace(url, location)})") from None
    timeout = params.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    try:
        timeout = max(2, int(timeout))  # libpq's own floor
    except ValueError as exc:
        raise ValueError(f"{location}: connect_timeout={timeout!r} must be a whole number of seconds") from exc
    params.update(connect_timeout=timeout)
    params.setdefault("application_name", "hcmemory")
    return make_conninfo(**params), location, float(timeout)


@contextmanager
def _errors(location: str) -> Iterator[None]:
    """Turn the database's errors into ones that say what happened and what to do."""
    try:
        yield
    except (PoolTimeout, psycopg.OperationalError) as exc:
        if isinstance(exc, psycopg.errors.DiskFull):
            raise OSError(f"{location}: the database's disk is full ({exc}); nothing was changed") from exc
        if isinstance(exc, psycopg.errors.QueryCanceled):
            raise TimeoutError(f"{location}: the database cancelled the statement ({exc}); retry") from exc
        raise ConnectionError(f"{location}: the database cannot be reached ({str(exc).strip()}); check that "
                              "PostgreSQL is running and accepts connections at that address. What was "
                              "committed before is intact; this call's changes were not confirmed") from exc
    except (psycopg.errors.DataCorrupted, psycopg.errors.IndexCorrupted) as exc:
        raise damaged(location, f"the database reports damage ({exc})", "restore the database") from exc


def migrate(conninfo: str, location: str) -> None:
    """Bring the database's schema to ``SCHEMA_VERSION``: ``MIGRATIONS`` applied in order in one
    transaction, under an advisory lock so that concurrent first connections take turns (the second
    finds the work done); a schema newer than this code is refused, not misread."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('hcmemory_schema') IS NOT NULL").fetchone()[0]:
            version = _schema_version(conn, location)
            if version == SCHEMA_VERSION:
                return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS hcmemory_schema (version integer NOT NULL)")
            version = _schema_version(conn, location)
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
                log.info("%s: store schema migrated to version %d", location, step + 1)
            conn.execute("DELETE FROM hcmemory_schema")
            conn.execute("INSERT INTO hcmemory_schema (version) VALUES (%s)", (SCHEMA_VERSION,))


def _schema_version(conn: psycopg.Connection, location: str) -> int:
    row = conn.execute("SELECT max(version) FROM hcmemory_schema").fetchone()
    version = row[0] or 0
    if version > SCHEMA_VERSION:
        raise CheckpointError(f"{location}: store schema version {version} is newer than this hcmemory reads "
                              f"({SCHEMA_VERSION}); upgrade hcmemory to use this database")
    return version


class _PostgresCheckpoint:
    """``StoredCheckpoint`` over the connection of an open read transaction."""

    _JOIN = ("FROM hcmemory_checkpoint_chunks r JOIN hcmemory_chunks c ON c.namespace = r.namespace "
             "AND c.sha256 = r.sha256 WHERE r.checkpoint_id = %s")

    def __init__(self, conn: psycopg.Connection, checkpoint_id: str, version: int, header: bytes) -> None:
        self._conn, self.checkpoint_id, self.version, self.header = conn, checkpoint_id, version, header

    def chunk_sizes(self) -> dict[int, int]:
        return dict(self._conn.execute(f"SELECT r.seq, octet_length(c.data) {self._JOIN}", (self.checkpoint_id,)))

    def chunk(self, seq: int) -> bytes | None:
        row = self._conn.execute(f"SELECT c.data {self._JOIN} AND r.seq = %s", (self.checkpoint_id, seq),
                                 binary=True).fetchone()
        return None if row is None else row[0]


class PostgresBackend:
    """``StoreBackend`` for one namespace of a PostgreSQL database."""

    def __init__(self, url: str, namespace: str) -> None:
        self.namespace = namespace
        self._database: _Database | None = _Database.acquire(url)
        self.location = self._database.location
        self._lock = threading.Lock()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection, with the database's errors turned into clear ones."""
        database = self._database
        if database is None:
            raise ValueError(f"the store {self.location} is closed; open it again to use it")
        with _errors(self.location), database.pool.connection() as conn:
            yield conn

    # --- StoreBackend --------------------------------------------------------------------------
    def save(self, context_id: str, tag: str, checkpoint_id: str, chunks: Iterable[Chunk],
             header: Callable[[], bytes], expected_version: int | None) -> WriteResult:
        key = (self.namespace, context_id, tag)
        where = f"{self.location} [{context_id!r}, tag {tag!r}]"
        with self._connection() as conn, conn.transaction():
            self._check(where, expected_version, self._version(conn, key))
            new_chunks = new_bytes = 0
            refs = []
            for seq, (digest, data) in enumerate(chunks):
                if self._send(conn, digest, data):
                    new_chunks += 1
                    new_bytes += memoryview(data).nbytes
                refs.append((checkpoint_id, seq, self.namespace, digest))
            content = header()
            for _ in range(_SAVE_ATTEMPTS):
                current = conn.execute("SELECT version, checkpoint_id FROM hcmemory_checkpoints WHERE namespace = %s "
                                       "AND context_id = %s AND tag = %s FOR UPDATE", key).fetchone()
                self._check(where, expected_version, current[0] if current else 0)
                released: list[str] = []
                if current is not None:
                    released = [row[0] for row in conn.execute(
                        "DELETE FROM hcmemory_checkpoint_chunks WHERE checkpoint_id = %s RETURNING sha256",
                        (current[1],))]
                    conn.execute("DELETE FROM hcmemory_checkpoints WHERE checkpoint_id = %s", (current[1],))
                inserted = conn.execute(
                    "INSERT INTO hcmemory_checkpoints (namespace, context_id, tag, checkpoint_id, version, header) "
                    "VALUES (%s, %s, %s, %s, nextval('hcmemory_versions'), %b) "
                    "ON CONFLICT (namespace, context_id, tag) DO NOTHING RETURNING version",
                    (*key, checkpoint_id, content)).fetchone()
                if inserted is not None:
                    break
                # another writer created the row after our FOR UPDATE found none: check against its version
            else:
                raise TimeoutError(f"{where}: other writers kept replacing this checkpoint; retry the save")
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO hcmemory_checkpoint_chunks (checkpoint_id, seq, namespace, sha256) "
                                   "VALUES (%s, %s, %s, %s)", refs)
            self._collect(conn, released)
            return WriteResult(inserted[0], new_chunks, new_bytes)

    @staticmethod
    def _check(where: str, expected_version: int | None, current: int) -> None:
        if expected_version is not None and current != expected_version:
            raise StaleCheckpointError(where, expected_version, current)

    @staticmethod
    def _version(conn: psycopg.Connection, key: tuple[str, str, str]) -> int:
        row = conn.execute("SELECT version FROM hcmemory_checkpoints WHERE namespace = %s AND context_id = %s "
                           "AND tag = %s", key).fetchone()
        return row[0] if row else 0

    def _send(self, conn: psycopg.Connection, digest: str, data: bytes | memoryview) -> bool:
        """Make sure the namespace holds chunk ``digest`` until this transaction ends; True when its bytes
        had to be sent, False when it was there already."""
        key = (self.namespace, digest)
        while True:
            if conn.execute("SELECT 1 FROM hcmemory_chunks WHERE namespace = %s AND sha256 = %s FOR KEY SHARE",
                            key).fetchone():
                return False
            if conn.execute("INSERT INTO hcmemory_chunks (namespace, sha256, data) VALUES (%s, %s, %b) "
                            "ON CONFLICT DO NOTHING RETURNING 1", (*key, data)).fetchone():
                return True
            # another writer committed the same chunk meanwhile: share it (or, if it is gone again, send it)

    def _collect(self, conn: psycopg.Connection, candidates: Iterable[str]) -> None:
        """Delete the chunks among ``candidates`` that no checkpoint references any more.

        Two statements: the first locks the candidates no unfinished save holds; the second, whose
        snapshot starts after those locks were granted, sees every reference committed to them, and no
        save can add one until this transaction ends.
        """
        candidates = sorted(set(candidates))
        if not candidates:
            return
        locked = [row[0] for row in conn.execute(
            "SELECT sha256 FROM hcmemory_chunks WHERE namespace = %s AND sha256 = ANY(%s) FOR UPDATE SKIP LOCKED",
            (self.namespace, candidates))]
        if locked:
            conn.execute("DELETE FROM hcmemory_chunks c WHERE c.namespace = %s AND c.sha256 = ANY(%s) AND NOT EXISTS "
                         "(SELECT 1 FROM hcmemory_checkpoint_chunks r WHERE r.namespace = c.namespace "
                         "AND r.sha256 = c.sha256)", (self.namespace, locked))

    @contextmanager
    def read(self, context_id: str, tag: str) -> Iterator[StoredCheckpoint | None]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute("SELECT checkpoint_id, version, substring(header FROM 1 FOR %s) FROM "
                               "hcmemory_checkpoints WHERE namespace = %s AND context_id = %s AND tag = %s",
                               (MAX_HEADER_BYTES + 1, self.namespace, context_id, tag), binary=True).fetchone()
            yield None if row is None else _PostgresCheckpoint(conn, *row)

    def headers(self, context_id: str | None = None, tag: str | None = None) -> list[tuple[str, str, int, bytes]]:
        with self._connection() as conn:
            return conn.execute(
                "SELECT context_id, tag, version, substring(header FROM 1 FOR %(limit)s) FROM hcmemory_checkpoints "
                "WHERE namespace = %(ns)s AND (%(context_id)s::text IS NULL OR context_id = %(context_id)s) "
                "AND (%(tag)s::text IS NULL OR tag = %(tag)s) ORDER BY context_id COLLATE \"C\", tag COLLATE \"C\"",
                {"limit": MAX_HEADER_BYTES + 1, "ns": self.namespace, "context_id": context_id, "tag": tag},
                binary=True).fetchall()

    def versions(self, context_id: str) -> dict[str, int]:
        with self._connection() as conn:
            return dict(conn.execute("SELECT tag, version FROM hcmemory_checkpoints WHERE namespace = %s AND "
                                     "context_id = %s ORDER BY tag COLLATE \"C\"", (self.namespace, context_id)))

    def context_ids(self) -> list[str]:
        with self._connection() as conn:
            return [row[0] for row in conn.execute(
                "SELECT DISTINCT context_id COLLATE \"C\" FROM hcmemory_checkpoints WHERE namespace = %s "
                "ORDER BY 1", (self.namespace,))]

    def delete(self, context_id: str, tag: str | None) -> list[str]:
        with self._connection() as conn, conn.transaction():
            removed = conn.execute(
                "SELECT tag, checkpoint_id FROM hcmemory_checkpoints WHERE namespace = %(ns)s AND context_id = "
                "%(context_id)s AND (%(tag)s::text IS NULL OR tag = %(tag)s) ORDER BY tag COLLATE \"C\" FOR UPDATE",
                {"ns": self.namespace, "context_id": context_id, "tag": tag}).fetchall()
            ids = [checkpoint_id for _, checkpoint_id in removed]
            released = [row[0] for row in conn.execute(
                "DELETE FROM hcmemory_checkpoint_chunks WHERE checkpoint_id = ANY(%s) RETURNING sha256", (ids,))]
            conn.execute("DELETE FROM hcmemory_checkpoints WHERE checkpoint_id = ANY(%s)", (ids,))
            self._collect(conn, released)
            return [tag for tag, _ in removed]

    def close(self) -> None:
        with self._lock:
            if self._database is not None:
                self._database.release()
                self._database = None
