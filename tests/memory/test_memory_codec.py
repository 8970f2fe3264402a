"""Tensor and history byte codecs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from persrec.memory import decode_history, decode_tensor, encode_history, encode_tensor


def test_float16_round_trip_matches_numpy_cast() -> None:
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 1, 64)).astype(np.float32)
    data, dtype, shape = encode_tensor(x)
    assert (dtype, shape, len(data)) == ("float16", [2, 2, 8, 1, 64], x.size * 2)
    y = decode_tensor(data, dtype, shape)
    assert y.dtype == np.float32 and y.flags.writeable
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(y, x, rtol=2**-11, atol=2**-24)


def test_float32_round_trip_is_exact_and_out_dtype_is_selectable() -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    y = decode_tensor(*encode_tensor(x, "float32"))
    np.testing.assert_array_equal(y, x)
    assert decode_tensor(*encode_tensor(x, "float32"), out_dtype=np.float64).dtype == np.float64


def test_bytes_are_little_endian_whatever_the_input_order() -> None:
    x = np.arange(4, dtype=">f4")
    data, _, _ = encode_tensor(x, "float32")
    assert data == np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("data", "dtype", "shape", "match"),
    [
        (b"\0" * 6, "float16", [2, 2], "needs 8 bytes, got 6"),
        (b"\0" * 8, "bfloat16", [2, 2], "unknown storage dtype"),
        (b"\0" * 8, "float16", [2, -2], "non-negative"),
        (b"\0" * 8, "float16", [2.0, 2], "non-negative ints"),
    ],
)
def test_decode_rejects_inconsistent_rows(data, dtype, shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        decode_tensor(data, dtype, shape)


def test_encode_rejects_values_float16_cannot_hold() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensor(np.array([1.0, 70000.0], dtype=np.float32))
    encode_tensor(np.array([1.0, 70000.0], dtype=np.float32), "float32")
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensor(np.array([np.nan], dtype=np.float32), "float32")
    with pytest.raises(ValueError, match="real numeric"):
        encode_tensor(np.array(["a"]))


def test_history_codec() -> None:
    ids = np.array([3, 2**40, 0], dtype=np.int64)
    data, n = encode_history(ids)
    assert n == 3 and len(data) == 24
    np.testing.assert_array_equal(decode_history(data, n), ids)
    assert encode_history(None) == (None, 0) and decode_history(None, 0) is None
    with pytest.raises(ValueError, match="1-D integer"):
        encode_history(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="needs 16 bytes"):
        decode_history(data, 2)


def test_package_imports_no_torch_nor_sibling_packages() -> None:
    code = (
        "import sys, persrec.memory; "
        "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[:2] in "
        "(['persrec','models'], ['persrec','stream'], ['persrec','serving'])]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
