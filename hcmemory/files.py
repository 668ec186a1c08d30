"""Where hcmemory keeps files, and the one way it writes them: atomically and durably.

Every file another process may read later (converted models, calibrated codebooks, single-file
checkpoints) is written to a temporary name next to its target, flushed to disk, renamed over the
target in one ``os.replace`` and the directory entry flushed too: a crash leaves the old file or
the new one, never a torn one.

What hcmemory writes is private: conversations, and caches derived from them.  Directories it creates
are 0700 and files 0600 (``mkstemp``'s mode, kept by the rename), whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

HOME_ENV = "HCMEMORY_HOME"
"""Environment variable naming the cache root (default ``~/.cache/hcmemory``)."""


def cache_root() -> Path:
    """The directory hcmemory keeps converted models and codebooks in: ``$HCMEMORY_HOME`` or
    ``~/.cache/hcmemory``.  Read on every call (not at import) so it can be pointed elsewhere at run time."""
    value = os.environ.get(HOME_ENV)
    return (Path(value) if value else Path("~/.cache/hcmemory")).expanduser()


def make_private_dirs(path: Path) -> None:
    """Create the directory ``path`` and any missing parents, each readable by its owner only (0700).

    ``Path.mkdir(parents=True)`` gives the parents the umask's mode (usually world-readable), so each
    missing level is made here.  Directories that already exist keep their permissions: they may be
    the user's own.
    """
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk (silently skipped where the platform cannot)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, the file written there is
    flushed and renamed over ``path``.  On any error (or interrupt) the temporary file is removed and
    ``path`` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a file path")
    make_private_dirs(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
