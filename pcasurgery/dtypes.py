"""bfloat16 as NumPy holds it: uint16 arrays of bf16 bits (the top half of
a float32), rounded to nearest even as PyTorch rounds."""
from __future__ import annotations

import numpy as np

DTYPES = ("float32", "bfloat16")


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 values -> uint16 bf16 bits, round to nearest even (NaN stays
    NaN)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    b[np.isnan(a)] = 0x7FC0
    return b


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32, exactly."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def check_dtype(dtype: object, what: str = "dtype") -> str:
    if dtype not in DTYPES:
        raise ValueError(f"{what} must be 'bfloat16' or 'float32', got {dtype!r}")
    return str(dtype)
