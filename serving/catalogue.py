"""The served item table follows the item catalogue (``memory.SqlCatalogue``).

A worker registers items from the ``items`` topic in the database and sends, with every
``recommend`` and ``fold`` request, the catalogue revision it has applied. A Triton model instance
behind that revision reads the rows after its own from the database before it answers, the way
an inference server reads embeddings from a parameter store: every instance, every Triton
restart and every worker end up reading the same table, and nothing is pushed to one instance.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from persrec.memory import SqlCatalogue

    from .inference import ModelRunner

log = logging.getLogger(__name__)


class CatalogueUnavailable(RuntimeError):
    """The rows a request needs cannot be read now. The message says "unavailable", which the
    worker's Triton client retries (``stream.triton``): it waits, as for any outage."""


class CatalogueFollower:
    def __init__(self, runner: ModelRunner, database_url: str) -> None:
        self.runner = runner
        self.database_url = database_url
        self._store: SqlCatalogue | None = None

    def unavailable(self, x) -> str | None:
        """Catch up with the newest revision the rows of ``x`` (``ModelInputs``) carry; the
        error a Triton model answers them with when it cannot, None when it did."""
        try:
            self.sync(int(x.catalogue[:, 0].max()))
        except CatalogueUnavailable as exc:
            return str(exc)
        return None

    def sync(self, revision: int) -> None:
        """Apply the catalogue up to at least ``revision`` (no-op when already there)."""
        have = self.runner.catalogue_revision
        if revision <= have:
            return
        if not self.database_url:
            raise CatalogueUnavailable(
                f"item catalogue unavailable: a request needs revision {revision}, and PERSREC_DATABASE_URL "
                "is not set in Triton's environment (set it to the workers' database)")
        try:
            if self._store is None:
                from persrec.memory import SqlCatalogue  # SQLAlchemy: only where a catalogue is served

                self._store = SqlCatalogue(self.database_url)
            rows = self._store.since(self.runner.model_version, have)
        except Exception as exc:  # noqa: BLE001 - the database is down or unreachable: retried
            raise CatalogueUnavailable(f"item catalogue unavailable: {type(exc).__name__}: {exc}") from exc
        self.runner.apply_catalogue(rows)
        if rows:
            log.info("catalogue: %d rows applied, revision %d -> %d, %d items",
                     len(rows), have, self.runner.catalogue_revision, self.runner.num_items)
        if self.runner.catalogue_revision < revision:
            raise CatalogueUnavailable(f"item catalogue unavailable: revision {revision} is not in the database "
                                       f"(it has {self.runner.catalogue_revision})")
