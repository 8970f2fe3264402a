"""Start a worker: topics, memory store, Triton client, Faust app, and the status API."""

from __future__ import annotations

import gc
import logging

import faust

from persrec.memory import SqlCatalogue, SqlMemoryStore, SqlSwitches, migrate
from persrec.models.checkpoint import load_checkpoint
from persrec.models.data import IdMap
from persrec.settings import Settings

from . import members
from .faust_adapter import install_abandoned_member_leave, install_idle_fetch_backoff, install_seek_record
from .manifest import Manifest
from .pipeline import Pipeline, create_app
from .registry import ItemRegistry
from .runtime import Runtime, StreamConfig
from .topics import create_topics
from .triton import TritonModels
from .view import WorkerView

log = logging.getLogger(__name__)


def load_serving_model(repository, version: int = 0) -> tuple[Manifest, IdMap]:
    """The manifest and id map of the repository's newest version, or of Triton ``version``."""
    manifest = Manifest.read(repository, version)
    ck = load_checkpoint(repository / "recommend" / str(manifest.triton_version) / "checkpoint.pt")
    return manifest, IdMap.from_json(ck.id_map_json)


def build_worker(settings: Settings, *, with_api: bool = True) -> tuple[faust.App, Pipeline]:
    install_idle_fetch_backoff(settings.kafka_idle_fetch_backoff_ms / 1000)
    install_abandoned_member_leave()
    install_seek_record()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    manifest, id_map = load_serving_model(settings.model_repository, settings.triton_version)
    create_topics(settings.kafka_bootstrap, {
        settings.topic_interactions: settings.partitions,
        settings.topic_recommendations: settings.partitions,
        settings.topic_dlq: settings.partitions,
        settings.topic_items: settings.partitions,
    })
    # A worker killed on this host left its group membership behind: the embedded broker never
    # expires it and this worker would wait forever for partitions (stream/members.py).
    members.evict_dead(settings.kafka_bootstrap, settings.app_id, members.registry(settings.work_dir, settings.app_id))
    db_url = settings.resolved_database_url
    migrate(db_url)
    cfg = StreamConfig(storage_dtype=settings.storage_dtype)
    registry: ItemRegistry | None = None

    async def make_runtime(read_window, triton_version: int | None = None, counters=None, triton_url=None):
        """The configured model's runtime, or Triton version ``triton_version``'s (a switch),
        served by the Triton at ``triton_url`` (None: PERSREC_TRITON_GRPC_URL)."""
        m, ids = (manifest, id_map) if triton_version is None else load_serving_model(
            settings.model_repository, triton_version)
        store = SqlMemoryStore(db_url, storage_dtype=settings.storage_dtype)
        models = TritonModels(triton_url or settings.triton_grpc_url, timeout_s=settings.triton_timeout_s, max_attempts=None,
                              version=str(m.triton_version), fold_model=m.fold_model)
        rt = Runtime(store, models, ids, m, cfg, read_window, counters)
        await registry.load(rt)
        return rt

    app = create_app(settings)
    pipeline = Pipeline(app, settings, make_runtime, SqlSwitches(db_url))
    pipeline.attach()
    registry = ItemRegistry(pipeline, SqlCatalogue(db_url) if manifest.catalogue else None)
    if manifest.catalogue:  # a model that reads items by id only has no use for the items topic
        registry.attach()
    if with_api:
        from persrec.serving.api import serve_in_worker

        serve_in_worker(app, settings, WorkerView(pipeline))
    log.info("worker for model %s (%s policy), DB %s", manifest.model_version, manifest.policy.value, db_url)
    return app, pipeline


def freeze_startup_objects() -> None:
    """Call once everything a worker imports and builds at startup exists (torch, Faust, the id
    map...), before the event loop starts: it lives as long as the process, so keep it out of the
    collector's full passes, which took 170-325 ms each in a benchmarked worker (gc.callbacks
    timing; benchmarks/stream_bench.py) and were the worst p99 stalls. Not inside the loop: a
    full collection there stalls the consumer's first fetches."""
    gc.collect()
    gc.freeze()


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    app, _ = build_worker(settings)
    freeze_startup_objects()
    worker = faust.Worker(app, loglevel=loglevel)
    worker.execute_from_commandline()
