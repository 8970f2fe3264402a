"""Model changes made while the workers run, in tables ``model_switch`` and ``switch_offset``.

``persrec switch`` requests one (``request``): the worker group ``app_id`` moves from one Triton
version of the repository to another, each served by the workers' own Triton or by the one at
the URL the request names (a second tritonserver for the new version: nothing is loaded into the
serving one under traffic). Each worker takes the request up while it runs; for each
input partition, the first worker to answer an event of it with the new model records that
event's offset (``record``): every event of the partition before it is the old model's to
answer, every one from it the new model's, whichever worker owns the partition then or later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from persrec.memory.engine import EngineUser
from persrec.memory.rows import as_utc, utc_now
from persrec.memory.schema import ModelSwitch, SwitchOffset

_S, _O = ModelSwitch.__table__, SwitchOffset.__table__


@dataclass(frozen=True)
class SwitchRequest:
    from_triton_version: int
    to_triton_version: int
    to_model_version: str
    requested_at: datetime
    from_triton_url: str | None = None  # None: the workers' own Triton (PERSREC_TRITON_GRPC_URL)
    to_triton_url: str | None = None

    def triton_url(self, triton_version: int) -> str | None:
        """Where ``triton_version`` (one of the two) is served; None: the workers' own Triton."""
        return self.to_triton_url if triton_version == self.to_triton_version else self.from_triton_url


class SqlSwitches(EngineUser):
    """Thread-safe like ``SqlMemoryStore``: each call is one short transaction."""

    def request(self, app_id: str, from_triton_version: int, to_triton_version: int, to_model_version: str,
                clock=utc_now, *, from_triton_url: str | None = None, to_triton_url: str | None = None) -> SwitchRequest:
        """Ask ``app_id``'s workers to move to ``to_triton_version``; replaces an earlier request
        and forgets its offsets (a rollback is a request the other way). A version served by
        another Triton than the workers' own is named with its gRPC URL."""
        req = SwitchRequest(from_triton_version, to_triton_version, to_model_version, clock(),
                            from_triton_url, to_triton_url)
        with self._writer.begin() as conn:
            conn.execute(_O.delete().where(_O.c.app_id == app_id))
            conn.execute(_S.delete().where(_S.c.app_id == app_id))
            conn.execute(_S.insert().values(app_id=app_id, **req.__dict__))
        return req

    def current(self, app_id: str) -> SwitchRequest | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(_S).where(_S.c.app_id == app_id)).mappings().first()
        if row is None:
            return None
        return SwitchRequest(int(row["from_triton_version"]), int(row["to_triton_version"]),
                             row["to_model_version"], as_utc(row["requested_at"]),
                             row["from_triton_url"], row["to_triton_url"])

    def offsets(self, app_id: str, to_model_version: str) -> dict[int, int]:
        """Partition -> the first offset the new model answers, for the partitions switched."""
        q = select(_O.c.partition_id, _O.c.first_offset).where(
            _O.c.app_id == app_id, _O.c.to_model_version == to_model_version)
        with self._engine.connect() as conn:
            return {int(p): int(o) for p, o in conn.execute(q).all()}

    def record(self, app_id: str, to_model_version: str, partition: int, offset: int, clock=utc_now) -> int:
        """Record ``offset`` as ``partition``'s switch unless one is recorded already; returns
        the one in effect (the first recorded)."""
        try:
            with self._writer.begin() as conn:
                conn.execute(_O.insert().values(app_id=app_id, to_model_version=to_model_version,
                                                partition_id=partition, first_offset=offset, recorded_at=clock()))
            return offset
        except IntegrityError:
            return self.offsets(app_id, to_model_version)[partition]

    def finish(self, app_id: str) -> bool:
        """Forget ``app_id``'s switch (the old model is retired); False if there was none."""
        with self._writer.begin() as conn:
            conn.execute(_O.delete().where(_O.c.app_id == app_id))
            return conn.execute(_S.delete().where(_S.c.app_id == app_id)).rowcount > 0
