"""Type stubs for pcasurgery._C, the C core (see csrc/module.c)."""
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def pca_fit(
    matrices: Sequence[npt.ArrayLike], names: Sequence[str], center: bool, precision: int, /
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.float32], float]: ...
def pca_project(
    X: npt.ArrayLike, mean: npt.ArrayLike, components: npt.ArrayLike, k: int, /
) -> npt.NDArray[np.float32]: ...
def pca_reconstruct(
    Z: npt.ArrayLike,
    components: npt.ArrayLike,
    mean: npt.ArrayLike | None,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...
def blas_config() -> str: ...
