"""Byte codecs for memory tensors and aged-out item histories (ids and their times).

A memory tensor has shape (L, 2, M, H, D/H): per layer, keys and values of the M memory tokens.
It is stored as raw little-endian bytes of a storage dtype (float16 by default, halving the
bytes of float32) together with the dtype name and the shape, so a row can be decoded without
knowing the model that wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Storage dtypes a memory tensor may be written in. Little-endian on disk whatever the host.
TENSOR_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
_HISTORY_DTYPE = np.dtype("<i8")


def encode_tensor(arr: np.ndarray, dtype: str = "float16") -> tuple[bytes, str, list[int]]:
    """Encode a real-valued array as (bytes, dtype name, shape).

    Raises ValueError for an unknown storage dtype, a non-numeric array, or values that are not
    finite once cast (NaN, inf, or a float32 beyond float16's range of +-65504): a memory that
    would decode to inf/NaN is a bug upstream and must not be stored.
    """
    storage = check_storage_dtype(dtype)
    src = np.asarray(arr)
    if src.dtype.kind not in "fiu":
        raise ValueError(f"memory tensor must be real numeric, got dtype {src.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # reported below as a ValueError
        cast = np.ascontiguousarray(src, dtype=storage)
    if not np.isfinite(cast).all():
        raise ValueError(
            f"memory tensor has non-finite values once stored as {dtype} "
            f"(input max |x| = {float(np.nanmax(np.abs(src), initial=0.0)):g})"
        )
    return cast.tobytes(), dtype, [int(n) for n in cast.shape]


def decode_tensor(
    data: bytes, dtype: str, shape: Sequence[int], out_dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Decode bytes written by `encode_tensor` into a new, writable `out_dtype` array."""
    storage = check_storage_dtype(dtype)
    dims = _validate_shape(shape)
    expected = math.prod(dims) * storage.itemsize
    if len(data) != expected:
        raise ValueError(
            f"memory tensor of shape {dims} as {dtype} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=storage).reshape(dims).astype(out_dtype)


def encode_history(items: np.ndarray | None) -> tuple[bytes | None, int]:
    """Encode a 1-D integer array (item ids or their unix-second times) as (int64 little-endian
    bytes, length); None stays None."""
    if items is None:
        return None, 0
    src = np.asarray(items)
    if src.ndim != 1 or src.dtype.kind not in "iu":
        raise ValueError(f"history must be a 1-D integer array, got {src.dtype} {src.shape}")
    return np.ascontiguousarray(src, dtype=_HISTORY_DTYPE).tobytes(), int(src.shape[0])


def decode_history(data: bytes | None, length: int) -> np.ndarray | None:
    """Decode bytes written by `encode_history` into a new int64 array (None stays None)."""
    if data is None:
        return None
    if len(data) != length * _HISTORY_DTYPE.itemsize:
        raise ValueError(f"history of {length} items needs {length * 8} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=_HISTORY_DTYPE).astype(np.int64)


def check_storage_dtype(name: str) -> np.dtype:
    """The numpy dtype for a storage dtype name; ValueError if unknown."""
    try:
        return TENSOR_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown storage dtype {name!r}; expected one of {sorted(TENSOR_DTYPES)}"
        ) from None


def _validate_shape(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(shape)
    if not all(isinstance(n, (int, np.integer)) and n >= 0 for n in dims):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    return tuple(int(n) for n in dims)
