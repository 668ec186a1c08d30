"""What every store backend shares: the ``StoreBackend`` protocol, its errors and its result types.

A backend keeps ``(namespace, context id, tag) -> (checkpoint id, version, header, chunks)`` and
nothing else; what a header or a chunk means is ``ContextStore``'s business (``context_store.py``).
Every backend has the same four properties, so that a test written against one holds for all:

* **Namespaces.** A backend is opened for one namespace (a tenant) and every statement it runs is
  scoped by it: it never lists, matches, loads or deletes another namespace's checkpoints.  Chunks
  are content-addressed *within* a namespace, so two tenants that store the same bytes store them
  twice: sharing across tenants would let one learn, from how long a save takes, whether another
  holds a given document.
* **Content-addressed chunks.** A chunk is stored once per namespace under its sha256; a save sends
  only the chunks its namespace lacks, and a delete (or a save that replaces a checkpoint) removes
  the chunks no checkpoint references any more, in the same transaction.
* **Versions with compare-and-set.** Every save of ``(namespace, context, tag)`` gets a new version,
  a number drawn from one counter per store that never goes back — not even after a delete — so a
  writer that read version ``n`` can be refused if anyone else wrote since (``StaleCheckpointError``).
* **All or nothing.** Each call is one transaction: on any error the store is as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import is_int

MAX_NAMESPACE_CHARS = 1024
"""Longest namespace: room for any tenant name or key hash, while a bound keeps index keys small."""


class CheckpointNotFoundError(KeyError):
    """No checkpoint under the requested context id (and tag)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class StaleCheckpointError(RuntimeError):
    """A save with ``expected_version`` found another version stored: someone else wrote since this
    writer read.  Nothing was changed; load the stored checkpoint (its ``current`` version) and decide
    again rather than overwrite it."""

    def __init__(self, where: str, expected: int, current: int) -> None:
        self.expected, self.current = expected, current
        found = f"version {current}" if current else "no checkpoint"
        wanted = f"version {expected}" if expected else "no checkpoint"
        super().__init__(f"{where}: expected {wanted} but the store holds {found} — another writer saved it since; "
                         "nothing was changed. Load the stored checkpoint and continue from it instead")


@dataclass(frozen=True)
class SavedCheckpoint:
    """What a save stored: the checkpoint's id and version, and how many of its chunks were new.

    ``version`` is what the next save of the same ``(context id, tag)`` passes as ``expected_version``
    to be sure it replaces exactly this checkpoint.
    """

    context_id: str
    tag: str
    checkpoint_id: str
    version: int
    chunks: int
    """Chunks the checkpoint is made of."""
    new_chunks: int
    """Chunks the store did not hold yet and received: the others were already there, byte for byte."""
    new_bytes: int
    """Bytes of the new chunks: what the save sent to the database."""


@dataclass(frozen=True)
class IndexEntry:
    """What one stored checkpoint is, read from its header alone (no tensor is read).

    Enough to decide whether the checkpoint can serve a request — same tokens, same configuration,
    same model and tokenizer — before paying for a load.
    """

    context_id: str
    tag: str
    checkpoint_id: str
    version: int
    token_ids: tuple[int, ...]
    config: dict[str, Any]
    """``HCConfig.to_dict()`` of the configuration it ran with (completed for older formats), so it
    compares equal to ``config.to_dict()`` of the same configuration."""
    model_fingerprint: str
    tokenizer_fingerprint: str
    created: str


@dataclass(frozen=True)
class WriteResult:
    """A backend's account of one save (``ContextStore`` adds the ids to make a ``SavedCheckpoint``)."""

    version: int
    new_chunks: int
    new_bytes: int


Chunk = tuple[str, "bytes | memoryview"]
"""``(sha256 hex digest, bytes)`` of one chunk, as ``ContextStore`` hands them to a backend."""


