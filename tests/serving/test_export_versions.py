"""Two model versions served side by side (issue 22): ``persrec export --version N+1`` keeps
version N loaded when one config serves both, so workers pinned to N go on being answered while
N+1 loads, and a worker can be started on N again (``PERSREC_TRITON_VERSION``)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.serving.export import export_repository
from persrec.serving.inference import ModelRunner
from persrec.stream.manifest import Manifest

IDS = IdMap([str(i) for i in range(1, 51)])


def checkpoint(seed: int, **kw):
    cfg = ModelConfig(num_items=50, dim=16, num_heads=2, head_dim=8, max_len=20, dropout=0.0, **kw)
    torch.manual_seed(seed)
    return make_checkpoint(build_model(cfg), IDS.to_json())


def recommend_on(server, x: ModelInputs, version: str = ""):
    """(ready, (ids, scores)): ``x`` through the worker's Triton client, ``version`` pinned."""
    from persrec.stream.triton import TritonModels

    async def ask():
        models = TritonModels(server.grpc_url, timeout_s=10, max_attempts=2, version=version)
        try:
            return await models.ready(), await models.recommend(x)
        finally:
            await models.close()

    return asyncio.run(ask())


def test_config_keeps_the_previous_version_only_when_it_fits(tmp_path) -> None:
    a, b, c = checkpoint(1), checkpoint(2), checkpoint(3, num_memory_tokens=2, recent_len=5, segment_len=5)
    config = tmp_path / "recommend" / "config.pbtxt"
    export_repository(a, tmp_path, version=1)
    assert "version_policy: { latest: { num_versions: 2 } }" in config.read_text()
    unchanged = config.read_text()
    export_repository(b, tmp_path, version=2)
    export_repository(checkpoint(5), tmp_path, version=3)
    assert config.read_text() == unchanged  # Triton loads each new version and reloads nothing
    assert Manifest.read(tmp_path).model_version != b.model_version
    assert Manifest.read(tmp_path, 1).model_version == a.model_version
    assert Manifest.read(tmp_path, 2).model_version == b.model_version
    with pytest.raises(FileNotFoundError, match="no version 7"):
        Manifest.read(tmp_path, 7)
    # Triton takes every directory at the top of a repository for a model and fails to start
    # (``startup_models *``) on one without a config
    assert all((d / "config.pbtxt").is_file() for d in tmp_path.iterdir() if d.is_dir())
    # a model with other inputs (memory) cannot share the config: it is served alone
    export_repository(c, tmp_path, version=4)
    assert "num_versions: 1" in config.read_text()


def inference_count(server, model: str, version: str) -> int:
    """Triton's count of rows ``version`` of ``model`` has run since it was (re)loaded."""
    client = server.client()
    try:
        stats = client.get_inference_statistics(model, version)["model_stats"]
    finally:
        client.close()
    return int(stats[0]["inference_count"])


@pytest.mark.triton
def test_triton_answers_both_versions_each_with_its_own_model(tmp_path, triton_factory) -> None:
    a, b = checkpoint(1), checkpoint(2)
    export_repository(a, tmp_path, version=1)
    server = triton_factory(tmp_path, ["recommend"])
    x = ModelInputs.of_rows([[1, 2, 3], [7, 8]], [[0, 0, 0], [0, 0]])
    recommend_on(server, x, "1")
    assert inference_count(server, "recommend", "1") == 2
    export_repository(b, tmp_path, version=2)
    server.load_model("recommend")  # version 2 loads; version 1 stays
    # ... the instance that served it, not a reloaded one (a reload starts its count at 0): the
    # python backend left its version directory as exported (``block_bytecode_cache``)
    assert inference_count(server, "recommend", "1") == 2
    assert (tmp_path / "recommend" / "1" / "__pycache__").is_file()
    for ck, version in ((a, "1"), (b, "2")):
        ready, (ids, scores) = recommend_on(server, x, version)
        want_ids, want_scores = ModelRunner(ck, "cpu").recommend(x, 10)
        assert ready and np.array_equal(ids, want_ids) and np.allclose(scores, want_scores, atol=1e-5)
    server.stop()


def test_the_window_cache_reports_to_triton_only_when_asked(tmp_path) -> None:
    """Off by default: tritonserver's python-backend custom metrics can crash it when a model is
    reloaded in place (``serving.export``)."""
    memory_model = checkpoint(3, num_memory_tokens=2, recent_len=5, segment_len=5)
    for metrics, want in ((None, "false"), (True, "true")):
        out = tmp_path / str(metrics)
        export_repository(memory_model, out, **({} if metrics is None else {"window_cache_metrics": metrics}))
        config = (out / "recommend" / "config.pbtxt").read_text()
        assert f'key: "window_cache_metrics" value {{ string_value: "{want}" }}' in config


@pytest.mark.triton
def test_triton_reports_no_cache_metrics_by_default(tmp_path, triton_factory) -> None:
    from persrec.serving.window_cache import METRICS

    memory_model = checkpoint(3, num_memory_tokens=2, recent_len=5, segment_len=5)
    export_repository(memory_model, tmp_path)
    server = triton_factory(tmp_path, ["recommend"])
    x = ModelInputs.of_rows([[1, 2, 3], [7, 8]], [[0, 0, 0], [0, 0]],
                            memory=np.zeros((2, *memory_model.config.memory_shape), np.float32),
                            has_memory=np.zeros(2, bool))
    for _ in range(2):  # the second request hits the cache
        _, (ids, _) = recommend_on(server, x)
        assert ids.shape == (2, 10)
    assert server.metrics(METRICS) == {}
    server.stop()
