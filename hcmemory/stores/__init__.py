"""Where checkpoints live: ``ContextStore`` over a ``StoreBackend`` — SQLite (one file, the embedded
default) or PostgreSQL (one database shared by many machines and tenants).

``base.py`` has the backend protocol and what every backend shares, ``context_store.py`` the store
(chunking, manifests, verification), ``sqlite.py`` and ``postgres.py`` the two backends.
"""

from .base import (CheckpointNotFoundError, IndexEntry, SavedCheckpoint, StaleCheckpointError, StoreBackend,
                   StoredCheckpoint, redacted)
from .chunking import CHUNK_BYTES
from .context_store import DEFAULT_TAG, ContextStore, open_backend

__all__ = ["CHUNK_BYTES", "DEFAULT_TAG", "CheckpointNotFoundError", "ContextStore", "IndexEntry", "SavedCheckpoint",
           "StaleCheckpointError", "StoreBackend", "StoredCheckpoint", "open_backend", "redacted"]