class StoredCheckpoint(Protocol):
    """One checkpoint as a backend holds it, valid inside ``StoreBackend.read``'s block."""

    checkpoint_id: str
    version: int
    header: bytes
    """The header's UTF-8 JSON; at most ``MAX_HEADER_BYTES + 1`` bytes of it, which is enough for
    ``parse_header`` to refuse a larger one without anyone holding all of it."""

    def chunk_sizes(self) -> dict[int, int]:
        """Stored byte count of every chunk, by sequence number, without reading the chunks."""

    def chunk(self, seq: int) -> bytes | None:
        """The bytes of chunk ``seq``, or None when there is no such chunk."""


class StoreBackend(Protocol):
    """Where a ``ContextStore`` keeps the checkpoints of one namespace.

    Every method is atomic, safe to call from several threads, and turns the database's own errors
    into ``CheckpointError`` (damage), ``TimeoutError`` (another writer held a lock too long),
    ``ConnectionError`` (a database server that cannot be reached) or ``OSError`` (disk full,
    read-only, ...).  Headers and chunks are opaque bytes here.
    """

    location: str
    """Where the data lives, for messages (a file path, a database URL without its password)."""
    namespace: str

    def save(self, context_id: str, tag: str, checkpoint_id: str, chunks: Iterable[Chunk],
             header: Callable[[], bytes], expected_version: int | None) -> WriteResult:
        """Store ``chunks`` (numbered 0, 1, ... in order, consumed once; those the namespace already
        holds are not sent again) and then ``header()`` (called after the last chunk) as checkpoint
        ``checkpoint_id`` under a new version, replacing whatever ``(context_id, tag)`` held — in one
        transaction.  With ``expected_version`` (0: nothing stored), a different stored version raises
        ``StaleCheckpointError`` and changes nothing."""

    def read(self, context_id: str, tag: str) -> AbstractContextManager[StoredCheckpoint | None]:
        """The checkpoint under ``(context_id, tag)`` (None when there is none), from one consistent
        snapshot for the whole block: a concurrent save cannot swap chunks under the reader."""

    def headers(self, context_id: str | None = None, tag: str | None = None
                ) -> list[tuple[str, str, int, bytes]]:
        """``(context_id, tag, version, header)`` of every checkpoint, or of those of one context / one
        tag; headers truncated as in ``StoredCheckpoint.header``; sorted by context id, then tag."""

    def versions(self, context_id: str) -> dict[str, int]:
        """``{tag: version}`` of the checkpoints of ``context_id``, sorted by tag (empty when none)."""

    def context_ids(self) -> list[str]:
        """Every context id with at least one checkpoint, sorted."""

    def delete(self, context_id: str, tag: str | None) -> list[str]:
        """Remove one checkpoint, or all of the context's when ``tag`` is None, and the chunks no
        checkpoint references any more, in one transaction; returns the tags removed."""

    def close(self) -> None:
        """Release the database; every method afterwards raises ``ValueError``."""


def check_namespace(namespace: Any) -> str:
    """A namespace: any string (``""`` is the default one) up to ``MAX_NAMESPACE_CHARS``, without NUL
    (which PostgreSQL's text cannot hold, so both backends refuse it)."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a string, not {type(namespace).__name__}")
    if len(namespace) > MAX_NAMESPACE_CHARS or "\0" in namespace:
        raise ValueError(f"namespace must be at most {MAX_NAMESPACE_CHARS} characters and hold no NUL character "
                         f"(got {len(namespace)} characters)")
    return namespace


def check_expected_version(expected_version: Any) -> int | None:
    """``expected_version`` as given, when it is None or a version number."""
    if expected_version is not None and not (is_int(expected_version) and expected_version >= 0):
        raise ValueError(f"expected_version={expected_version!r} must be None (no check), 0 (nothing stored yet) "
                         "or the version a previous save or load returned")
    return expected_version


_PASSWORD_IN_NETLOC = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", re.IGNORECASE)
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """``url`` without its password (in the user part or the query), for messages and logs."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_NETLOC.sub(r"\1:***@", url))
