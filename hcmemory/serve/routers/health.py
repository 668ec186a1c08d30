"""``GET /health``: open to everyone (no API key), cheap, and never queued behind the model."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServerDep
from ..schemas import Health

router = APIRouter()


@router.get("/health")
def health(server: ServerDep) -> Health:
    counts = server.worker.counts
    health = Health(model=server.model_id, preset=server.settings.preset, open_tenants=server.tenants.open,
                    pending=counts.pending, finished=counts.finished, cancelled=counts.cancelled,
                    replica_id=server.replica_id)
    if server.checkpointer is not None:
        checkpoints = server.checkpointer.status()
        health.status = "degraded" if checkpoints.store != "ok" else "ok"
        health.checkpoints_pending, health.checkpoints_written = checkpoints.pending, checkpoints.written
        health.checkpoints_refused = checkpoints.refused
        health.last_checkpoint_ms, health.store_error = checkpoints.last_write_ms, checkpoints.last_error
    return health
