"""Named backbone shapes (the official HSTU configs per data set) and `persrec train --shape`."""

from __future__ import annotations

import pytest
import torch

from persrec.models.config import ModelConfig
from persrec.models.layout import collate
from persrec.models.loss import build_model
from persrec.models.recipe import recipe_named
from persrec.models.shapes import SHAPES, shape_named


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_builds_a_model_that_reads_a_window(name) -> None:
    s = shape_named(name)
    cfg = ModelConfig(num_items=30, max_len=s.max_len, dim=s.dim, num_layers=s.layers, num_heads=s.heads,
                      head_dim=s.head_dim, dropout=s.dropout, **recipe_named("best").model_overrides(s.max_len, False))
    model = build_model(cfg).eval()
    assert len(model.backbone.layers) == s.layers
    with torch.no_grad():
        hidden = model(collate([torch.arange(1, 8).numpy()], cfg))
    assert hidden.shape[-1] == s.dim and torch.isfinite(hidden).all()
    recipe_named("best", list(s.recipe_sets))  # its recipe settings are valid ones


def test_shapes_follow_the_official_configs_and_flags_override_them() -> None:
    books = shape_named("amzn-books")
    assert (books.max_len, books.dim, books.layers, books.heads, books.head_dim, books.dropout) == (50, 64, 4, 4, 16, 0.5)
    assert (recipe_named("best", list(books.recipe_sets)).num_negatives, recipe_named("best", list(books.recipe_sets)).epochs) == (512, 201)
    assert books.overridden(dim=32, layers=None) == shape_named("amzn-books").overridden(dim=32)
    assert books.overridden(dim=32).dim == 32 and books.overridden(dim=32).layers == 4
    with pytest.raises(ValueError, match="unknown shape 'ml-100m'"):
        shape_named("ml-100m")


def test_persrec_train_takes_a_shape_and_the_flags_win(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from persrec.cli import app
    from persrec.models.checkpoint import load_checkpoint

    monkeypatch.setenv("PERSREC_WORK_DIR", str(tmp_path / "var"))
    out = tmp_path / "m"
    run = lambda *extra: CliRunner().invoke(app, ["train", "synthetic", "--epochs", "1", "--threads", "1",  # noqa: E731
                                                  "--out", str(out), *extra])
    result = run("--shape", "amzn-books", "--dim", "16", "--layers", "1")
    assert result.exit_code == 0, result.output
    cfg = load_checkpoint(out / "best.pt").config
    assert (cfg.max_len, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.dropout, cfg.num_negatives) == (
        50, 16, 1, 4, 16, 0.5, 512)
    bad = run("--shape", "ml-100m")
    assert bad.exit_code != 0 and "--shape" in bad.output
