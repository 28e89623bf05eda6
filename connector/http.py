"""The worker's HTTP endpoints: metrics, probes, and routes that need a token.

``/metrics``, ``/healthz`` and ``/readyz`` are open: Prometheus and the kubelet reach them
without secrets. Every other route (``/v1/...``: admin, and ingest from ``connector.ingest``) needs
``Authorization: Bearer <http.token>`` when a token is configured, so a route added later
is guarded unless it is deliberately made open. Routes are added to the application that
``build_app`` returns; the server only runs it.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from connector.config import HttpConfig
from connector.errors import TandemError
from connector.ingest import add_routes
from connector.ingest_request import MAX_BODY_BYTES

if TYPE_CHECKING:
    from connector.worker import Worker

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
WORKER: web.AppKey[Worker] = web.AppKey("worker")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def readiness(worker: Worker) -> tuple[bool, str]:
    """Whether an orchestrator may count on this worker now, and if not, why.

    Ready means: it holds a map that includes it, it is not between revocation and the new
    map (a takeover resumes portions from the last secured point during that time), and
    none of its background tasks has failed.
    """
    if worker.map is None:
        return False, "starting: no portion map yet"
    if all(m.name != worker.name for m in worker.map.members):
        return False, f"not in the map of epoch {worker.map.epoch}"
    if worker.metrics.rebalancing:
        return False, "rebalancing: applying a new map and taking over portions"
    try:
        worker.check_errors()
    except TandemError as exc:
        return False, f"failed: {exc}"
    return True, f"member of epoch {worker.map.epoch} with {len(worker.portions)} portions"


def _token_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="tandem"'},
                )
        return await handler(request)

    return guard


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[WORKER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop turns; nothing else is a reason to restart.
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    ready, reason = readiness(request.app[WORKER])
    return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)


async def _admin_status(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    if worker.sender is None:
        return web.json_response({"error": "worker not started"}, status=503)
    body = worker.announcement().model_dump(mode="json")
    return web.Response(text=json.dumps(body), content_type="application/json")


def build_app(worker: Worker, token: str | None) -> web.Application:
    """The application with the standard routes; callers may add more before it runs."""
    app = web.Application(
        middlewares=[_token_middleware(token)] if token else [], client_max_size=MAX_BODY_BYTES
    )
    app[WORKER] = worker
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/v1/admin/status", _admin_status)
    add_routes(app, worker.ingest)
    return app


class HttpServer:
    """Runs a worker's application on ``http.listen``; does nothing when it is null."""

    def __init__(self, worker: Worker, config: HttpConfig) -> None:
        self._config = config
        token = config.token.get_secret_value() if config.token else None
        self.app = build_app(worker, token)
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    async def start(self) -> None:
        if self._config.listen is None or self._runner is not None:
            return
        host, port = self._config.address
        # No access log: probes every few seconds would drown the worker's own lines.
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise TandemError(f"cannot listen on {self._config.listen}: {exc.strerror}") from exc
        self._runner = runner
        bound = runner.addresses[0]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
        log.info("HTTP endpoints on %s (/metrics, /healthz, /readyz)", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
