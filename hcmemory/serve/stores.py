"""Where the server's stores live: ``open_store(url_or_path, namespace)`` is the one place that turns the
``--store`` value and a tenant into a ``ContextStore``.

Why one function: every process that serves (the single server, each Ray replica) opens stores through
it, so a new backend is chosen here and nowhere else.  Today a store location is a directory holding one
SQLite file per namespace (a tenant); a ``postgresql://`` URL will select the shared PostgreSQL backend
(one database, a namespace per tenant) once hcmemory has it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..stores import ContextStore

URL_SCHEMES = ("postgresql://", "postgres://")
"""Store locations given as database URLs rather than directories."""


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def check_location(location: str | Path) -> str | Path:
    """``location`` as the server keeps it: a URL as given, a directory as an absolute path (so that Ray
    replicas, whose working directory is their own, open the same files); raises naming the problem."""
    if is_url(location):
        raise ValueError(f"--store {_redacted(str(location))}: this hcmemory has no PostgreSQL store backend yet; "
                         "pass a directory (one SQLite store per tenant; replicas on one machine share it)")
    path = Path(location).expanduser().resolve()
    if path.is_file():
        raise ValueError(f"--store {path} is a file; pass a directory (one SQLite store per tenant is kept in it)")
    return path


def open_store(location: str | Path, namespace: str) -> ContextStore:
    """The store of ``namespace`` (a tenant) at ``location``: its own SQLite file in the directory, named
    by a hash so that any tenant name (an API key's hash included) is a safe file name."""
    location = check_location(location)
    assert isinstance(location, Path)  # URLs are refused above until their backend exists
    location.mkdir(parents=True, exist_ok=True)
    return ContextStore(location / f"tenant-{hashlib.sha256(namespace.encode()).hexdigest()[:32]}.sqlite")


def _redacted(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
