"""GET /health (no key needed) and GET /metrics (Prometheus text)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from edge import __version__
from edge.api.metrics import memory_snapshot
from edge.api.serving import ServingState

router = APIRouter()
# /health status -> HTTP status: a load balancer or systemd check treats non-200 as "not serving"
HEALTH_HTTP_STATUS = {"ready": 200, "degraded": 200, "loading": 503, "failed": 503, "stopping": 503}
MODEL_FIELDS = ("name", "path", "file_type", "n_ctx", "kv_cache_type", "chat_slots")


def health_report(serving: ServingState) -> dict:
    sched = serving.scheduler
    return {
        "status": serving.health,
        "error": serving.error,
        "version": __version__,
        "uptime_s": round(time.time() - serving.started_at, 1),
        "model": {"id": serving.settings.server.model_name,
                  **{k: serving.model_info.get(k) for k in MODEL_FIELDS}},
        "memory": memory_snapshot(serving),
        "queue": {"depth": sched.queue_depth if sched else 0, "size": serving.settings.server.queue_size,
                  "active_chats": sched.active_chats if sched else 0},
    }


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    report = health_report(request.app.state.serving)
    return JSONResponse(report, status_code=HEALTH_HTTP_STATUS.get(report["status"], 503))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
