"""Training: length-bucketed batches, sampled softmax, periodic validation, early stopping,
checkpoints and resume; DistributedDataParallel when launched under ``torchrun``."""

from __future__ import annotations

import copy
import gc
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
from .evaluate import evaluate
from .layout import collate
from .loss import sampled_softmax_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # upper bound on passes over the users
    batch_size: int = 128  # sequences per step (per process under DDP)
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 1  # epochs between validations and last.pt checkpoints
    patience: int = 10  # validations without a better NDCG@10 before stopping
    max_minutes: float | None = None  # wall-clock budget; stops after the epoch that passes it
    seed: int = 42
    eval_batch_size: int = 256


@dataclass
class EpochReport:
    epoch: int
    loss: float
    seconds: float
    valid: dict[str, float] | None = None


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[EpochReport] = field(default_factory=list)
    checkpoint: Path | None = None


def training_examples(
    seqs: list[np.ndarray], ts: list[np.ndarray] | None, max_len: int,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """Each user's last ``max_len`` next-item pairs: inputs ``s[:-1]``, targets ``s[1:]``."""
    keep = [i for i, s in enumerate(seqs) if len(s) >= 2]
    inputs = [seqs[i][:-1][-max_len:] for i in keep]
    targets = [seqs[i][1:][-max_len:] for i in keep]
    times = None if ts is None else [ts[i][:-1][-max_len:] for i in keep]
    return inputs, targets, times


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
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights (the last
    epoch's when ``valid_rows`` is None: fixed epochs, no early stopping).

    Under ``torchrun`` (process group initialised by the caller) each process trains on its
    share of the batches through DistributedDataParallel; rank 0 validates, decides early
    stopping for everyone, and writes ``out_dir/best.pt`` and ``out_dir/last.pt``; every
    process ends holding rank 0's best weights.
    """
    rank, world = _world()
    mcfg = model.cfg
    model.to(device)
    inputs, targets, times = training_examples(train_seqs, train_ts if mcfg.time_bias else None, mcfg.max_len)
    lengths = np.array([len(x) for x in inputs])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best, best_epoch = 1, -math.inf, 0
    best_state = copy.deepcopy(model.state_dict())
    if resume is not None:
        ck = load_checkpoint(resume, map_location=device)
        model.load_state_dict(ck.state_dict)
        st = ck.train_state or {}
        if "optimizer" in st:
            opt.load_state_dict(st["optimizer"])
        start_epoch = int(st.get("epoch", 0)) + 1
        best, best_epoch = float(st.get("best", -math.inf)), int(st.get("best_epoch", 0))
        best_state = copy.deepcopy(model.state_dict())
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    history: list[EpochReport] = []
    t_start, best_metrics, stale, epoch = time.monotonic(), {}, 0, start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.monotonic()
        rng = np.random.default_rng(cfg.seed + epoch)
        batches = length_batches(lengths, cfg.batch_size, rng)
        batches = batches[: len(batches) // world * world][rank::world] if world > 1 else batches
        model.train()
        total, steps = 0.0, 0
        for idx in batches:
            batch = collate(
                [inputs[i] for i in idx], mcfg, [targets[i] for i in idx],
                None if times is None else [times[i] for i in idx],
            ).to(device)
            hidden = net(batch)
            loss = sampled_softmax_loss(
                hidden, batch.targets, model.item_vectors, mcfg.num_items,
                mcfg.num_negatives, mcfg.temperature, gen,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        report = EpochReport(epoch, total / max(steps, 1), time.monotonic() - t0)
        out_of_time = cfg.max_minutes is not None and time.monotonic() - t_start > cfg.max_minutes * 60
        stop = False
        checkpoint_now = epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time
        if valid_rows is None:  # fixed epochs: the last one is the result
            best_epoch = epoch
        elif checkpoint_now and rank == 0:
            report.valid = evaluate(model, valid_rows, device=device, batch_size=cfg.eval_batch_size)
            score = report.valid["ndcg@10"]
            if score > best:
                best, best_epoch, best_metrics, stale = score, epoch, report.valid, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            stop = stale >= cfg.patience
        if checkpoint_now and out_dir is not None and rank == 0:
            state = dict(optimizer=opt.state_dict(), epoch=epoch, best=best, best_epoch=best_epoch,
                         train_config=asdict(cfg))
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
    if valid_rows is not None:
        model.load_state_dict(best_state)
    _share_state(model)
    ckpt_path = None
    if out_dir is not None and rank == 0:
        state = dict(epoch=epoch, best=best, best_epoch=best_epoch, train_config=asdict(cfg))
        ckpt_path = save_checkpoint(make_checkpoint(model, id_map_json, state, best_metrics), out_dir / "best.pt")
    return FitResult(best_metrics, best_epoch, epoch, time.monotonic() - t_start, history, ckpt_path)


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
