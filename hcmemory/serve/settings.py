"""What ``hcmemory serve`` is told: every field has a default, so the server runs with no flags at all."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..config import HCConfig
from ..engine import DEFAULT_MAX_HOST_BYTES, DEFAULT_PRESET
from ..files import cache_root
from ..models import DEFAULT_MODEL_NAME
from .stores import check_location


def default_store_dir() -> Path:
    """Where the tenants' SQLite stores live unless ``--store`` says otherwise (under the cache root)."""
    return cache_root() / "serve"


@dataclass(frozen=True)
class ServeSettings:
    """The server's configuration; checked when built, so a bad flag fails before the model loads."""

    host: str = "127.0.0.1"
    """Loopback by default: exposing the server is a choice (``--host 0.0.0.0``), best made with API keys."""
    port: int = 8000
    model: str | None = None
    """A local Hugging Face model directory; None for the embedded SmolLM2-135M-Instruct."""
    preset: str = DEFAULT_PRESET
    """How new conversations store their KV state (a preset name or ``preset:field=value,...``)."""
    store: Path | str = field(default_factory=default_store_dir, repr=False)
    """A directory holding one SQLite ``ContextStore`` per tenant, or a ``postgresql://`` URL: one database
    shared by every replica, a namespace per tenant (``stores.open_store`` reads it)."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Bearer keys accepted; empty means no authentication and tenants named by ``x-tenant-id``.  Kept out
    of the repr, which logs and Ray's deployment arguments may show."""
    max_tokens_limit: int = 2048
    """The largest ``max_tokens`` a request may ask for; more is refused with 400."""
    default_max_tokens: int = 256
    """``max_tokens`` when a request names none (capped by ``max_tokens_limit``)."""
    max_body_bytes: int = 8 * 2**20
    """Request bodies above this are refused with 413 before they are parsed."""
    max_host_bytes: int = DEFAULT_MAX_HOST_BYTES
    """Memory all live conversations together may hold before the least recently used are spilled."""
    max_pending: int = 64
    """Model calls queued or running at once; one more is refused with 429 (retry later)."""
    max_open_tenants: int = 64
    """Tenants whose pools stay open; the least recently used one beyond this is spilled and closed."""
    checkpoint_each_turn: bool = False
    """Save every pinned conversation to its store after each turn, on a thread of its own, after the
    answer has gone out.  On for Ray replicas, whose conversations must survive the loss of their replica;
    off for the single server, which saves on spill and on shutdown."""

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} must be an int in [0, 65535] (0 picks a free port)")
        HCConfig.from_spec(self.preset)  # raises naming the known presets
        object.__setattr__(self, "store", check_location(self.store))
        keys = tuple(k.strip() for k in self.api_keys)
        if any(not k for k in keys):
            raise ValueError("an API key is empty; pass non-empty keys, e.g. --api-key sk-one,sk-two")
        object.__setattr__(self, "api_keys", keys)
        for name in ("max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_pending", "max_open_tenants"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not isinstance(self.max_host_bytes, int) or self.max_host_bytes < 0:
            raise ValueError(f"max_host_bytes={self.max_host_bytes!r} must be an int >= 0")

    @property
    def model_id(self) -> str:
        """The name ``/v1/models`` lists and requests must give as ``model``."""
        return Path(self.model).name if self.model else DEFAULT_MODEL_NAME

    @property
    def exposed(self) -> bool:
        """Whether the server listens beyond loopback (worth a warning without API keys)."""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"
