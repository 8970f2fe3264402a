"""The worker's topics: created when missing, checked when present (any Kafka-protocol broker)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


def _admin(bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    timeout_ms = int(timeout_s * 1000)
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="persrec-topics",
                            bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms)


def create_topics(bootstrap: str, partitions: Mapping[str, int],
                  configs: Mapping[str, str] | None = None, replication_factor: int = 1,
                  timeout_s: float = 30.0) -> list[str]:
    """Make sure every topic exists with the given partition count; return the ones created.

    Idempotent: a topic that already exists with the same partition count is left alone, one with
    another count raises ``ValueError`` (Faust would stop on it with ``PartitionsMismatch``).
    ``configs`` (e.g. ``{"cleanup.policy": "compact"}``) apply to the topics created here. Waits
    until every new partition has a leader, so producers can use them right away.
    """
    admin = _admin(bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        wanted = {name: {"num_partitions": count, "replication_factor": replication_factor,
                         "configs": dict(configs or {})}
                  for name, count in partitions.items() if name not in existing}
        created: list[str] = []
        if wanted:
            response = admin.create_topics(wanted, timeout_ms=int(timeout_s * 1000),
                                           raise_errors=False)
            for topic in response["topics"]:
                if topic["error_code"] == 0:
                    created.append(topic["name"])
                elif topic["error_code"] != TopicAlreadyExistsError.errno:  # lost a race: fine
                    raise KafkaError(f"cannot create topic {topic['name']!r}: "
                                     f"error {topic['error_code']} {topic['error_message']}")
            admin.wait_for_topics(list(wanted), timeout_ms=int(timeout_s * 1000))
        _check_partition_counts(admin, partitions)
        if created:
            log.info("created topics %s on %s", created, bootstrap)
        return created
    finally:
        admin.close()


def _check_partition_counts(admin: KafkaAdminClient, partitions: Mapping[str, int]) -> None:
    described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(partitions))}
    wrong = {name: (described.get(name), count) for name, count in partitions.items()
             if described.get(name) != count}
    if wrong:
        detail = ", ".join(f"{n!r} has {have} partitions, wanted {want}"
                           for n, (have, want) in wrong.items())
        raise ValueError(f"topics exist with other partition counts: {detail}")
