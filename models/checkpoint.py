"""Checkpoints: weights + model config + item id map + a model version id derived from them.

A checkpoint is one ``torch.save`` file of plain types (loadable with ``weights_only=True``):
``{"format", "config", "state_dict", "id_map", "model_version", "train_state", "metrics"}``.
The model version is a hash of config, id map and weights, so two different models never share
one, and memories stored for one version are never served with another.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig

FORMAT = "persrec-checkpoint/1"


def model_version(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], id_map_json: str) -> str:
    h = hashlib.sha256()
    h.update(cfg.fingerprint().encode())
    h.update(hashlib.sha256(id_map_json.encode()).digest())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    id_map_json: str  # persrec.models.data.IdMap.to_json()
    model_version: str
    train_state: dict[str, Any] | None = None  # optimizer, epoch, best metric: for resume
    metrics: dict[str, float] = field(default_factory=dict)

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        from .loss import build_model

        model = build_model(self.config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def make_checkpoint(
    model: nn.Module, id_map_json: str, train_state: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> Checkpoint:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(
        model.cfg, state, id_map_json, model_version(model.cfg, state, id_map_json),
        train_state, dict(metrics or {}),
    )


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "format": FORMAT,
            "config": ckpt.config.to_dict(),
            "state_dict": ckpt.state_dict,
            "id_map": ckpt.id_map_json,
            "model_version": ckpt.model_version,
            "train_state": ckpt.train_state,
            "metrics": json.dumps(ckpt.metrics),
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    raw = torch.load(path, map_location=map_location, weights_only=True)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={raw.get('format')!r})")
    return Checkpoint(
        ModelConfig.from_dict(raw["config"]), raw["state_dict"], raw["id_map"],
        raw["model_version"], raw.get("train_state"), json.loads(raw.get("metrics") or "{}"),
    )
