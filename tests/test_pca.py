"""StackedPCA and the C PCA kernels against scikit-learn, NumPy and exact identities.

The reference is scikit-learn's PCA(svd_solver="full") run in float64 on the
very float32 values we decompose (the float32 rounding of the input is then
common to both sides, and what is compared is the algorithm).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_matrix
from sklearn.decomposition import PCA

import pcasurgery
from pcasurgery import StackedPCA

# (rows of each stacked matrix, columns): rows < cols (Gram route), rows > cols
# (covariance route), square, and 1 to 4 stacked matrices.
SHAPES = [
    ((40,), 64),
    ((200,), 48),
    ((64,), 64),
    ((24, 24), 96),  # k_proj + v_proj style: 48 x 96
    ((30, 10, 20), 32),
    ((16, 16, 16, 16), 40),
]
KINDS = ["random", "decay", "lowrank"]
LAYOUTS = ["C", "F", "float64", "slice"]


def layout(X: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """The same float32 values in another memory layout or dtype."""
    if how == "C":
        return X
    if how == "F":
        return np.asfortranarray(X)
    if how == "float64":
        return X.astype(np.float64)
    # a non-contiguous view: every other row and column of a bigger array
    big = rng.standard_normal((2 * X.shape[0], 2 * X.shape[1])).astype(np.float32)
    big[::2, ::2] = X
    view = big[::2, ::2]
    assert not view.flags.c_contiguous
    return view


def sk_fit(X: np.ndarray, n_components=None) -> PCA:
    return PCA(n_components=n_components, svd_solver="full").fit(X.astype(np.float64))


def well_separated(ratio: np.ndarray, rel_gap: float = 1e-3) -> np.ndarray:
    """Components whose eigenvalue is above 1e-6 of the total and is separated
    from both neighbours by more than rel_gap of the largest: only those have
    a well-defined direction to compare."""
    lam = ratio / ratio[0]
    gaps = np.minimum(np.abs(np.diff(lam, prepend=np.inf)), np.abs(np.diff(lam, append=-np.inf)))
    return (ratio > 1e-6) & (gaps > rel_gap)


@pytest.mark.parametrize("how", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,d", SHAPES)
def test_matches_sklearn(rows, d, kind, how, rng):
    mats32 = [make_matrix(kind, rng, n, d) for n in rows]
    X = np.vstack(mats32)
    ours = StackedPCA().fit([layout(M, how, rng) for M in mats32])
    sk = sk_fit(X)
    r = min(X.shape)
    assert ours.n_components_ == r == sk.n_components_
    assert ours.components_.dtype == np.float32 and ours.components_.shape == (r, d)
    assert ours.n_samples_ == X.shape[0] and ours.n_features_in_ == d

    # Eigenvalues: the double eigensolver is accurate to ~1e-12 relative above
    # 1e-6 of the total; the bound is 1e-4.
    big = sk.explained_variance_ratio_ > 1e-6
    rel = np.abs(ours.explained_variance_ratio_[big] - sk.explained_variance_ratio_[big])
    assert np.all(rel <= 1e-4 * sk.explained_variance_ratio_[big])
    np.testing.assert_allclose(ours.explained_variance_[big], sk.explained_variance_[big], rtol=1e-4)
    np.testing.assert_allclose(ours.singular_values_[big], sk.singular_values_[big], rtol=1e-4)
    # The mean is accumulated in double and rounded to float32 once.
    np.testing.assert_allclose(ours.mean_, sk.mean_, rtol=1e-6, atol=1e-6 * np.abs(X).max())

    # Same n_components_ for thresholds away from ties (cumsum not within 1e-6).
    cum = np.cumsum(sk.explained_variance_ratio_)
    for t in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99):
        if np.min(np.abs(cum - t)) > 1e-6:
            assert ours.n_components_for(t) == sk_fit(X, t).n_components_, t

    # Same axes, with the same (svd_flip) signs, for well-separated
    # eigenvalues: float32 components are good to ~1e-6 rad there.
    sep = well_separated(sk.explained_variance_ratio_)
    assert sep.any()
    cos = np.sum(ours.components_[sep].astype(np.float64) * sk.components_[sep], axis=1)
    assert np.all(np.arccos(np.clip(cos, -1, 1)) < 1e-3)

    # Reconstruction at a k that ends at a well-separated eigenvalue, within
    # float32 tolerance: each entry is a sum of k float32 products, good to
    # ~k * eps32 of the entries' scale; 1e-5 of max|X| leaves room for k <= 200.
    k = int(np.flatnonzero(sep)[min(2, sep.sum() - 1)]) + 1
    if k < r and sep[k - 1] and (sk.explained_variance_ratio_[k - 1] - sk.explained_variance_ratio_[k]) > 1e-3 * sk.explained_variance_ratio_[0]:
        sk_k = sk_fit(X, k)
        want = sk_k.inverse_transform(sk_k.transform(X.astype(np.float64)))
        got = np.vstack(ours.reconstruct([layout(M, how, rng) for M in mats32], k=k))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(X).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,d", SHAPES)
def test_eckart_young_and_monotone(rows, d, kind, rng):
    """Centered reconstruction error² = sum of discarded eigenvalues, for every
    k; it never increases with k, and k = all gives the input back."""
    mats = [make_matrix(kind, rng, n, d) for n in rows]
    X = np.vstack(mats).astype(np.float64)
    p = StackedPCA().fit(mats)
    eig = p.all_explained_variance_ * (p.n_samples_ - 1)  # squared singular values
    total = eig.sum()
    errs = []
    for k in range(p.max_components_ + 1):
        R = np.vstack(p.reconstruct(mats, k=k)).astype(np.float64)
        err2 = np.sum((X - R) ** 2)
        errs.append(err2)
        # The float32 reconstruction adds rounding of ~eps32 * |X| per entry:
        # its error² is exact to ~1e-6 of the total (the rest is double).
        assert abs(err2 - eig[k:].sum()) <= 1e-6 * total + 1e-5 * eig[k:].sum(), k
    assert np.all(np.diff(errs) <= 1e-6 * total)
    # Full rank: back to the input, to float32 precision (~1e-6 of the scale).
    R = np.vstack(p.reconstruct(mats, k=p.max_components_))
    np.testing.assert_allclose(R, X, rtol=0, atol=2e-6 * np.abs(X).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", [(30, 50), (50, 30), (40, 40)])
def test_gram_and_covariance_routes_agree(n, d, kind, rng):
    X = make_matrix(kind, rng, n, d)
    g = StackedPCA(solver="gram").fit(X)
    c = StackedPCA(solver="covariance").fit(X)
    big = c.explained_variance_ratio_ > 1e-6
    # Both are double eigensolves of exact-product matrices: ~1e-10 relative.
    np.testing.assert_allclose(g.explained_variance_ratio_[big], c.explained_variance_ratio_[big], rtol=1e-8)
    sep = well_separated(c.explained_variance_ratio_)
    np.testing.assert_allclose(g.components_[sep], c.components_[sep], atol=1e-5)
    ratio = c.all_explained_variance_ratio_
    for k in (1, 5, min(n, d)):
        # compare only where the rank-k subspace is well defined
        if k == min(n, d) or ratio[k - 1] - ratio[k] > 1e-4 * ratio[0]:
            np.testing.assert_allclose(g.reconstruct(X, k=k), c.reconstruct(X, k=k),
                                       atol=1e-5 * np.abs(X).max())
    # Components are orthonormal on both routes (null directions completed).
    for p in (g, c):
        V = p.components_.astype(np.float64)
        np.testing.assert_allclose(V @ V.T, np.eye(len(V)), atol=1e-5)


def test_stacked_list_equals_vstack(rng):
    Wk = make_matrix("decay", rng, 24, 64)
    Wv = make_matrix("random", rng, 24, 64)
    a = StackedPCA().fit([Wk, Wv])
    b = StackedPCA().fit([np.vstack([Wk, Wv])])
    # Same rows in the same order: the same arithmetic, bit for bit.
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(a.all_explained_variance_, b.all_explained_variance_)
    np.testing.assert_array_equal(a.mean_, b.mean_)
    rk, rv = a.reconstruct([Wk, Wv], k=10)
    both = b.reconstruct(np.vstack([Wk, Wv]), k=10)
    assert rk.shape == Wk.shape and rv.shape == Wv.shape
    np.testing.assert_array_equal(np.vstack([rk, rv]), both)
    named = a.reconstruct({"k_proj": Wk, "v_proj": Wv}, k=10)
    assert list(named) == ["k_proj", "v_proj"]
    np.testing.assert_array_equal(named["v_proj"], rv)


def test_uncentered_is_plain_svd(rng):
    X = make_matrix("decay", rng, 30, 50)
    p = StackedPCA(center=False).fit(X)
    s = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    assert not p.mean_.any()
    np.testing.assert_allclose(p.all_explained_variance_ * (p.n_samples_ - 1), s**2, rtol=1e-8, atol=1e-12 * s[0] ** 2)
    # The ratio is the fraction of energy (squared Frobenius norm) kept.
    np.testing.assert_allclose(p.all_explained_variance_ratio_, s**2 / np.sum(s**2), rtol=1e-8, atol=1e-16)
    R = p.reconstruct(X, k=3).astype(np.float64)
    assert abs(np.sum((X - R) ** 2) - np.sum(s[3:] ** 2)) < 1e-6 * np.sum(s**2)


def test_single_precision_is_close_but_loses_the_tail(rng):
    X = make_matrix("decay", rng, 200, 120)
    d = StackedPCA().fit(X)
    s = StackedPCA(precision="single").fit(X)
    ratio_d, ratio_s = d.all_explained_variance_ratio_, s.all_explained_variance_ratio_
    # float32 eigensolve: absolute accuracy ~1e-7 of the largest eigenvalue.
    assert np.max(np.abs(ratio_s - ratio_d)) < 1e-6 * ratio_d[0]
    for t in (0.5, 0.9, 0.99):
        assert abs(s.n_components_for(t) - d.n_components_for(t)) <= 1


@pytest.mark.parametrize("solver", ["gram", "covariance"])
@pytest.mark.parametrize("precision", ["double", "single"])
def test_n_components_semantics(solver, precision, rng):
    X = make_matrix("decay", rng, 60, 40)
    full = StackedPCA(solver=solver, precision=precision).fit(X)
    assert full.n_components_ == 40 == full.max_components_
    seven = StackedPCA(7, solver=solver, precision=precision).fit(X)
    assert seven.n_components_ == 7 and seven.components_.shape == (7, 40)
    assert StackedPCA(1.0, solver=solver, precision=precision).fit(X).n_components_ == 40
    p = StackedPCA(0.3, solver=solver, precision=precision).fit(X)
    cum = np.cumsum(full.explained_variance_ratio_)
    k = p.n_components_
    # --var 0.3 keeps (at least) 30% of the variance, with the fewest components.
    assert cum[k - 1] > 0.3 and (k == 1 or cum[k - 2] <= 0.3)
    assert k == sk_fit(X, 0.3).n_components_ == full.n_components_for(0.3)
    # Only the kept components are computed; the whole spectrum always is.
    assert p.components_.shape == (k, 40)
    # (a full fit takes its eigenvalues from divide and conquer, a partial one
    # from dsterf: both double, equal to ~1e-13 of the largest)
    np.testing.assert_allclose(p.all_explained_variance_ratio_, full.all_explained_variance_ratio_,
                               rtol=1e-10, atol=1e-13)
    assert p.n_components_for(0.9) == full.n_components_for(0.9)
    # The same leading components as a full fit (computed for fewer columns).
    np.testing.assert_allclose(seven.components_, full.components_[:7], atol=1e-6)
    np.testing.assert_allclose(p.reconstruct(X), full.reconstruct(X, k=k), atol=1e-5 * np.abs(X).max())
    assert p.transform(X).shape == (60, k)
    assert p.transform(X, k=1).shape == (60, 1)
    with pytest.raises(ValueError, match=rf"k must be between 0 and {k}, got {k + 1} \(only {k} of 40 components were kept"):
        p.reconstruct(X, k=k + 1)
    Z = p.fit_transform(X)
    np.testing.assert_allclose(p.inverse_transform(Z), p.reconstruct(X), atol=1e-6)


def test_project_and_reconstruct_match_numpy_twins(rng):
    """Each C kernel against its slow NumPy twin."""
    X = make_matrix("random", rng, 70, 33)
    p = StackedPCA().fit(X)
    C = p.components_.astype(np.float64)
    mean = p.mean_.astype(np.float64)
    for k in (0, 1, 9, 33):
        Z = pcasurgery._C.pca_project(X, p.mean_, p.components_, k)
        np.testing.assert_allclose(Z, (X - mean) @ C[:k].T, atol=1e-5)
        R = pcasurgery._C.pca_reconstruct(Z, p.components_, p.mean_)
        np.testing.assert_allclose(R, Z.astype(np.float64) @ C[:k] + mean, atol=1e-5)
    # accumulate mode: adding components k0..k1 to a rank-k0 reconstruction
    Z = p.transform(X, k=33)
    out = pcasurgery._C.pca_reconstruct(np.ascontiguousarray(Z[:, :5]), p.components_, p.mean_)
    pcasurgery._C.pca_reconstruct(Z[:, 5:20], p.components_[5:20], None, out=out)
    np.testing.assert_allclose(out, p.reconstruct(X, k=20), atol=1e-5)


def test_iter_reconstructions_equals_direct(rng):
    Wk = make_matrix("decay", rng, 20, 48)
    Wv = make_matrix("random", rng, 20, 48)
    p = StackedPCA().fit([Wk, Wv])
    seen = []
    for k, (rk, rv) in p.iter_reconstructions([Wk, Wv], [30, 0, 5, 5, 40, 12]):
        seen.append(k)
        dk, dv = p.reconstruct([Wk, Wv], k=k)
        # a running float32 sum of up to 5 products: ~5 eps32 of the scale
        np.testing.assert_allclose(rk, dk, rtol=0, atol=1e-5 * np.abs(Wk).max())
        np.testing.assert_allclose(rv, dv, rtol=0, atol=1e-5 * np.abs(Wv).max())
    assert seen == [0, 5, 12, 30, 40]
    with pytest.raises(ValueError, match="ks is empty"):
        next(p.iter_reconstructions([Wk], []))
    with pytest.raises(ValueError, match="k must be between 0 and 40, got 41"):
        next(p.iter_reconstructions([Wk], [41]))


# ------------------------------------------------------------------ bad input

def test_nonfinite_names_the_matrix(rng):
    Wk = make_matrix("random", rng, 8, 16)
    Wv = make_matrix("random", rng, 8, 16)
    for bad in (np.nan, np.inf, -np.inf):
        Wv2 = Wv.copy()
        Wv2[3, 7] = bad
        with pytest.raises(ValueError, match=r"matrices\[1\] contains NaN or Inf \(first at row 3, column 7\)"):
            StackedPCA().fit([Wk, Wv2])
        with pytest.raises(ValueError, match=r"v_proj contains NaN or Inf"):
            StackedPCA().fit({"k_proj": Wk, "v_proj": Wv2})
    p = StackedPCA().fit(Wk)
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        p.transform(np.where(Wv > 0, np.nan, Wv))
    Wv2 = Wv.copy()
    Wv2[5, 2] = np.inf
    with pytest.raises(ValueError, match=r"v_proj contains NaN or Inf \(first at row 5, column 2\)"):
        p.reconstruct({"k_proj": Wk, "v_proj": Wv2}, k=3)
    with pytest.raises(ValueError, match=r"matrices\[1\] contains NaN or Inf"):
        next(p.iter_reconstructions([Wk, Wv2], [2]))
    with pytest.raises(ValueError, match="Z contains NaN or Inf"):
        p.inverse_transform(np.full((2, 3), np.inf))


def test_bad_shapes(rng):
    A = make_matrix("random", rng, 8, 16)
    with pytest.raises(ValueError, match="v_proj has 12 columns but k_proj has 16"):
        StackedPCA().fit({"k_proj": A, "v_proj": A[:, :12]})
    with pytest.raises(ValueError, match=r"matrices\[1\] has 12 columns but matrices\[0\] has 16"):
        StackedPCA().fit([A, A[:, :12]])
    for arr, nd in ((np.float32(1.0), 0), (np.ones(5, np.float32), 1), (np.ones((2, 3, 4), np.float32), 3)):
        with pytest.raises(ValueError, match=rf"matrices must be a 2-D array \(rows, columns\), got a {nd}-d array"):
            StackedPCA().fit(arr)
    with pytest.raises(ValueError, match=r"matrices\[1\] is empty \(shape \(0, 16\)\)"):
        StackedPCA().fit([A, np.zeros((0, 16), np.float32)])
    with pytest.raises(ValueError, match="matrices is empty"):
        StackedPCA().fit([])
    p = StackedPCA().fit(A)
    with pytest.raises(ValueError, match="X has 12 columns but the PCA was fitted on 16 features"):
        p.transform(A[:, :12])
    with pytest.raises(ValueError, match="Z has 9 columns but only 8 components were kept"):
        p.inverse_transform(np.zeros((2, 9), np.float32))


def test_bad_dtypes_and_objects():
    for obj in (np.array([["a", "b"], ["c", "d"]]), np.ones((2, 2), dtype=bool),
                np.ones((2, 2), dtype=complex), np.array([[object(), 1]], dtype=object)):
        with pytest.raises(TypeError, match="must be a real numeric"):
            StackedPCA().fit(obj)
    with pytest.raises(TypeError, match="matrices must be a real numeric .* got dtype object"):
        StackedPCA().fit(object())
    with pytest.raises(TypeError, match=r"matrices\[0\] must be a real numeric"):
        StackedPCA().fit([None])
    p = StackedPCA().fit(np.eye(4, dtype=np.float32) + 1)
    with pytest.raises(TypeError, match="X must be a real numeric"):
        p.transform("abc")


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), 1.0000001])
def test_bad_thresholds(bad):
    X = np.arange(20, dtype=np.float32).reshape(4, 5) ** 1.5
    with pytest.raises(ValueError, match=r"n_components must be in \(0, 1\]"):
        StackedPCA(bad).fit(X)
    p = StackedPCA().fit(X)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        p.n_components_for(bad)


def test_bad_ranks_and_params(rng):
    X = make_matrix("random", rng, 6, 10)
    with pytest.raises(ValueError, match="n_components must be >= 1 when an int, got 0"):
        StackedPCA(0).fit(X)
    with pytest.raises(ValueError, match=r"n_components=7 must be between 1 and min\(n_samples, n_features\)=6"):
        StackedPCA(7).fit(X)
    with pytest.raises(TypeError, match="n_components must be None, an int or a float"):
        StackedPCA("all").fit(X)
    with pytest.raises(TypeError, match="n_components must be None, an int or a float"):
        StackedPCA(True).fit(X)
    with pytest.raises(ValueError, match="precision must be 'double' or 'single'"):
        StackedPCA(precision="half").fit(X)
    with pytest.raises(ValueError, match="solver must be 'auto', 'gram' or 'covariance'"):
        StackedPCA(solver="svd").fit(X)
    p = StackedPCA().fit(X)
    with pytest.raises(ValueError, match="k must be between 1 and 6, got 7"):
        p.transform(X, k=7)
    with pytest.raises(ValueError, match="k must be between 0 and 6, got -1"):
        p.reconstruct(X, k=-1)
    with pytest.raises(TypeError, match="k must be an int"):
        p.reconstruct(X, k=2.5)
    with pytest.raises(AttributeError, match="not fitted yet"):
        StackedPCA().transform(X)


def test_degenerate_data():
    with pytest.raises(ValueError, match="zero total variance"):
        StackedPCA().fit(np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="zero total energy"):
        StackedPCA(center=False).fit(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="1 row in total; a centered PCA needs at least 2"):
        StackedPCA().fit(np.ones((1, 3), np.float32))
    # uncentered, one row: a rank-1 SVD
    p = StackedPCA(center=False).fit(np.array([[3.0, 4.0]], np.float32))
    np.testing.assert_allclose(p.components_, [[0.6, 0.8]], atol=1e-7)


def test_inputs_not_mutated_and_readonly_ok(rng):
    Wk = make_matrix("decay", rng, 16, 32)
    Wv = make_matrix("random", rng, 16, 32)
    keep = (Wk.copy(), Wv.copy())
    for W in (Wk, Wv):
        W.flags.writeable = False
    p = StackedPCA(0.9).fit([Wk, Wv])
    p.transform(Wk)
    p.reconstruct([Wk, Wv], k=3)
    p.fit_transform([Wk, Wv])
    np.testing.assert_array_equal(Wk, keep[0])
    np.testing.assert_array_equal(Wv, keep[1])
    Z = p.transform(Wk)
    Z.flags.writeable = False
    Zc = Z.copy()
    p.inverse_transform(Z)
    np.testing.assert_array_equal(Z, Zc)


def test_reconstruct_out_is_checked(rng):
    X = make_matrix("random", rng, 6, 10)
    p = StackedPCA().fit(X)
    Z = p.transform(X, k=3)
    with pytest.raises(ValueError, match="out is required when mean is None"):
        pcasurgery._C.pca_reconstruct(Z, p.components_, None)
    with pytest.raises(ValueError, match=r"out must be a writeable float32 array of shape \(6, 10\)"):
        pcasurgery._C.pca_reconstruct(Z, p.components_, p.mean_, out=np.zeros((6, 10)))
    ro = np.zeros((6, 10), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        pcasurgery._C.pca_reconstruct(Z, p.components_, p.mean_, out=ro)
    C = p.components_.copy()  # (6, 10), the shape of the output
    with pytest.raises(ValueError, match="must not overlap"):
        pcasurgery._C.pca_reconstruct(Z, C, None, out=C)


# ------------------------------------------------------------------- threads

def test_threads():
    before = pcasurgery.get_num_threads()
    try:
        pcasurgery.set_num_threads(1)
        assert pcasurgery.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be between 1 and"):
            pcasurgery.set_num_threads(0)
        with pytest.raises(TypeError, match="n must be an int"):
            pcasurgery.set_num_threads(1.5)
    finally:
        pcasurgery.set_num_threads(before)
    assert "OpenBLAS" in pcasurgery.blas_info()


def test_threadpoolctl_sees_our_openblas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    lib = os.path.realpath(pcasurgery.blas_library())
    ours = [i for i in threadpoolctl.threadpool_info() if os.path.realpath(i["filepath"]) == lib]
    assert len(ours) == 1, (lib, threadpoolctl.threadpool_info())
    before = pcasurgery.get_num_threads()
    assert ours[0]["num_threads"] == before
    try:
        pcasurgery.set_num_threads(1)
        (now,) = [i for i in threadpoolctl.threadpool_info() if os.path.realpath(i["filepath"]) == lib]
        assert now["num_threads"] == 1
        pcasurgery.set_num_threads(before)
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            assert pcasurgery.get_num_threads() == 1
        assert pcasurgery.get_num_threads() == before
    finally:
        pcasurgery.set_num_threads(before)
