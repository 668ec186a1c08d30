"""Where the server's stores live: ``open_store(location, namespace)`` is the one place that turns the
``--store`` value and a tenant into a ``ContextStore``.

Why one function: every process that serves (the single server, each Ray replica) opens stores through
it, so a backend is chosen here and nowhere else.  A location is either

* a **directory**: one SQLite file per tenant in it, named by a hash of the tenant (the embedded default;
  replicas on one machine can share it), or
* a **``postgresql://`` URL**: one database that every replica on every machine shares, each tenant in a
  namespace of its own — the sha256 of the tenant, so tenants never share rows and no tenant name (nor the
  hash of an API key) is ever written to the database as given.

An unreachable database is reported by ``check_reachable`` when ``hcmemory serve`` starts (a wrong host,
port or password is then an error at once, not a server that answers nothing but 503s); once serving, a
database that goes down is answered per request with 503 ``store_unavailable`` (``errors.py``), and the
per-turn checkpoints wait for it (``checkpoints.py``).  Ray replicas do not check at start: a replacement
replica started while the database is down must come up and serve what it can.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..files import make_private_dirs
from ..stores import ContextStore, redacted
from ..stores.context_store import POSTGRES_SCHEMES


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names a database rather than a directory."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def describe(location: str | Path) -> str:
    """``location`` for logs and messages: a URL without its password."""
    return redacted(location) if isinstance(location, str) else str(location)


def check_location(location: str | Path) -> str | Path:
    """``location`` as the server keeps it: a URL as given, a directory as an absolute path (so that Ray
    replicas, whose working directory is their own, open the same files); raises naming the problem.
    Nothing is connected to here: settings are checked before anything starts (``check_reachable``)."""
    if is_url(location):
        assert isinstance(location, str)
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:
            raise ValueError(f"--store {redacted(location)} needs PostgreSQL support: "
                             "pip install 'hcmemory[postgres]'") from exc
        try:
            conninfo_to_dict(location)
        except Exception as exc:  # noqa: BLE001 - psycopg's ProgrammingError; its message quotes the password
            problem = str(exc).strip().replace(location, redacted(location))
            raise ValueError(f"--store {redacted(location)} is not a valid PostgreSQL URL ({problem}); pass e.g. "
                             "postgresql://user:password@host:5432/database") from None
        return location
    if isinstance(location, str) and "://" in location:
        raise ValueError(f"--store {redacted(location)}: only postgresql:// URLs and directories are stores")
    path = Path(location).expanduser().resolve()
    if path.is_file():
        raise ValueError(f"--store {path} is a file; pass a directory (one SQLite store per tenant is kept in it)")
    return path


def check_reachable(location: str | Path) -> None:
    """Connect to the database ``location`` names (and set up its tables on first use); raises
    ``ConnectionError`` naming the URL, without its password, when it cannot be reached.  A directory
    needs nothing: its files are made when first used."""
    if is_url(location):
        ContextStore(location).close()


def open_store(location: str | Path, namespace: str) -> ContextStore:
    """The store of ``namespace`` (a tenant) at ``location``; ``ConnectionError`` when its database
    cannot be reached."""
    location = check_location(location)
    key = hashlib.sha256(namespace.encode()).hexdigest()
    if isinstance(location, str):
        return ContextStore(location, namespace=key)
    make_private_dirs(location)  # conversations: readable by the server's user only, like the cache root
    return ContextStore(location / f"tenant-{key[:32]}.sqlite")
