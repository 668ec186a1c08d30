"""``hcmemory serve``: an OpenAI-compatible HTTP server over the memory (FastAPI + uvicorn).

Needs ``pip install 'hcmemory[serve]'``.  See docs/serving.md for the endpoints and the identity and
tenancy rules.  ``hcmemory.serve.cluster`` runs the same app as model replicas on Ray Serve
(``pip install 'hcmemory[ray]'``); it is imported only when used, since Ray is an extra of its own.
"""

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hcmemory serve needs FastAPI and uvicorn: pip install 'hcmemory[serve]'") from exc

from .app import create_app, serve
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]
