"""Type stubs for pcasurgery._C, the C core (see csrc/module.c).

Checked against the compiled module by ``python -m mypy.stubtest
pcasurgery._C`` in CI: the C functions carry text signatures, so a stub
that drifts from them fails.
"""
from collections.abc import Sequence
from typing import final

import numpy as np
import numpy.typing as npt

def pca_fit(
    matrices: Sequence[npt.ArrayLike],
    names: Sequence[str],
    center: bool,
    precision: int,
    solver: int,
    keep_k: int,
    keep_var: float,
    /,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.float32], float]: ...
def pca_project(
    X: npt.ArrayLike, mean: npt.ArrayLike, components: npt.ArrayLike, k: int, name: str = "X", /
) -> npt.NDArray[np.float32]: ...
def pca_reconstruct(
    Z: npt.ArrayLike,
    components: npt.ArrayLike,
    mean: npt.ArrayLike | None,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...
def max_threads() -> int: ...
def blas_config() -> str: ...
def bf16_kernel() -> str: ...
def attn_kernel(name: str | None = None, /) -> str: ...
def bf16_prefill(name: str | None = None, /) -> str: ...
def matmul_bf16(
    out: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    W: npt.NDArray[np.uint16],
    beta: float,
    n_threads: int,
    scratch: int = 0,
    /,
) -> None: ...
def elementwise(
    name: str,
    a: npt.NDArray[np.float32],
    b: npt.NDArray[np.float32] | None,
    m: float,
    simd: bool,
    /,
) -> None: ...
def bf16_nonfinite(bits: npt.NDArray[np.uint16], /) -> int: ...
def blas_library() -> str | None: ...
def to_float32(
    buffer: object,
    offset: int,
    nbytes: int,
    dtype: str,
    shape: Sequence[int],
    name: str = "tensor",
    /,
) -> npt.NDArray[np.float32]: ...

def weighted_gram(W: npt.ArrayLike, sigma: npt.ArrayLike, name: str = "W", /) -> npt.NDArray[np.float64]: ...
def symmetrize_upper(S: npt.NDArray[np.float64], scale: float, /) -> None: ...
def sym_eig(A: npt.ArrayLike, /) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def fake_quant(
    x: npt.ArrayLike, bits: int, group: int, per_column: bool = False, /
) -> npt.NDArray[np.float32]: ...

@final
class LlamaRuntime:
    @property
    def n_cached(self) -> int: ...
    @property
    def arrays(self) -> list[npt.NDArray[np.float32] | None]: ...
    def __init__(
        self,
        config: tuple[int, int, int, int, int, int, int, int, float, float,
                      npt.NDArray[np.float32] | None, int],
        arrays: list[npt.NDArray[np.float32] | None],
        names: list[str],
        max_batch: int = 512,
    ) -> None: ...
    def forward(
        self, tokens: npt.ArrayLike, pos: int, all_logits: bool = True
    ) -> npt.NDArray[np.float32]: ...
    def set_weight(self, index: int, array: npt.NDArray[np.float32], /) -> None: ...
    def set_latent(
        self,
        layer: int,
        k_down: npt.ArrayLike | None,
        k_up: npt.ArrayLike | None,
        v_down: npt.ArrayLike | None = None,
        v_up: npt.ArrayLike | None = None,
        /,
    ) -> None: ...
    def set_factored_q(
        self, layer: int, q_down: npt.ArrayLike | None, q_up: npt.ArrayLike | None, /
    ) -> None: ...
    def cache_widths(self) -> list[int]: ...
    def fill_cache(self, n: int, /) -> None: ...
    def factors(
        self, layer: int, /
    ) -> tuple[npt.NDArray[np.float32] | None, ...]: ...
    def set_quant(
        self,
        k_bits: int = 0,
        v_bits: int = 0,
        group: int = 32,
        k_per_channel: bool = False,
        latent_bits: int = 0,
        latent_group: int = 32,
    ) -> None: ...
    def calibrate(
        self, tokens: npt.ArrayLike, sigma: npt.NDArray[np.float64], sums: npt.NDArray[np.float64], /
    ) -> None: ...
    def reset(self) -> None: ...
