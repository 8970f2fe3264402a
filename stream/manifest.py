"""What a model repository serves (``manifest.json`` at its top): written by ``persrec export``,
read by the worker and the status API."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from persrec.models.config import MemoryPolicy

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    model_version: str  # hash of config, id map and weights (persrec.models.checkpoint)
    triton_version: int  # version directory number in the repository
    window_len: int  # W: the most recent items a request sends (recent_len + segment_len - 1)
    recent_len: int  # items that stay in the window after a fold
    top_k: int
    memory_shape: tuple[int, ...]
    has_memory: bool
    policy: MemoryPolicy
    history_len: int  # RECOMPRESS: aged-out items kept and compressed (max_len - recent_len)
    # the model asks its last query at the request's time: ``recommend`` takes REQUEST_TS
    request_time: bool = False
    # the fold cadence (the model's segment_len): a window folds whole segments of this length;
    # 0 (a repository written before the field): window_len - recent_len, its fold interval then
    segment_len: int = 0
    # the Triton model that folds a segment into a memory; repositories written before it was
    # named ``fold`` call it ``compress``
    fold_model: str = "compress"
    # the model reads items by their text with a named encoder: items published on the items
    # topic are encoded by ``encode_items`` and served (serving.catalogue)
    catalogue: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", MemoryPolicy(self.policy))
        object.__setattr__(self, "memory_shape", tuple(self.memory_shape))
        if self.segment_len < 1:
            object.__setattr__(self, "segment_len", max(self.window_len - self.recent_len, 1))

    @property
    def triton_models(self) -> list[str]:
        """The repository's models: ``recommend``, the fold model when there is a memory, and
        ``encode_items`` when the model takes catalogue items."""
        return (["recommend"] + ([self.fold_model] if self.has_memory else [])
                + (["encode_items"] if self.catalogue else []))

    @classmethod
    def read(cls, repository: Path, version: int = 0) -> "Manifest":
        """The manifest of ``repository`` (its newest version), or of its Triton ``version``;
        fields added since a repository was written take their defaults."""
        path = Path(repository) / (f"recommend/{version}/{MANIFEST}" if version else MANIFEST)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: no version {version} exported to {repository}")
        return cls(**json.loads(path.read_text()))

    def write(self, repository: Path) -> None:
        """As the repository's newest version, and in each of its models' version directories
        (``recommend/N/manifest.json``...). Not in a directory of its own: Triton takes every
        directory at the top of a repository for a model, and fails to start on one without a
        config."""
        text = json.dumps(asdict(self) | {"policy": self.policy.value}, indent=2)
        for model in self.triton_models:
            vdir = Path(repository) / model / str(self.triton_version)
            vdir.mkdir(parents=True, exist_ok=True)
            (vdir / MANIFEST).write_text(text)
        (Path(repository) / MANIFEST).write_text(text)
