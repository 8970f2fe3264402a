"""Training: the examples laid out once, batches by length or shuffled, sampled or full
softmax, periodic validation (and test, recorded, never selected on), early stopping,
checkpoints and resume; DistributedDataParallel when launched under ``torchrun``."""

from __future__ import annotations

import copy
import enum
import gc
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .evaluate import Evaluator, SeenRule
from .layout import PAD, LayoutBatch, collate
from .loss import Negatives, next_item_loss

log = logging.getLogger(__name__)


class Optimizer(str, enum.Enum):
    ADAM = "adam"  # torch.optim.Adam: weight decay added to the gradient (L2)
    ADAMW = "adamw"  # decoupled weight decay (the official HSTU setup, with decay 0)


class Batching(str, enum.Enum):
    BY_LENGTH = "by_length"  # similar lengths together (less padding), batches in random order
    SHUFFLE = "shuffle"  # users in random order (the official setup)


class History(str, enum.Enum):
    """Which part of a user's history a training example covers, and how it is read."""

    WINDOW = "window"  # each user's last max_len events, laid out from their start
    ANYWHERE = "anywhere"  # no memory: a max_len window ending anywhere, drawn again each epoch
    LIFELONG = "lifelong"  # INCREMENTAL: a window anywhere, with the memory of what precedes it


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # upper bound on passes over the users
    batch_size: int = 128  # sequences per step (per process under DDP)
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Optimizer = Optimizer.ADAM
    betas: tuple[float, float] = (0.9, 0.999)
    batching: Batching = Batching.BY_LENGTH
    negatives: Negatives = Negatives.SHARED
    history: History = History.WINDOW
    # LIFELONG: of the folds carried in before a window, how many (the last ones) keep their
    # gradient: truncated backpropagation through that many folds beyond the window's own
    fold_grad: int = 0
    eval_every: int = 1  # epochs between validations and last.pt checkpoints
    patience: int | None = 10  # validations without a better NDCG@10 before stopping; None: never
    max_minutes: float | None = None  # wall-clock budget; stops after the epoch that passes it
    seed: int = 42
    eval_batch_size: int = 256
    test_every: int = 0  # also evaluate the test rows every this many epochs (0: never); recorded
    # in the history for learning curves and last-epoch figures, never used to pick an epoch

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", Optimizer(self.optimizer))
        object.__setattr__(self, "batching", Batching(self.batching))
        object.__setattr__(self, "negatives", Negatives(self.negatives))
        object.__setattr__(self, "history", History(self.history))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


def plain_dict(cfg: TrainConfig) -> dict:
    """``cfg`` as JSON types (enums as their values), as checkpoints store it."""
    return json.loads(json.dumps(asdict(cfg)))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if cfg.optimizer is Optimizer.ADAMW else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


@dataclass
class EpochReport:
    epoch: int
    loss: float
    seconds: float
    valid: dict[str, float] | None = None
    test: dict[str, dict[str, float]] | None = None  # seen rule -> metrics (``test_every``)


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[EpochReport] = field(default_factory=list)
    checkpoint: Path | None = None


def trainable(seqs: list[np.ndarray]) -> list[int]:
    """The users a next-item example can be made of: those with two events or more."""
    return [i for i, s in enumerate(seqs) if len(s) >= 2]


def training_examples(
    seqs: list[np.ndarray], ts: list[np.ndarray] | None, max_len: int,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]:
    """Each user's last ``max_len`` next-item pairs: inputs ``s[:-1]``, targets ``s[1:]``; with
    times, the inputs' times ``t[:-1]`` and their queries' times ``t[1:]`` (each position's
    query is asked when its target happens)."""
    keep = trainable(seqs)
    inputs = [seqs[i][:-1][-max_len:] for i in keep]
    targets = [seqs[i][1:][-max_len:] for i in keep]
    times = None if ts is None else [ts[i][:-1][-max_len:] for i in keep]
    query_times = None if ts is None else [ts[i][1:][-max_len:] for i in keep]
    return inputs, targets, times, query_times


