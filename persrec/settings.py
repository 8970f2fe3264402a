"""One typed settings object, read from ``PERSREC_*`` environment variables at the entry point
and passed down as plain arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERSREC_", frozen=True, extra="ignore")

    # where things live
    work_dir: Path = Field(Path("var"), description="runtime state: checkpoints, DB, service data")
    device: str = Field("auto", description="torch device: auto (CUDA if present), cpu, cuda:N")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_interactions: str = "interactions"
    topic_recommendations: str = "recommendations"
    topic_dlq: str = "interactions.dlq"
    topic_items: str = Field("items", description="item catalogue: {item_id, text, ts} keyed by item id")
    partitions: int = Field(4, ge=1)
    kafka_linger_ms: int = Field(
        5, ge=0, description="producer wait to fill a batch: fewer, larger produce requests")
    kafka_idle_fetch_backoff_ms: float = Field(
        20.0, ge=0, description="pause after an empty fetch that returned at once (stream/faust_adapter.py)")
    offset_guard: bool = Field(
        True, description="hold back an input event whose partition skipped an offset and read the partition "
                          "again from it (stream/offsets.py); off for topics written by transactional "
                          "producers, whose commit markers take offsets: each would cost a few seeks")

    partition_stall_s: float = Field(
        30.0, gt=0, description="an input partition whose records wait at the broker but have not reached a "
                                "free agent for this long is read again (stream/stalls.py)")
    recovery_stall_s: float = Field(
        5.0, gt=0, description="a table changelog partition whose recovery has not moved for this long while "
                                "records wait at the broker is read again (stream/stalls.py)")

    # stream worker
    app_id: str = Field("persrec", description="Faust app id = Kafka consumer group")
    model_repository: Path = Field(Path("var/model_repository"), description="from `persrec export`")
    triton_version: int = Field(
        0, ge=0, description="the repository version a worker serves; 0 = its newest (manifest.json). A rollback "
                             "starts workers on the previous version while Triton keeps it loaded")
    top_k: int = Field(10, ge=1, le=1000)
    fold_interval_s: float = Field(
        0.1, gt=0, description="pause between fold passes (a busy user's window grows meanwhile)")
    max_batch: int = Field(256, ge=1, description="events per Triton recommend call")
    batch_wait_ms: float = Field(
        20.0, ge=0, description="how long a batch waits to fill: longer means fewer, larger model calls "
                                "(less CPU per event, a shorter tail under load) and a later answer at low load")
    max_in_flight_batches: int = Field(
        2, ge=1, description="recommend batches processed at once: one in Triton while the worker publishes "
                             "another; more split a user's burst over more batches, each its own model pass")
    storage_dtype: str = Field("float16", pattern="^(float16|float32)$")
    item_batch: int = Field(256, ge=1, description="items per encode_items call")
    item_batch_wait_ms: float = Field(20.0, ge=0, description="how long an items batch waits to fill")
    catalogue_poll_s: float = Field(
        0.5, gt=0, description="how often a worker reads the items other workers registered")
    switch_poll_s: float = Field(
        1.0, gt=0, description="how often a worker looks for a model switch (persrec switch)")
    worker_web_port: int = Field(6066, description="Faust's own web server")

    # memory store
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite in work_dir")

    # Triton
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_timeout_s: float = Field(30.0, gt=0, description="deadline of one Triton call (retried)")

    # status API
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: SecretStr | None = None

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_means_none(cls, v):
        """An empty token must not make ``Authorization: Bearer `` valid: it disables DELETE."""
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.work_dir / 'persrec.db').resolve()}"
