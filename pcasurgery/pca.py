"""StackedPCA: a scikit-learn-shaped PCA of several matrices stacked by rows.

In PCA surgery the *rows* of a weight matrix W (out_features, in_features)
are the samples and its columns the features: a PCA finds a basis of the
input space in which the output neurons' weight vectors live. Stacking the
rows of k_proj and v_proj (each (256, 2048) in TinyLlama) gives (512, 2048)
samples whose PCA is one basis shared by K and V.

The fit, the projection and the reconstruction run in the C core
(``pcasurgery._C``, OpenBLAS + LAPACKE), with the GIL released.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _C

_PRECISIONS = {"double": 0, "single": 1}
_SOLVERS = {"auto": 0, "gram": 1, "covariance": 2}


def _as_named_list(matrices: Any) -> tuple[list[Any], list[str], bool]:
    """Normalise the `matrices` argument to (list of arrays, names, was_single).

    Accepts one 2-D array, a sequence of 2-D arrays, or a mapping name -> array
    (the names then appear in error messages, e.g. "v_proj has 1024 columns").
    """
    if isinstance(matrices, Mapping):
        names = [str(k) for k in matrices.keys()]
        return list(matrices.values()), names, False
    if isinstance(matrices, np.ndarray) or not isinstance(matrices, (list, tuple)):
        return [matrices], ["matrices"], True
    return list(matrices), [f"matrices[{i}]" for i in range(len(matrices))], False


def _check_threshold(threshold: Any, name: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(threshold).__name__}")
    t = float(threshold)
    if not (0.0 < t <= 1.0):
        raise ValueError(
            f"{name} must be in (0, 1] (the fraction of variance kept), got {threshold!r}"
        )
    return t


class StackedPCA:
    """PCA of one or more matrices stacked by rows, shaped like scikit-learn's PCA.

    Parameters
    ----------
    n_components : None, int or float
        How many components to compute and keep. ``None``: all
        ``min(n_samples, n_features)``. An int k in
        ``[1, min(n_samples, n_features)]``: the first k. A float t in (0, 1]:
        the fewest components whose cumulative explained-variance ratio
        exceeds t, i.e. the fraction of variance **kept** (``--var 0.3``
        keeps 30%); 1.0 means all. The whole spectrum is computed whatever
        this is, so :meth:`n_components_for` answers any threshold without a
        refit, and :meth:`transform`, :meth:`reconstruct` and
        :meth:`iter_reconstructions` accept any rank up to n_components_.
        Fewer components make the fit faster (only they are back-transformed).
    center : bool
        True (default): subtract the column mean first and add it back on
        reconstruction, as scikit-learn's PCA does. False: plain SVD of the
        stack (as MHA2MLA/TransMLA use); "variance" then means energy, the
        squared Frobenius norm, and ``mean_`` is zero.
    precision : "double" or "single"
        Precision of the eigensolver. The Gram/covariance matrix is always
        accumulated in double. "double" (default) keeps every eigenvalue
        above ~1e-10 of the largest to ~1e-10 relative accuracy; "single"
        is about twice as fast but loses eigenvalues below ~1e-6 of the
        largest (their directions and sizes become rounding noise).
    solver : "auto", "gram" or "covariance"
        Which symmetric eigenproblem is solved: "gram" the (n, n) matrix
        X Xᵀ, "covariance" the (d, d) matrix Xᵀ X. Both give the same
        answer; "auto" (default) picks the smaller one (Gram when rows <
        columns, e.g. k_proj+v_proj stacked: 512 x 2048).

    Fitted attributes (end in ``_``, as in scikit-learn)
    ----------------------------------------------------
    components_ : (n_components_, n_features) float32
        Principal axes, by decreasing variance; the largest-magnitude entry of
        each is positive (scikit-learn's ``svd_flip`` convention).
    explained_variance_ : (n_components_,) float64
        Variance along each axis, with scikit-learn's ``n_samples - 1``
        denominator.
    explained_variance_ratio_ : (n_components_,) float64
    singular_values_ : (n_components_,) float64
    mean_ : (n_features,) float32
    n_components_, n_samples_, n_features_in_ : int
    all_explained_variance_, all_explained_variance_ratio_ : (min(n_samples, n_features),) float64
        The whole spectrum, whatever n_components is.
    total_variance_ : float
        Total variance of the stack (the sum of all_explained_variance_).
    """

    def __init__(
        self,
        n_components: int | float | None = None,
        *,
        center: bool = True,
        precision: str = "double",
        solver: str = "auto",
    ) -> None:
        self.n_components = n_components
        self.center = center
        self.precision = precision
        self.solver = solver

    # ------------------------------------------------------------------ fit
    def fit(self, matrices: Any) -> StackedPCA:
        """Fit on `matrices`: one 2-D array, a sequence of them, or a mapping
        name -> 2-D array, all with the same number of columns (features).
        Their rows are stacked as samples. Returns self."""
        self._check_params()
        mats, names, _ = _as_named_list(matrices)
        n = self.n_components
        keep_k, keep_var = (0, 0.0) if n is None else (
            (int(n), 0.0) if isinstance(n, Integral) else (0, float(n)))
        if keep_k:  # check the rank against the data before the work
            r = self._stack_min_dim(mats)
            if r is not None and keep_k > r:
                raise ValueError(
                    f"n_components={keep_k} must be between 1 and "
                    f"min(n_samples, n_features)={r}"
                )
        comps, eig, mean, total = _C.pca_fit(
            mats, names, bool(self.center), _PRECISIONS[self.precision],
            _SOLVERS[self.solver], keep_k, keep_var,
        )
        n_samples = sum(int(np.shape(m)[0]) for m in mats)
        self.n_samples_ = n_samples
        self.n_features_in_ = int(comps.shape[1])
        self.mean_ = mean
        self.components_ = comps
        self.n_components_ = int(comps.shape[0])
        denom = max(n_samples - 1, 1)
        self.all_explained_variance_ = eig / denom
        self.all_explained_variance_ratio_ = eig / total
        self.total_variance_ = total / denom
        return self

    def fit_transform(self, matrices: Any) -> npt.NDArray[np.float32]:
        """Fit, then return the scores of the stacked rows, (n_samples, n_components_)."""
        self.fit(matrices)
        mats, _, _ = _as_named_list(matrices)
        return np.concatenate([self.transform(m) for m in mats], axis=0)

    # --------------------------------------------------- derived attributes
    @property
    def explained_variance_(self) -> npt.NDArray[np.float64]:
        return self.all_explained_variance_[: self.n_components_]

    @property
    def explained_variance_ratio_(self) -> npt.NDArray[np.float64]:
        return self.all_explained_variance_ratio_[: self.n_components_]

    @property
    def singular_values_(self) -> npt.NDArray[np.float64]:
        return np.sqrt(self.explained_variance_ * max(self.n_samples_ - 1, 1))

    @property
    def max_components_(self) -> int:
        """min(n_samples, n_features): the size of the spectrum."""
        return int(self.all_explained_variance_ratio_.shape[0])

    def n_components_for(self, threshold: float) -> int:
        """Components needed to keep `threshold` of the variance, without a refit.

        scikit-learn's rule: ``searchsorted(cumsum(ratio), t, side="right") + 1``,
        the fewest components whose cumulative ratio strictly exceeds t;
        ``1.0`` means all of them.
        """
        self._check_fitted()
        t = _check_threshold(threshold, "threshold")
        if t == 1.0:
            return self.max_components_
        cum = np.cumsum(self.all_explained_variance_ratio_)
        k = int(np.searchsorted(cum, t, side="right")) + 1
        return min(k, self.max_components_)

    # ------------------------------------------------ project / reconstruct
    def transform(self, X: npt.ArrayLike, k: int | None = None) -> npt.NDArray[np.float32]:
        """Scores Z (n, k) = (X - mean_) @ components[:k].T; k defaults to n_components_."""
        self._check_fitted()
        k = self._check_k(k)
        return _C.pca_project(X, self.mean_, self.components_, k, "X")

    def inverse_transform(self, Z: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """X̂ (n, d) = Z (n, k) @ components[:k] + mean_, for any k = Z.shape[1] <= n_components_."""
        self._check_fitted()
        Z = self._check_finite_matrix(Z, "Z")  # small: checked here, not in C
        if Z.shape[1] > self.n_components_:
            raise ValueError(
                f"Z has {Z.shape[1]} columns but only {self.n_components_} components were kept"
            )
        return _C.pca_reconstruct(Z, self.components_, self.mean_)

    def reconstruct(
        self, matrices: Any, k: int | None = None
    ) -> npt.NDArray[np.float32] | list[npt.NDArray[np.float32]] | dict[str, npt.NDArray[np.float32]]:
        """Rebuild each matrix from its first k principal components (default n_components_).

        X̂ = (X - mean_) Cₖᵀ Cₖ + mean_. Returns the same shape of container it
        was given: one array, a list (one reconstruction per input matrix), or a
        dict by name. Any k in [0, n_components_] works from the one fit.
        """
        self._check_fitted()
        k = self._check_k(k, allow_zero=True)
        mats, names, single = _as_named_list(matrices)
        outs = []
        for m, name in zip(mats, names):
            Z = _C.pca_project(m, self.mean_, self.components_, k, name)
            outs.append(_C.pca_reconstruct(Z, self.components_, self.mean_))
        if single:
            return outs[0]
        if isinstance(matrices, Mapping):
            return dict(zip(matrices.keys(), outs))
        return outs

    def iter_reconstructions(
        self, matrices: Any, ks: Iterable[int]
    ) -> Iterator[tuple[int, list[npt.NDArray[np.float32]]]]:
        """Reconstruct every matrix at each rank in `ks`, for the price of one.

        Yields ``(k, [X̂₁, X̂₂, ...])`` for the distinct ks in ascending order,
        one reconstruction per input matrix (in the order of `matrices`; a
        mapping yields its values in key order). The scores are computed once
        up to max(ks), and each step *adds* components k_prev..k to the
        previous reconstruction, so a whole sweep costs one rank-max(ks)
        product instead of one per setting.

        The yielded arrays are buffers reused by the next step: use them
        (e.g. copy them into a model's weights) before advancing, and
        ``.copy()`` any you want to keep.
        """
        self._check_fitted()
        wanted = sorted({self._check_k(k, allow_zero=True) for k in ks})
        if not wanted:
            raise ValueError("ks is empty; expected at least one rank")
        mats, names, _ = _as_named_list(matrices)
        kmax = wanted[-1]
        C = self.components_
        Zs = [
            _C.pca_project(m, self.mean_, C, kmax, name) if kmax > 0 else None
            for m, name in zip(mats, names)
        ]
        outs: list[np.ndarray] = []
        prev = 0
        for k in wanted:
            if not outs:  # first setting: mean + Z[:, :k] C[:k]
                for m, Z in zip(mats, Zs):
                    Zk = Z[:, :k] if Z is not None else np.zeros((np.shape(m)[0], 0), np.float32)
                    outs.append(_C.pca_reconstruct(Zk, C, self.mean_))
            elif k > prev:  # add components prev..k in place (so kmax > 0: every Z is set)
                for Z, out in zip(Zs, outs):
                    assert Z is not None
                    _C.pca_reconstruct(Z[:, prev:k], C[prev:k], None, out=out)
            prev = k
            yield k, outs

    # ------------------------------------------------------------- checking
    def _check_params(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be 'double' or 'single', got {self.precision!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(
                f"solver must be 'auto', 'gram' or 'covariance', got {self.solver!r}"
            )
        if not isinstance(self.center, (bool, np.bool_)):
            raise TypeError(f"center must be a bool, got {type(self.center).__name__}")
        n = self.n_components
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, (Integral, Real)):
            raise TypeError(
                f"n_components must be None, an int or a float in (0, 1], got {type(n).__name__}"
            )
        if isinstance(n, Integral):
            if n < 1:
                raise ValueError(f"n_components must be >= 1 when an int, got {n}")
        else:
            _check_threshold(n, "n_components")

    @staticmethod
    def _stack_min_dim(mats: list[Any]) -> int | None:
        """min(total rows, columns) of the stack when the shapes say so, else None
        (the C core then reports what is wrong with the input)."""
        try:
            shapes = [np.shape(m) for m in mats]
        except Exception:
            return None
        if not shapes or any(len(s) != 2 for s in shapes):
            return None
        return min(sum(s[0] for s in shapes), shapes[0][1])

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise AttributeError("this StackedPCA is not fitted yet; call fit(matrices) first")

    def _check_k(self, k: Any, allow_zero: bool = False) -> int:
        if k is None:
            return self.n_components_
        if isinstance(k, bool) or not isinstance(k, Integral):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        lo = 0 if allow_zero else 1
        k = int(k)
        if not lo <= k <= self.n_components_:
            hint = ("" if self.n_components_ == self.max_components_ else
                    f" (only {self.n_components_} of {self.max_components_} components were "
                    "kept; fit with n_components=None for all)")
            raise ValueError(f"k must be between {lo} and {self.n_components_}, got {k}{hint}")
        return k

    def _check_finite_matrix(self, X: Any, name: str) -> np.ndarray:
        """X as an array; TypeError/ValueError naming it if it is not a finite
        2-D numeric matrix (for score matrices Z, which the C core does not
        read element by element before the product)."""
        A = np.asarray(X) if not isinstance(X, np.ndarray) else X
        if A.dtype.kind not in "iuf":
            raise TypeError(
                f"{name} must be a real numeric (integer or floating) array, got dtype {A.dtype}"
            )
        if A.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (rows, columns), got a {A.ndim}-d array")
        if A.dtype.kind == "f" and not np.isfinite(A).all():
            raise ValueError(f"{name} contains NaN or Inf; expected finite values")
        return A

    def __repr__(self) -> str:
        args = [f"n_components={self.n_components!r}"]
        if not self.center:
            args.append("center=False")
        if self.precision != "double":
            args.append(f"precision={self.precision!r}")
        if self.solver != "auto":
            args.append(f"solver={self.solver!r}")
        return f"StackedPCA({', '.join(args)})"
