"""One typed settings object, read from ``PERSREC_*`` environment variables at the entry point
and passed down as plain arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
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
    partitions: int = Field(4, ge=1)

    # memory store
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite in work_dir")

    # Triton
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_timeout_s: float = Field(5.0, gt=0)

    # status API
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: SecretStr | None = None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.work_dir / 'persrec.db').resolve()}"