class Examples:
    """Every training example laid out once (``collate``), on the training device; a batch is a
    gather of rows cut to the longest of them, so no step lays anything out again."""

    def __init__(self, seqs: list[np.ndarray], ts: list[np.ndarray] | None, cfg, device) -> None:
        inputs, targets, times, qtimes = training_examples(seqs, ts, cfg.max_len)
        if not inputs:
            raise ValueError("no user has two events to train on")
        self.cfg, self.device = cfg, device
        self._lay_out(inputs, targets, times, qtimes)

    def _lay_out(self, inputs, targets, times, qtimes) -> None:
        self.all: LayoutBatch = collate(inputs, self.cfg, targets, times, qtimes).to(self.device)
        self.width = (self.all.kind != PAD).sum(1).cpu().numpy()  # [U] laid-out length per row
        self.lengths = np.array([len(x) for x in inputs])  # [U] items per row

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: np.ndarray) -> LayoutBatch:
        index = torch.from_numpy(np.asarray(idx)).to(self.all.kind.device)
        return self.all.rows(index, int(self.width[idx].max()))

    def refresh(self, model, rng: np.random.Generator) -> None:
        """Examples that change every epoch draw them here (``AnywhereExamples``,
        ``lifelong.LifelongExamples``)."""


class AnywhereExamples(Examples):
    """``History.ANYWHERE``: every epoch, each user's example is a ``max_len`` window ending
    anywhere from their ``max_len``-th event on (a shorter history: all of it), so training
    reads every part of a long history rather than only its last ``max_len`` events. Read as
    always: the last ``max_len`` events. For models without memory tokens (INCREMENTAL:
    ``lifelong``)."""

    def __init__(self, seqs: list[np.ndarray], ts: list[np.ndarray] | None, cfg, device) -> None:
        if cfg.has_memory:
            raise ValueError("history=anywhere is for models without memory tokens (INCREMENTAL: history=lifelong)")
        super().__init__(seqs, ts, cfg, device)
        keep = trainable(seqs)
        self.seqs, self.ts = [seqs[i] for i in keep], None if ts is None else [ts[i] for i in keep]

    def refresh(self, model, rng: np.random.Generator) -> None:
        n = self.cfg.max_len
        ends = [int(rng.integers(min(n, len(s) - 1), len(s))) for s in self.seqs]  # inputs end before s[e]
        cut = lambda xs, shift: [x[max(e - n, 0) + shift : e + shift] for x, e in zip(xs, ends)]  # noqa: E731
        self._lay_out(cut(self.seqs, 0), cut(self.seqs, 1),
                      None if self.ts is None else cut(self.ts, 0), None if self.ts is None else cut(self.ts, 1))


