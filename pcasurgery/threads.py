"""pcasurgery's own OpenBLAS thread pool.

The C core links against the scipy-openblas32 OpenBLAS (or a system one),
which is a *different* library from the OpenBLAS inside NumPy's wheel and the
one inside SciPy's. Each has its own thread pool:

- :func:`set_num_threads` sets ours only. ``OPENBLAS_NUM_THREADS`` set before
  the first import sets all of them.
- ``threadpoolctl.threadpool_info()`` lists every pool, ours included
  (its ``filepath`` is :func:`blas_library`), and
  ``threadpool_limits(n, user_api="blas")`` limits all of them at once.

OpenBLAS threads busy-wait for a while after each call. Two pools that each
use both cores, called in alternation, slow each other down; when mixing our
kernels with NumPy/SciPy/scikit-learn linear algebra in a timing loop, limit
the pool that is not being measured to one thread (as benchmarks/ does).
"""
from __future__ import annotations

from . import _C


def set_num_threads(n: int) -> None:
    """Set the number of threads of pcasurgery's OpenBLAS, 1 <= n <=
    :func:`max_threads` (a ValueError beyond: OpenBLAS would silently run
    fewer)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int thread count, got {type(n).__name__}")
    _C.set_num_threads(n)


def max_threads() -> int:
    """The most threads pcasurgery's OpenBLAS runs (its build's MAX_THREADS)."""
    return int(_C.max_threads())


def get_num_threads() -> int:
    """Number of threads pcasurgery's OpenBLAS uses."""
    return int(_C.get_num_threads())


def blas_info() -> str:
    """OpenBLAS build string of the C core, e.g. 'OpenBLAS 0.3.31 ... Haswell MAX_THREADS=64'."""
    return _C.blas_config().strip()


def blas_library() -> str | None:
    """Path of the shared library that provides the C core's BLAS and LAPACKE."""
    return _C.blas_library()
