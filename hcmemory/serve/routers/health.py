"""``GET /health``: open to everyone (no API key), cheap, and never queued behind the model."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServerDep
from ..schemas import Health

router = APIRouter()


@router.get("/health")
def health(server: ServerDep) -> Health:
    counts = server.worker.counts
    return Health(model=server.model_id, preset=server.settings.preset, open_tenants=server.tenants.open,
                  pending=counts.pending, finished=counts.finished, cancelled=counts.cancelled)
