"""``persrec export``: a checkpoint -> a Triton model repository with ``recommend`` and ``fold``
python-backend models (versioned directories, dynamic batching, GPU when present), and, for a
model that reads items by their text with a named encoder, ``encode_items`` (the item catalogue:
``serving.catalogue``).

The repository's code comes from ``triton_models/`` in this project; each version directory
gets a copy of the checkpoint. ``manifest.json`` at the top tells the worker what it serves.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from persrec.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from persrec.stream.manifest import Manifest

import persrec.triton_models

TEMPLATES = Path(persrec.triton_models.__file__).resolve().parent


def _dims(shape) -> str:
    return "[ " + ", ".join(str(s) for s in shape) + " ]"


def _io(name: str, dtype: str, shape) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(shape)} }}'


CATALOGUE_INPUT = _io("CATALOGUE", "TYPE_INT64", [2])
WINDOW_CACHE_MB = 256  # per recommend instance, by default (serving.window_cache)


def model_config(name: str, ck: Checkpoint, kind: str, max_batch_size: int, params: dict[str, str],
                 inputs: list[str], outputs: list[str], instances: int) -> str:
    param_txt = "\n".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    sep = ",\n"
    return f"""name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
{sep.join(inputs)}
]
output [
{sep.join(outputs)}
]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
{param_txt}
"""


def versioned_config(model_dir: Path, config: str, keep: int) -> str:
    """``config`` with its version policy: the newest ``keep`` versions stay loaded when the
    config already there is this one (same inputs, outputs and parameters) or there is none,
    else the new version alone (the next export of a model that fits changes the policy back,
    which reloads every version once). Triton applies one config.pbtxt to every loaded version, and a changed config makes it
    reload them all: an unchanged one lets it load the new version and leave the old one
    serving. No version-specific value goes in the config (``runner_from_triton_args`` checks a
    version's checkpoint against its ``manifest.json``)."""
    old = model_dir / "config.pbtxt"
    fits = not old.is_file() or re.sub(r"(?m)^version_policy: .*\n", "", old.read_text()) == config
    return f"{config}version_policy: {{ latest: {{ num_versions: {keep if fits else 1} }} }}\n"


def block_bytecode_cache(version_dir: Path) -> None:
    """Keep the python backend from writing into ``version_dir`` once Triton has read it.

    The backend's stub imports ``model.py`` and Python caches its bytecode in
    ``__pycache__/`` beside it (the stub ignores ``PYTHONDONTWRITEBYTECODE``). Triton takes the
    newest modification time under a version directory for that version's timestamp, so the
    next ``load_model`` (the one that adds version N+1) found version N modified and reloaded
    it under traffic: its serving instance was replaced and its window cache lost (the
    tritonserver aborts seen during switches have another cause: RELIABILITY.md). An empty
    *file* named ``__pycache__``
    makes Python skip the cache (it cannot create the directory, and carries on from source,
    whatever its version or user), so a loaded version's directory stays as exported."""
    cache = version_dir / "__pycache__"
    if cache.is_dir():  # a version exported again over one Triton already imported
        shutil.rmtree(cache)
    cache.touch()


def export_repository(
    checkpoint: Path | Checkpoint, out: Path, *, top_k: int = 10, version: int = 1, kind: str = "auto",
    max_batch_size: int = 1024, instances: int = 1, exclude_seen: bool = True, cpu_threads: int = 1,
    keep_versions: int = 2, window_cache_mb: float = WINDOW_CACHE_MB, window_cache_metrics: bool = False,
) -> Manifest:
    """Write (or add a version to) the repository at ``out``; return its manifest.

    Triton keeps the newest ``keep_versions`` versions of each model loaded when one config
    serves them all (``versioned_config``): a worker pinned to the previous version goes on
    being answered while the new one loads, and can be started on it again (rollback:
    ``PERSREC_TRITON_VERSION``). ``manifest.json`` names the newest version;
    ``<model>/N/manifest.json`` each one. Versions must be exported in increasing order.

    ``window_cache_mb``: what each ``recommend`` instance of a model with memory tokens may keep
    of its users' recent-window keys/values between events (``serving.window_cache``); 0: none.
    ``window_cache_metrics``: report the cache on Triton's metrics endpoint
    (``persrec_window_cache_*``). Off by default: the python backend's custom metrics crash
    tritonserver when a model is reloaded in place under traffic (the old instance's finalize
    dies with ``boost::interprocess::lock_exception``; seen in CI on 2026-12-07 in
    ``test_switch``; triton-inference-server/server#8663 reports the shared-metric bug). Turn
    them on where models are not reloaded in place."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    cfg = ck.config
    if kind == "auto":
        kind = "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"
    # the window folds whole segments, so it holds at most recent_len + segment_len - 1 items
    window = cfg.recent_len + cfg.segment_len - 1 if cfg.has_memory else cfg.max_len
    manifest = Manifest(
        model_version=ck.model_version, triton_version=version, window_len=window,
        recent_len=cfg.recent_len, top_k=top_k,
        memory_shape=tuple(cfg.memory_shape), has_memory=cfg.has_memory, policy=cfg.policy,
        history_len=max(cfg.max_len - cfg.recent_len, 0), request_time=cfg.request_time,
        segment_len=cfg.segment_len, fold_model="fold", catalogue=bool(cfg.item_repr.has_text and cfg.text_encoder),
    )
    params = {"cpu_threads": str(cpu_threads), "catalogue": str(manifest.catalogue).lower()}
    extra = [CATALOGUE_INPUT] if manifest.catalogue else []
    mem = list(cfg.memory_shape)
    rec_inputs = [_io("ITEMS", "TYPE_INT64", [-1]), _io("TIMESTAMPS", "TYPE_INT64", [-1]),
                  _io("LENGTHS", "TYPE_INT64", [1])]
    if cfg.has_memory:
        rec_inputs += [_io("MEMORY", "TYPE_FP32", mem), _io("HAS_MEMORY", "TYPE_BOOL", [1])]
    if cfg.request_time:
        rec_inputs.append(_io("REQUEST_TS", "TYPE_INT64", [1]))
    rec_inputs += extra
    models = {
        "recommend": model_config(
            "recommend", ck, kind, max_batch_size,
            params | {"top_k": str(top_k), "exclude_seen": str(exclude_seen).lower(),
                      "window_cache_mb": str(window_cache_mb if cfg.has_memory else 0),
                      "window_cache_metrics": str(window_cache_metrics).lower()},
            rec_inputs,
            [_io("TOP_IDS", "TYPE_INT64", [top_k]), _io("TOP_SCORES", "TYPE_FP32", [top_k])],
            instances,
        ),
    }
    if cfg.has_memory:
        models["fold"] = model_config(
            "fold", ck, kind, max_batch_size, params,
            [_io("MEMORY", "TYPE_FP32", mem), _io("HAS_MEMORY", "TYPE_BOOL", [1]),
             _io("ITEMS", "TYPE_INT64", [-1]), _io("TIMESTAMPS", "TYPE_INT64", [-1]),
             _io("LENGTHS", "TYPE_INT64", [1])] + extra,
            [_io("NEW_MEMORY", "TYPE_FP32", mem)],
            instances,
        )
    if manifest.catalogue:
        models["encode_items"] = model_config(
            "encode_items", ck, kind, 256, {"text_encoder": cfg.text_encoder},
            [_io("TEXT", "TYPE_STRING", [1])], [_io("EMBEDDING", "TYPE_FP32", [cfg.text_dim])], instances)
    out = Path(out)
    for name, config in models.items():
        vdir = out / name / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATES / name / "model.py", vdir / "model.py")
        block_bytecode_cache(vdir)
        if name != "encode_items":  # the encoder is named in its config; it needs no weights of ours
            save_checkpoint(ck, vdir / "checkpoint.pt")
        (out / name / "config.pbtxt").write_text(versioned_config(out / name, config, keep_versions))
    manifest.write(out)
    return manifest
