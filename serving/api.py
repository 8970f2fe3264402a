"""The aiohttp status API.

``GET /healthz`` (process up), ``GET /readyz`` (broker, DB and Triton reachable, model loaded;
503 with the failing parts otherwise), ``GET /status`` (events in, recommendations out, DLQ,
lag per partition, fold backlog, latency), ``GET /users/{user_id}`` (memory metadata, window,
last recommendation), ``DELETE /users/{user_id}`` (erase a user's memory and window; needs the
bearer token from ``PERSREC_API_TOKEN``), ``GET /metrics`` (Prometheus), ``GET /openapi.json``.

Runs inside a worker (``persrec worker``: it sees that worker's windows and counters) or alone
(``persrec api``: cluster-level facts only: readiness, lag, memories in the DB).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from persrec.memory import SqlMemoryStore
from persrec.stream.manifest import Manifest
from persrec.stream.triton import TritonModels
from persrec.settings import Settings
from persrec.stream.view import WorkerView

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
WORKER = web.AppKey("worker", object)  # the worker's WorkerView, or None standalone
STORE = web.AppKey("store", SqlMemoryStore)
TRITON = web.AppKey("triton", TritonModels)
KAFKA = web.AppKey("kafka", dict)
MANIFEST = web.AppKey("manifest", dict)
MAX_USER_ID = 256


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


async def _resources(app: web.Application):
    s = app[SETTINGS]
    app[STORE] = SqlMemoryStore(s.resolved_database_url)
    try:
        app[MANIFEST] = {"manifest": Manifest.read(s.model_repository, s.triton_version)}
    except (OSError, ValueError, TypeError):
        app[MANIFEST] = {}
    # /readyz asks for the Triton version the workers of this manifest call
    version = str(app[MANIFEST]["manifest"].triton_version) if app[MANIFEST] else ""
    app[TRITON] = TritonModels(s.triton_grpc_url, timeout_s=2.0, max_attempts=1, version=version)
    app[KAFKA] = {}
    yield
    for kind, client in app[KAFKA].items():
        await (client.close() if kind == "admin" else client.stop())
    await app[TRITON].close()
    app[STORE].close()


async def _kafka(app: web.Application, kind: str):
    """Lazily started aiokafka clients (the API must start while the broker is down)."""
    clients = app[KAFKA]
    if kind not in clients:
        s = app[SETTINGS]
        client = (AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=3000)
                  if kind == "admin" else
                  AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=3000))
        await asyncio.wait_for(client.start(), 5)
        clients[kind] = client
    return clients[kind]


async def _check(coro, timeout: float = 3.0) -> str | None:
    """None if ``coro`` succeeds in time, else a short reason."""
    try:
        ok = await asyncio.wait_for(coro, timeout)
        return None if ok is not False else "not ready"
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure
        return f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app

    async def broker():
        admin = await _kafka(app, "admin")
        await admin.list_topics()

    async def database():
        await asyncio.to_thread(app[STORE].count)

    async def triton():
        # inside a worker: the version it answers new events with (the new one once switched)
        worker = app[WORKER]
        active = None if worker is None or worker.triton_version is None else str(worker.triton_version)
        return await app[TRITON].ready("recommend", active)

    checks = {"broker": await _check(broker()), "database": await _check(database()),
              "triton": await _check(triton())}
    if not app[MANIFEST]:
        checks["model"] = f"no manifest in {app[SETTINGS].model_repository}"
    ready = not any(checks.values())
    body = {"ready": ready, "checks": {k: (v or "ok") for k, v in checks.items()}}
    return web.json_response(body, status=200 if ready else 503)


async def lag(app: web.Application) -> dict[str, int]:
    """Messages not yet committed by the worker group, per partition of the interactions topic."""
    s = app[SETTINGS]
    admin = await _kafka(app, "admin")
    consumer = await _kafka(app, "consumer")
    described = await admin.describe_topics([s.topic_interactions])
    if not described or described[0].get("error_code"):
        raise LookupError(f"topic {s.topic_interactions!r} does not exist yet")
    tps = sorted(TopicPartition(s.topic_interactions, p["partition"]) for p in described[0]["partitions"])
    committed = await admin.list_consumer_group_offsets(s.app_id)
    ends = await consumer.end_offsets(tps)
    out = {}
    for tp in tps:
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        out[str(tp.partition)] = max(ends[tp] - done, 0)
    return out


async def status(request: web.Request) -> web.Response:
    app = request.app
    body: dict[str, Any] = {"time": time.time()}
    try:
        body["lag"] = await asyncio.wait_for(lag(app), 5)
    except Exception as exc:  # noqa: BLE001
        body["lag"] = None
        body["lag_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if app[WORKER] is not None:
        body |= app[WORKER].counters()
    return web.json_response(body)


def _user_id(request: web.Request) -> str:
    user_id = request.match_info["user_id"]
    if not user_id or len(user_id) > MAX_USER_ID or not user_id.isprintable():
        raise _error(web.HTTPBadRequest, f"user_id must be 1..{MAX_USER_ID} printable characters")
    return user_id


async def user(request: web.Request) -> web.Response:
    app = request.app
    user_id = _user_id(request)
    manifest, worker = app[MANIFEST].get("manifest"), app[WORKER]
    # inside a worker, the memory its next answer starts from (stream.view.memory_versions)
    versions = (worker.memory_versions if worker is not None else []) or ([manifest.model_version] if manifest else [])
    body: dict[str, Any] = {"user_id": user_id, "memory": None}
    for version in versions:
        r = (await asyncio.to_thread(app[STORE].get_many, [user_id], version)).get(user_id)
        if r is not None:
            body["memory"] = {
                "model_version": r.model_version, "shape": list(r.tensor.shape),
                "events_folded": r.events_folded, "watermark": r.watermark,
                "history_len": 0 if r.history is None else int(len(r.history)),
                "updated_at": r.updated_at.isoformat() if r.updated_at else None,
                "row_version": r.row_version,
            }
            break
    window = None if worker is None else worker.window(user_id, body["memory"]["watermark"] if body["memory"] else 0)
    if window is not None:
        body["window"] = dataclasses.asdict(window)
        body["last_recommendation"] = worker.last_recommendation(user_id)
    if body["memory"] is None and body.get("window", {}).get("events", 0) == 0:
        raise _error(web.HTTPNotFound, f"no state for user {user_id!r}")
    return web.json_response(body)


def _authorised(request: web.Request) -> None:
    token = request.app[SETTINGS].api_token
    if token is None:
        raise _error(web.HTTPForbidden, "mutating endpoints are disabled: set PERSREC_API_TOKEN")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise _error(web.HTTPUnauthorized, "missing or wrong bearer token")


async def delete_user(request: web.Request) -> web.Response:
    """Queue the erasure on the interactions topic, ordered with the user's events; the worker
    that owns the user deletes the window and the memory."""
    _authorised(request)
    user_id = _user_id(request)
    s = request.app[SETTINGS]
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    try:
        await asyncio.wait_for(producer.start(), 5)
        await producer.send_and_wait(s.topic_interactions, json.dumps({"op": "delete_user", "user_id": user_id}).encode(),
                                     key=user_id.encode())
    except Exception as exc:  # noqa: BLE001
        raise _error(web.HTTPServiceUnavailable, f"broker unavailable: {type(exc).__name__}") from None
    finally:
        await producer.stop()
    return web.json_response({"user_id": user_id, "status": "deletion queued"}, status=202)


class _WorkerCollector:
    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self):
        worker = self.app[WORKER]
        c = {} if worker is None else worker.counters()
        if not c:
            return
        for name, key, help_ in [
            ("persrec_events_in", "events_in", "events read"),
            ("persrec_recommendations_out", "recs_out", "recommendation messages published"),
            ("persrec_dlq", "dlq", "events sent to the dead-letter topic"),
            ("persrec_duplicates", "duplicates", "replayed event ids"),
            ("persrec_folds", "folds", "memories written by folds"),
            ("persrec_offset_rewinds", "offset_rewinds", "input partitions read again from a missing offset"),
            ("persrec_partition_stalls", "partition_stalls", "input partitions read again after their records stopped"),
            ("persrec_recovery_stalls", "recovery_stalls", "table changelog partitions read again after recovery stopped"),
            ("persrec_items_in", "items_in", "messages read from the items topic"),
            ("persrec_items_registered", "items_registered", "new items added to the catalogue by this worker"),
            ("persrec_items_updated", "items_updated", "item texts changed by this worker"),
        ]:
            m = CounterMetricFamily(name, help_)
            m.add_metric([], c[key])
            yield m
        g = GaugeMetricFamily("persrec_fold_backlog", "users waiting for a fold")
        g.add_metric([], c["fold_backlog"])
        yield g
        if c.get("catalogue"):
            g = GaugeMetricFamily("persrec_catalogue_items", "items the served model can recommend")
            g.add_metric([], c["catalogue"]["items"])
            yield g
        for key, name, help_ in [("latency", "latency", "event read -> recommendation published"),
                                 ("item_latency", "item_latency", "item published -> served (catalogue)")]:
            q = c.get(key) or {}
            for k in ("p50_ms", "p99_ms"):
                if q.get(k) is not None:
                    g = GaugeMetricFamily(f"persrec_{name}_{k}", help_)
                    g.add_metric([], q[k])
                    yield g


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerCollector(request.app))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(required: list[str], **properties: dict) -> dict:
    return {"type": "object", "required": required, "properties": properties}


_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_ERROR = {"$ref": "#/components/schemas/Error"}
_READINESS = {"$ref": "#/components/schemas/Readiness"}
_BAD_ID = _json(f"user_id is not 1..{MAX_USER_ID} printable characters", _ERROR)
_STATUS = _object(
    ["time", "lag"], time={"type": "number"},
    lag={"type": "object", "nullable": True, "additionalProperties": _INT}, lag_error=_STR,
    **{name: _INT for name in ("events_in", "recs_out", "dlq", "duplicates", "rerouted", "cold_start", "folds",
                               "fold_backlog", "batches", "offset_rewinds", "partition_stalls", "recovery_stalls", "items_in", "items_registered",
                               "items_updated", "items_ignored")},
    seconds_model={"type": "number"}, seconds_publish={"type": "number"}, seconds_items={"type": "number"},
    model_version=_STR,
    switch=_object(["from_version", "to_version", "partitions"], from_version=_STR, to_version=_STR,
                   from_triton_version=_INT, to_triton_version=_INT, requested_at=_STR, memories_made=_INT,
                   from_triton_url=_STR | {"nullable": True}, to_triton_url=_STR | {"nullable": True},
                   partitions={"type": "object", "additionalProperties": _INT}) | {"nullable": True},
    catalogue=_object(["items", "trained", "registered", "revision", "newest"], items=_INT, trained=_INT,
                      registered=_INT, changed=_INT, revision=_INT,
                      newest={"type": "array", "items": _object(["item_id", "dense_id"], item_id=_STR, dense_id=_INT,
                                                                revision=_INT, updated_at=_STR)}) | {"nullable": True},
    latency={"type": "object", "properties": {"p50_ms": {"type": "number", "nullable": True},
                                              "p99_ms": {"type": "number", "nullable": True}}},
    item_latency={"type": "object", "properties": {"p50_ms": {"type": "number", "nullable": True},
                                                   "p99_ms": {"type": "number", "nullable": True}}},
)
_MEMORY = _object(
    ["model_version", "events_folded", "watermark"], model_version=_STR, shape={"type": "array", "items": _INT},
    events_folded=_INT, watermark=_INT, history_len=_INT, updated_at={"type": "string", "nullable": True},
    row_version=_INT,
)
_USER = _object(
    ["user_id", "memory"], user_id=_STR, memory=_MEMORY | {"nullable": True},
    window=_object(["events", "items_after_watermark", "known_items", "items"], events=_INT,
                   items_after_watermark=_INT, known_items=_INT, items={"type": "array", "items": _STR}),
    last_recommendation={"type": "object", "nullable": True},
)
OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "persrec status API", "version": "1"},
    "paths": {
        "/healthz": {"get": {"responses": {
            "200": _json("process is up", _object(["status"], status={"type": "string", "enum": ["ok"]}))}}},
        "/readyz": {"get": {"responses": {
            "200": _json("ready", _READINESS), "503": _json("a dependency is down (named in checks)", _READINESS)}}},
        "/status": {"get": {"responses": {
            "200": _json("counters, lag, backlog, latency (counters only inside a worker)", _STATUS)}}},
        "/metrics": {"get": {"responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": _STR}}}}}},
        "/users/{user_id}": {
            "parameters": [{"name": "user_id", "in": "path", "required": True,
                            "description": f"1..{MAX_USER_ID} printable characters (what the event contract accepts)",
                            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID}}],
            "get": {"responses": {
                "200": _json("user state (window and last recommendation only inside a worker)", _USER),
                "400": _BAD_ID, "404": _json("no state for this user", _ERROR)}},
            "delete": {"security": [{"bearer": []}], "responses": {
                "202": _json("deletion queued on the interactions topic", _object(["user_id", "status"],
                                                                                 user_id=_STR, status=_STR)),
                "400": _BAD_ID, "401": _json("missing or wrong bearer token", _ERROR),
                "403": _json("disabled: PERSREC_API_TOKEN is not set", _ERROR),
                "503": _json("broker unavailable", _ERROR)}},
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": _object(["error"], error={"type": "string", "minLength": 1}),
            "Readiness": _object(["ready", "checks"], ready={"type": "boolean"},
                                 checks={"type": "object", "additionalProperties": _STR}),
        },
    },
}


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


@web.middleware
async def errors(request: web.Request, handler):
    """Domain errors become JSON 4xx; anything unexpected a JSON 500 without a stack trace."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:  # noqa: BLE001
        log.exception("unhandled error on %s %s", request.method, request.path)
        raise _error(web.HTTPInternalServerError, "internal error") from None


def create_app(settings: Settings, worker: WorkerView | None = None) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[SETTINGS] = settings
    app[WORKER] = worker
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/users/{user_id}", user)
    app.router.add_delete("/users/{user_id}", delete_user)
    return app


def serve_in_worker(faust_app, settings: Settings, worker: WorkerView) -> None:
    """Run the API inside a Faust worker's event loop."""

    @faust_app.task
    async def status_api() -> None:
        runner = web.AppRunner(create_app(settings, worker))
        await runner.setup()
        await web.TCPSite(runner, settings.api_host, settings.api_port).start()
        log.info("status API on http://%s:%d", settings.api_host, settings.api_port)
