"""Training recipes: every setting in which our HSTU setup and the official one differ
(facebookresearch/generative-recommenders, ``configs/ml-1m/hstu-sampled-softmax-n128-final.gin``),
as one named, typed object. Each difference can be switched alone (``DIFFERENCES``), so its
effect can be measured; ``RECIPES`` holds the named ones.

A recipe says how to build (``model_overrides``), train (``train_config``) and read
(``seen_rule``, ``selection``) a model; the backbone's sizes (dim, layers, memory tokens...)
are not part of it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from .evaluate import SeenRule
from .items import NewItemIds
from .loss import Negatives
from .train import Batching, History, Optimizer, TrainConfig


class Selection(str, enum.Enum):
    """Which epoch's weights a run reports."""

    VALID = "valid"  # the best validation NDCG@10 (held-out protocol)
    LAST = "last"  # the last epoch (the official code has no validation split)


@dataclass(frozen=True)
class Recipe:
    name: str
    # loss
    negatives: Negatives = Negatives.SHARED
    num_negatives: int = 512
    temperature: float = 0.05
    # optimiser and batches
    optimizer: Optimizer = Optimizer.ADAM
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr: float = 1e-3
    batching: Batching = Batching.BY_LENGTH
    batch_size: int = 128
    epochs: int = 100
    patience: int | None = 10  # validations without improvement before stopping; None: never
    # each user's last max_len events (``window``); max_len windows ending anywhere, drawn each
    # epoch (``anywhere``, models without memory); INCREMENTAL: windows anywhere with the memory
    # of what precedes them carried in, read as served (``lifelong``)
    history: History = History.WINDOW
    fold_grad: int = 0  # lifelong: how many of the folds carried in keep their gradient
    memory_carry: bool = False  # INCREMENTAL: each fold starts from the previous memory (ModelConfig)
    # model details
    time_bias: bool = False  # used where the data has timestamps
    request_time: bool = False  # with time_bias: its query is the predicted event's time
    num_time_buckets: int = 64
    abs_positions: bool = False
    norm_affine: bool = True
    projection_bias: bool = True
    official_init: bool = False
    bias_init_std: float = 0.0
    attention_norm_extra: int | None = None  # divide attention by max_len + this (None: max_len)
    id_dropout: float = 0.0  # id+text models: share of items seen by text alone in each step
    new_item_ids: NewItemIds = NewItemIds.ZERO  # id+text models: an untrained item's id part
    # reading the result
    seen_window: int | None = None  # exclude the last this-many history items (None: all)
    selection: Selection = Selection.VALID
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name, kind in (("negatives", Negatives), ("optimizer", Optimizer),
                           ("batching", Batching), ("selection", Selection), ("history", History),
                           ("new_item_ids", NewItemIds)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def with_(self, name: str | None = None, **changes: Any) -> "Recipe":
        """A copy with ``changes`` (field values, strings accepted for enums)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown recipe settings {sorted(unknown)}; known: {settings()}")
        return dataclasses.replace(self, name=name or self.name, **changes)

    def model_overrides(self, max_len: int, has_timestamps: bool) -> dict[str, Any]:
        """``ModelConfig`` fields this recipe sets (the time bias only with timestamps)."""
        timed = self.time_bias and has_timestamps
        return dict(
            num_negatives=self.num_negatives, temperature=self.temperature,
            time_bias=timed, request_time=timed and self.request_time,
            num_time_buckets=self.num_time_buckets, abs_positions=self.abs_positions,
            norm_affine=self.norm_affine, projection_bias=self.projection_bias,
            official_init=self.official_init, bias_init_std=self.bias_init_std,
            attention_norm=0 if self.attention_norm_extra is None else max_len + self.attention_norm_extra,
            **({"id_dropout": self.id_dropout} if self.id_dropout else {}),
            **({"memory_carry": True} if self.memory_carry else {}),
            **({"new_item_ids": self.new_item_ids} if self.new_item_ids is not NewItemIds.ZERO else {}),
        )

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The ``TrainConfig`` of this recipe; ``overrides`` (seed, eval_every, ...) win."""
        base = dict(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                    weight_decay=self.weight_decay, optimizer=self.optimizer, betas=self.betas,
                    batching=self.batching, negatives=self.negatives, patience=self.patience,
                    history=self.history, fold_grad=self.fold_grad)
        return TrainConfig(**(base | overrides))

    def seen_rule(self, max_len: int) -> SeenRule:
        return SeenRule(window=None if self.seen_window is None else self.seen_window or max_len)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()}