def draw_batches(lengths: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of example indices, by ``cfg.batching``."""
    if cfg.batching is Batching.SHUFFLE:
        order = rng.permutation(len(lengths))
        return [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    return length_batches(lengths, cfg.batch_size, rng)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar lengths (less padding), different every epoch, in random order."""
    noisy = lengths + rng.uniform(0, max(1.0, lengths.max() * 0.1), size=len(lengths))
    order = np.argsort(noisy)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def leave_process_group() -> None:
    """End a torchrun job on every rank together. A rank that exits while gloo still has work
    objects alive (DDP buckets held in reference cycles) or while its peer is mid-collective can
    abort in C++ ("terminate called without an active exception"): collect them while the group
    is up, wait for every rank, then destroy the group. No-op outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit_new_item_ids(model: nn.Module, known: np.ndarray | None = None) -> None:
    """An id+text model with ``new_item_ids`` 'text': fit its text-to-id map on the items it
    was trained on (``known``; default all) and give the others their predicted ids
    (``ItemTower.fit_new_ids``). Every evaluation reads the model so, as it will be served."""
    fit_ids = getattr(model.item_emb, "fit_new_ids", None)
    if fit_ids is not None:
        fit_ids(known)


def fit(
    model: nn.Module,
    train_seqs: list[np.ndarray],
    train_ts: list[np.ndarray] | None,
    valid_rows,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    id_map_json: str = "{}",
    out_dir: Path | None = None,
    resume: Path | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    test_rows=None,
    test_rules: dict[str, SeenRule] | None = None,
    negative_pool: np.ndarray | None = None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights (the last
    epoch's when ``valid_rows`` is None: fixed epochs, no early stopping).

    Under ``torchrun`` (process group initialised by the caller) each process trains on its
    share of the batches through DistributedDataParallel; rank 0 validates, decides early
    stopping for everyone, and writes ``out_dir/last.pt`` at each validation and
    ``out_dir/best.pt`` at each improvement and at the end; every process ends holding rank 0's
    best weights. ``resume`` (a ``last.pt``) continues a killed run with the selection it had made.

    With ``cfg.test_every`` and ``test_rows``, rank 0 also evaluates the test rows under each of
    ``test_rules`` (name -> seen rule) every that many epochs, into ``EpochReport.test``.

    ``negative_pool``: the item ids the loss may use as negatives (default: every item); the
    others get no gradient, as items that did not exist yet (``models.coldstart``).
    """
    rank, world = _world()
    mcfg = model.cfg
    model.to(device)
    examples = _examples(train_seqs, train_ts, mcfg, cfg, device, world)
    opt = make_optimizer(model.parameters(), cfg)
    start_epoch, best = (1, _Selection()) if resume is None else _resume(resume, model, opt, device)
    validator = tester = None
    if rank == 0:  # a lifelong model is read as served: every fold of the whole history
        lifelong = cfg.history is History.LIFELONG
        validator = None if valid_rows is None else Evaluator(
            valid_rows, mcfg, device=device, batch_size=cfg.eval_batch_size, lifelong=lifelong)
        if cfg.test_every and test_rows is not None:
            tester = Evaluator(test_rows, mcfg, test_rules, device=device, batch_size=cfg.eval_batch_size,
                               lifelong=lifelong)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    pool = None if negative_pool is None else torch.as_tensor(np.asarray(negative_pool, np.int64), device=device)
    history: list[EpochReport] = []
    t_start, epoch = time.monotonic(), start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.monotonic()
        rng = np.random.default_rng(cfg.seed + epoch)
        examples.refresh(model, rng)
        batches = draw_batches(examples.lengths, cfg, rng)
        batches = batches[: len(batches) // world * world][rank::world] if world > 1 else batches
        loss = _train_epoch(net, model, examples, batches, opt, cfg.negatives, gen, pool)
        report = EpochReport(epoch, loss, time.monotonic() - t0)
        out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > cfg.max_minutes * 60
        checkpoint_now = epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time
        testing = tester is not None and (epoch % cfg.test_every == 0 or epoch == cfg.epochs)
        if rank == 0 and (testing or checkpoint_now):  # evaluated and saved as it will be served
            fit_new_item_ids(model, negative_pool)
        if testing:
            report.test = tester.metrics(model)
        stop = False
        if valid_rows is None:  # fixed epochs: the last one is the result
            best.epoch = epoch
        elif checkpoint_now and rank == 0:
            report.valid = validator.metrics(model)["exclude"]
            if best.offer(epoch, report.valid, model) and out_dir is not None:  # kept through a crash
                state = dict(epoch=epoch, **best.train_state(), train_config=plain_dict(cfg))
                save_checkpoint(make_checkpoint(model, id_map_json, state, best.metrics), out_dir / "best.pt")
            stop = cfg.patience is not None and best.stale >= cfg.patience
        if checkpoint_now and out_dir is not None and rank == 0:
            state = dict(optimizer=opt.state_dict(), epoch=epoch, **best.train_state(), train_config=plain_dict(cfg))
            save_checkpoint(make_checkpoint(model, id_map_json, state, report.valid), out_dir / "last.pt")
        stop = _agree(stop or out_of_time, device)
        history.append(report)
        if on_epoch is not None and rank == 0:
            on_epoch(report)
        if stop:
            break
    if world > 1:
        # The DDP wrapper and its reducer sit in reference cycles; left to the interpreter's
        # teardown they are freed after the caller destroyed the process group, and a gloo
        # thread still joinable then aborts the process (std::terminate, 4 of 8 CLI runs here).
        del net
        gc.collect()
    if valid_rows is not None and best.state is not None:
        model.load_state_dict(best.state)
    fit_new_item_ids(model, negative_pool)
    _share_state(model)
    ckpt_path = None
    if out_dir is not None and rank == 0:
        state = dict(epoch=epoch, **best.train_state(), train_config=plain_dict(cfg))
        ckpt_path = save_checkpoint(make_checkpoint(model, id_map_json, state, best.metrics), out_dir / "best.pt")
    return FitResult(best.metrics, best.epoch, epoch, time.monotonic() - t_start, history, ckpt_path)


def _examples(train_seqs, train_ts, mcfg, cfg: TrainConfig, device, world: int):
    """The training windows: the last ``max_len`` items of each sequence, windows anywhere
    (ANYWHERE), or (LIFELONG) windows anywhere with the memory of everything before them."""
    times = train_ts if mcfg.time_bias else None
    if cfg.history is History.WINDOW:
        return Examples(train_seqs, times, mcfg, device)
    if cfg.history is History.ANYWHERE:
        return AnywhereExamples(train_seqs, times, mcfg, device)
    from .lifelong import LifelongExamples

    if cfg.fold_grad and world > 1:
        raise ValueError("fold_grad runs folds outside the DDP forward: train it in one process")
    return LifelongExamples(train_seqs, times, mcfg, device, fold_grad=cfg.fold_grad)


@dataclass
class _Selection:
    """The validation-selected epoch so far: its NDCG@10, metrics and weights, and the
    validations since (early stopping)."""

    score: float = -math.inf
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    state: dict | None = None  # its weights (None: nothing selected yet)
    stale: int = 0

    def offer(self, epoch: int, metrics: dict, model: nn.Module) -> bool:
        """Select ``model`` at ``epoch`` if its metrics beat the best so far; whether they did."""
        if not metrics["ndcg@10"] > self.score:
            self.stale += 1
            return False
        self.score, self.epoch, self.metrics, self.stale = metrics["ndcg@10"], epoch, metrics, 0
        self.state = copy.deepcopy(model.state_dict())
        return True

    def train_state(self) -> dict:
        return dict(best=self.score, best_epoch=self.epoch, stale=self.stale)


def _resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, device) -> tuple[int, _Selection]:
    """Load ``last.pt``'s weights and optimiser state, and the selection it had made: the
    selected weights come from the ``best.pt`` beside it (written at each improvement). The
    first epoch to run and the selection."""
    ck = load_checkpoint(path, map_location=device)
    model.load_state_dict(ck.state_dict)
    st = ck.train_state or {}
    if "optimizer" in st:
        opt.load_state_dict(st["optimizer"])
    epoch = int(st.get("epoch", 0))
    best = _Selection(float(st.get("best", -math.inf)), int(st.get("best_epoch", 0)), stale=int(st.get("stale", 0)))
    kept = path.with_name("best.pt")
    kept = load_checkpoint(kept, map_location=device) if kept.is_file() else None
    if best.epoch == epoch:  # the resumed weights are the selected ones
        best.metrics, best.state = dict(ck.metrics), copy.deepcopy(ck.state_dict)
    elif kept is not None and (kept.train_state or {}).get("best_epoch") == best.epoch:
        best.metrics, best.state = dict(kept.metrics), kept.state_dict
    elif best.epoch:
        log.warning("resuming at epoch %d without the weights of its best epoch %d (no matching best.pt "
                    "beside %s): the selection starts again", epoch + 1, best.epoch, path)
        best = _Selection()
    log.info("resumed from %s at epoch %d", path, epoch + 1)
    return epoch + 1, best


def _train_epoch(net: nn.Module, model: nn.Module, examples, batches: list[np.ndarray],
                 opt: torch.optim.Optimizer, negatives: Negatives, gen: torch.Generator,
                 pool: torch.Tensor | None) -> float:
    """One pass over ``batches`` (``net`` is ``model``, or its DDP wrapper); the mean loss."""
    model.train()
    total = 0.0  # a tensor after the first step: no host sync per step
    for idx in batches:
        batch = examples.batch(idx)
        loss = next_item_loss(net(batch), batch.targets, model, model.cfg.num_negatives, model.cfg.temperature,
                              negatives, gen, pool)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = total + loss.detach()
    return float(total) / max(len(batches), 1)


def _share_state(model: nn.Module) -> None:
    """Give every process rank 0's weights (only rank 0 validates, so only it knows the best)."""
    if _world()[1] == 1:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def _agree(flag: bool, device: torch.device | str) -> bool:
    """Rank 0's decision, shared with every process."""
    if _world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
