"""Joining the requests Triton batches together, and splitting the answers back. Pure numpy."""

from __future__ import annotations

import numpy as np

from persrec.models.inputs import ModelInputs

# Triton input name -> ModelInputs field; the ragged ones are padded to the widest request
FIELDS = {"ITEMS": "items", "TIMESTAMPS": "timestamps", "LENGTHS": "lengths", "MEMORY": "memory",
          "HAS_MEMORY": "has_memory", "REQUEST_TS": "request_ts", "CATALOGUE": "catalogue"}
PER_ROW = ("LENGTHS", "HAS_MEMORY", "REQUEST_TS")  # [b, 1] in Triton, [b] in ModelInputs


def concat_rows(requests: list[dict[str, np.ndarray]], pad: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], list[int]]:
    """Concatenate each input along the batch axis; inputs named in ``pad`` (``[b, W]``) are
    right-padded with 0 to the widest request first. Returns the arrays and each request's rows."""
    sizes = [len(next(iter(r.values()))) for r in requests]
    out = {}
    for name in requests[0]:
        parts = [r[name] for r in requests]
        if name in pad:
            width = max(p.shape[1] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts]
        out[name] = np.concatenate(parts, axis=0)
    return out, sizes


def split_rows(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1])


def model_inputs(requests: list[dict[str, np.ndarray]]) -> tuple[ModelInputs, list[int]]:
    """The requests' inputs (by Triton name) as one ``ModelInputs``, and each request's rows."""
    arrays, sizes = concat_rows(requests, pad=("ITEMS", "TIMESTAMPS"))
    return ModelInputs(**{FIELDS[k]: v.reshape(-1) if k in PER_ROW else v for k, v in arrays.items()}), sizes