def settings() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "notes")]


OURS = Recipe(
    "ours", notes="this project's setup before issue 18: 512 negatives shared by a sequence's "
    "positions, Adam, batches by length, affine LayerNorms, biased projection, zero-initialised "
    "biases, attention / max_len, early stopping on validation")

# Each official difference alone: the fields that turn OURS into OFFICIAL for that one item.
DIFFERENCES: dict[str, dict[str, Any]] = {
    "negatives": dict(negatives=Negatives.PER_POSITION, num_negatives=128),
    "optimizer": dict(optimizer=Optimizer.ADAMW, betas=(0.9, 0.98)),
    "batching": dict(batching=Batching.SHUFFLE),
    "time_bias": dict(time_bias=True, request_time=True, num_time_buckets=129),
    "abs_positions": dict(abs_positions=True),
    "norm_init": dict(norm_affine=False, projection_bias=False, official_init=True),
    "bias_init": dict(bias_init_std=0.02),
    "attention_norm": dict(attention_norm_extra=11),
    "epochs": dict(epochs=101, patience=None),
    "seen_window": dict(seen_window=0),  # 0: the model's window (max_len)
    "selection": dict(selection=Selection.LAST),
}

OFFICIAL = OURS.with_(
    "official", **{k: v for d in DIFFERENCES.values() for k, v in d.items()},
    notes="every row of the official ML-1M HSTU setup (issue 18's table)")

# What we train with: the official recipe without absolute positions, which a memory row cannot
# have (ModelConfig), read at the best validation epoch over the whole history. Measured beyond
# it on ML-1M (BENCHMARKS.md): a full softmax instead of 128 per-position negatives gave no
# difference (test NDCG@10 .1682 +- .0027 against .1677 +- .0019, 3 seeds) at 3.6x the CPU step.
BEST = OFFICIAL.with_(
    "best", abs_positions=False, seen_window=None, selection=Selection.VALID,
    notes="the official recipe without absolute positions (undefined for a memory row), read at "
    "the best validation epoch with every history item excluded")

RECIPES: dict[str, Recipe] = {r.name: r for r in (OURS, OFFICIAL, BEST)}


def parse_setting(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, typed value) for ``Recipe.with_`` (CLI ``--set``)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in settings():
        raise ValueError(f"expected KEY=VALUE with KEY one of {settings()}, got {text!r}")
    default = getattr(OURS, key)
    raw = raw.strip()
    if raw.lower() in ("none", "null") and key in ("patience", "seen_window", "attention_norm_extra"):
        return key, None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key} takes true or false, got {raw!r}")
        return key, raw.lower() in ("true", "1", "yes")
    if isinstance(default, tuple):
        return key, tuple(float(x) for x in raw.split(","))
    if isinstance(default, enum.Enum):
        return key, type(default)(raw)
    if isinstance(default, float):
        return key, float(raw)
    if isinstance(default, int) or default is None:
        return key, int(raw)
    return key, raw


def recipe_named(name: str, sets: list[str] = ()) -> Recipe:
    """A recipe from an expression: a name of ``RECIPES``, then ``+``-separated parts, each a
    difference of ``DIFFERENCES`` or a ``key=value`` setting, applied left to right, then
    ``sets`` (``["key=value", ...]``). E.g. ``ours+negatives+optimizer`` (OURS with those two
    official differences), ``official+time_bias=false``."""
    base, *parts = name.split("+")
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {base!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[base]
    for part in parts:
        if "=" in part:
            recipe = recipe.with_(**dict([parse_setting(part)]))
        elif part in DIFFERENCES:
            recipe = recipe.with_(**DIFFERENCES[part])
        else:
            raise ValueError(f"unknown difference {part!r}; known: {sorted(DIFFERENCES)} or KEY=VALUE")
    changes = dict(parse_setting(s) for s in sets)
    label = name + "".join(f"+{k}={v}" for k, v in changes.items())
    return recipe.with_(label, **changes)
