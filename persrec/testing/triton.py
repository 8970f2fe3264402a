"""Pytest fixture for real tritonserver processes, started only when requested.

    @pytest.fixture(scope="module")
    def triton(triton_factory, model_repo):
        return triton_factory(model_repo, ["ranker"])

Every server started through the factory is stopped at the end of the session (or earlier by
the test, with ``stop()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from persrec.embedded.triton import EmbeddedTriton

TritonFactory = Callable[..., "EmbeddedTriton"]


@pytest.fixture(scope="session")
def triton_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFactory]:
    """``start(model_repository, models, **kwargs) -> EmbeddedTriton``, started and ready.

    ``kwargs`` go to ``EmbeddedTriton`` (ports, ``extra_args``, ...); each server gets its own
    work dir under the session's tmp dir.
    """
    from persrec.embedded.triton import EmbeddedTriton  # imported only when the fixture is used

    started: list[EmbeddedTriton] = []

    def start(model_repository: Path, models: Sequence[str], **kwargs: Any) -> EmbeddedTriton:
        kwargs.setdefault("work_dir", tmp_path_factory.mktemp("triton"))
        server = EmbeddedTriton(model_repository, models, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()
