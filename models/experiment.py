"""Dataset file -> trained, evaluated, checkpointed model: the function behind ``persrec train``."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .data import IdMap, SequenceData, Split, all_but_test, build_sequences, k_core, leave_one_out
from .logs import load_interactions
from .synthetic import dormant_interest_interactions, steady_taste_interactions, synthetic_interactions
from .evaluate import SeenRule, evaluate, popularity_metrics
from .items import forget_items
from .loss import build_model
from .train import EpochReport, FitResult, TrainConfig, fit

log = logging.getLogger(__name__)
SYNTHETIC = "synthetic"
GENERATED = {  # name -> (label, generator): data sets made here, not read
    SYNTHETIC: ("SYNTHETIC (generated, not real users)",
                lambda: synthetic_interactions(num_users=600, num_items=400, mean_len=60)),
    "synthetic-dormant": ("SYNTHETIC dormant interest (generated, not real users; the test target is told only by "
                          "events 60-100 back)", dormant_interest_interactions),
    "synthetic-recurring": ("SYNTHETIC recurring taste (generated, not real users; one taste item after a week away "
                            "every 25-55 events, its cluster told only by the earlier ones)",
                            lambda: dormant_interest_interactions(num_users=600, phases=10, wander=(25, 55), taste_len=1)),
    "synthetic-steady": ("SYNTHETIC steady taste (generated, not real users; one event in ten is of the user's "
                         "taste cluster, the rest wander; the more history read, the surer the taste)",
                         steady_taste_interactions),
    "synthetic-taste": ("SYNTHETIC taste in noise (generated, not real users; three events in ten are of the "
                        "user's taste cluster, the rest any item at random)",
                        lambda: steady_taste_interactions(num_users=3000, rate=0.3, noise="uniform")),
}


class Protocol(str, enum.Enum):
    """What a model trains on; the test row is always each user's last event.

    HELDOUT: all but each user's last two events; the second to last is the validation target
    that early stopping watches (the SASRec protocol).
    PUBLISHED: all but the last event, a fixed number of epochs, no validation (the protocol of
    the HSTU repository's published ML-1M numbers).
    """

    HELDOUT = "heldout"
    PUBLISHED = "published"


@dataclass
class Dataset:
    name: str
    sequences: SequenceData
    id_map: IdMap
    split: Split


def load_dataset(path: str | Path | None, fmt: str = "auto", *, id_map: IdMap | None = None,
                 columns: Mapping[str, str] | None = None, min_events: int = 0) -> Dataset:
    """Read a dataset file (or ``None``, or a name in ``GENERATED``, for a labelled synthetic set).
    ``columns``: ``load_interactions``' column names (``logs.parse_columns``); ``min_events``:
    keep its ``data.k_core`` (0: everything)."""
    if path is None or str(path) in GENERATED:
        name, generate = GENERATED[SYNTHETIC if path is None else str(path)]
        inter = generate()
    else:
        name, inter = str(path), load_interactions(path, fmt, **(columns or {}))
    inter = k_core(inter, min_events)
    seqs, id_map = build_sequences(inter, id_map)
    return Dataset(name, seqs, id_map, leave_one_out(seqs))


def train_on(
    data: Dataset, model_overrides: dict[str, Any], train_cfg: TrainConfig, *,
    out_dir: Path | None, device: torch.device | str = "cpu", resume: Path | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None, protocol: Protocol = Protocol.HELDOUT,
    test_rules: dict[str, SeenRule] | None = None, text_embeddings=None,
    unknown_items: np.ndarray | None = None,
) -> tuple[torch.nn.Module, FitResult]:
    """Build the model of ``model_overrides`` and train it on ``data`` under ``protocol``. With
    ``train_cfg.test_every``, the test rows are evaluated along the way under ``test_rules``
    (recorded in the history, never used to choose weights). ``text_embeddings`` ``[I, E]``: the
    items' text embeddings, for a model whose items are (partly) their text. ``unknown_items``:
    dense ids the model must learn nothing about, as items published after training (the
    cold-start evaluation): their id embedding stays zero and they are never drawn as negatives
    (the caller has removed them from the training sequences)."""
    cfg = ModelConfig(num_items=data.id_map.num_items, **model_overrides)
    if resume is not None:  # the checkpoint's configuration wins
        cfg = load_checkpoint(resume).config
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg)
    if cfg.item_repr.has_text:
        if text_embeddings is None:
            raise ValueError(f"item_repr {cfg.item_repr.value!r} needs the items' text embeddings")
        model.item_emb.set_text(text_embeddings)
    pool = None
    if unknown_items is not None and len(unknown_items):
        forget_items(model.item_emb, unknown_items)
        pool = np.setdiff1d(np.arange(1, cfg.num_items + 1), unknown_items)
    train, valid = data.split.train, data.split.valid
    if Protocol(protocol) is Protocol.PUBLISHED:
        train, valid = all_but_test(data.sequences), None
    result = fit(
        model, train.items, train.timestamps, valid, train_cfg,
        device=device, id_map_json=data.id_map.to_json(), out_dir=out_dir, resume=resume,
        on_epoch=on_epoch, test_rows=data.split.test, test_rules=test_rules, negative_pool=pool,
    )
    return model, result


def test_report(
    model: torch.nn.Module, data: Dataset, *, device: torch.device | str = "cpu", seen: SeenRule = SeenRule(),
) -> dict[str, Any]:
    """Test-split metrics of the model next to a most-popular ranker, as one JSON-able dict."""
    return {
        "dataset": data.name,
        "users": len(data.sequences),
        "items": data.id_map.num_items,
        "test_rows": len(data.split.test),
        "model": model.cfg.to_dict(),
        "seen": {"rule": seen.seen.value, "window": seen.window},
        "test": evaluate(model, data.split.test, device=device, seen=seen),
        "popularity_test": popularity_metrics(data.split.train.items, data.id_map.num_items, data.split.test, seen=seen),
    }


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))
