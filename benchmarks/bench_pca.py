"""PCA on TinyLlama's attention shapes: pcasurgery against scikit-learn, in one run.

TinyLlama-1.1B has 22 layers; per layer q_proj is 2048 x 2048 (decomposed
alone) and k_proj, v_proj are 256 x 2048 each (stacked: 512 x 2048). That is
44 decompositions. The peer is scikit-learn's PCA(svd_solver="full"), which
the original experiment called.

(a) fit: time for all 44 decompositions, ours vs scikit-learn.
(a') the same for one surgery setting, PCA(0.3): we compute the whole
    spectrum but only the components kept; scikit-learn a full SVD.
(b) sweep over 10 variance thresholds, reconstructing every matrix at each:
    ours = one fit per group, then every threshold's reconstruction from the
    same fit (iter_reconstructions), vs scikit-learn refitting PCA(t) per
    threshold and reconstructing with inverse_transform(transform(W)), the
    original experiment's way. Each reconstruction is copied into a weight
    buffer, as surgery on a model would.

Threads: both sides get --threads BLAS threads. OpenBLAS threads busy-wait
after each call, so while one side is timed the other side's OpenBLAS pools
are limited to one thread (threadpoolctl).

Usage: python benchmarks/bench_pca.py [--layers 22] [--threads 2] [--precision double]

OPENBLAS_CORETYPE: some machines here force an older OpenBLAS kernel
(e.g. Haswell) through OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE. That setting
applies to every OpenBLAS in the process, ours and scikit-learn's alike; to
measure both on the processor's own kernel, run this script with
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`. The kernels in use are
printed either way.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager

import numpy as np
import sklearn
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_info, threadpool_limits

import pcasurgery
from pcasurgery import StackedPCA

THRESHOLDS = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
D, KV_ROWS = 2048, 256


def make_layers(n_layers: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random float32 weights with TinyLlama's shapes and a trained-like
    spectrum: a few strong directions over a decaying bulk."""
    rng = np.random.default_rng(seed)
    col_scale = (0.02 * (1.0 + 4.0 * np.exp(-np.arange(D) / 64.0))).astype(np.float32)

    def w(rows: int) -> np.ndarray:
        W = rng.standard_normal((rows, D), dtype=np.float32) * col_scale
        return W[:, rng.permutation(D)]

    return [{"q": w(D), "k": w(KV_ROWS), "v": w(KV_ROWS)} for _ in range(n_layers)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextmanager
def timing_side(side: str, threads: int):
    """Give `side` ("ours" or "peer") the threads; the other side's pools one."""
    ours_threads = threads if side == "ours" else 1
    peer_threads = threads if side == "peer" else 1
    with threadpool_limits(peer_threads, user_api="blas"):
        pcasurgery.set_num_threads(ours_threads)  # threadpool_limits set ours too
        time.sleep(0.2)  # let spinning threads of the previous phase park
        yield


def fit_ours(layers, precision, n_components=None):
    fits = []
    for L in layers:
        fits.append((StackedPCA(n_components, precision=precision).fit(L["q"]),
                     StackedPCA(n_components, precision=precision).fit([L["k"], L["v"]])))
    return fits


def fit_peer(layers, n_components=None):
    return [(PCA(n_components, svd_solver="full").fit(L["q"]),
             PCA(n_components, svd_solver="full").fit(np.vstack([L["k"], L["v"]])))
            for L in layers]


def sweep_ours(layers, precision, dest):
    """One fit per group (components up to the largest threshold), then all
    thresholds' reconstructions from it."""
    keep = max(THRESHOLDS)
    for L in layers:
        pq = StackedPCA(keep, precision=precision).fit(L["q"])
        pkv = StackedPCA(keep, precision=precision).fit([L["k"], L["v"]])
        for p, mats in ((pq, [L["q"]]), (pkv, [L["k"], L["v"]])):
            ks = [p.n_components_for(t) for t in THRESHOLDS]
            for _, recs in p.iter_reconstructions(mats, ks):
                for R in recs:
                    np.copyto(dest[: R.shape[0]], R)


def sweep_peer(layers, dest):
    """The original experiment's way: refit PCA(t) for every threshold."""
    for t in THRESHOLDS:
        for L in layers:
            for mats in ([L["q"]], [L["k"], L["v"]]):
                X = np.vstack(mats)
                p = PCA(n_components=t, svd_solver="full").fit(X)
                for W in mats:
                    R = p.inverse_transform(p.transform(W))
                    np.copyto(dest[: R.shape[0]], R)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="layers (TinyLlama: 22)")
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads for each side")
    ap.add_argument("--precision", default="double", choices=["double", "single"])
    ap.add_argument("--skip-sweep", action="store_true", help="only part (a)")
    args = ap.parse_args()

    layers = make_layers(args.layers)
    dest = np.empty((D, D), np.float32)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, pcasurgery {pcasurgery.__version__}")
    print(f"our BLAS: {pcasurgery.blas_info()}")
    kernels = sorted({f"{os.path.basename(i['filepath'])}: {i.get('architecture')}"
                      for i in threadpool_info() if i["internal_api"] == "openblas"})
    print(f"OpenBLAS kernels in use: {'; '.join(kernels)} "
          f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
    print(f"threads per side: {args.threads}; layers: {args.layers} "
          f"({2 * args.layers} decompositions); precision: {args.precision}")

    # warm-up (page in the libraries, spin up pools)
    with timing_side("ours", args.threads):
        fit_ours(layers[:1], args.precision)
    with timing_side("peer", args.threads):
        fit_peer(layers[:1])

    with timing_side("ours", args.threads):
        t_ours, ours = timed(fit_ours, layers, args.precision)
    with timing_side("peer", args.threads):
        t_peer, peer = timed(fit_peer, layers)
    # sanity: the two agree on the spectrum
    worst = 0.0
    for (oq, okv), (sq, skv) in zip(ours, peer):
        for o, s in ((oq, sq), (okv, skv)):
            big = s.explained_variance_ratio_ > 1e-6
            rel = np.abs(o.explained_variance_ratio_[big] - s.explained_variance_ratio_[big])
            worst = max(worst, float(np.max(rel / s.explained_variance_ratio_[big])))
    print("\n(a) fit, all decompositions")
    print(f"  pcasurgery    {t_ours:8.2f} s")
    print(f"  scikit-learn  {t_peer:8.2f} s")
    print(f"  ratio         {t_peer / t_ours:8.2f}x faster   (target >= 3x)")
    print(f"  max relative difference of explained_variance_ratio_ (> 1e-6): {worst:.1e}")
    ks = [ours[0][0].n_components_for(t) for t in THRESHOLDS]
    print(f"  layer 0 q_proj components at {THRESHOLDS}: {ks}")

    # (a') what one surgery setting needs: the spectrum and the components
    # that keep 30% of the variance (PCA(0.3) in both libraries)
    with timing_side("ours", args.threads):
        t_ours3, _ = timed(fit_ours, layers, args.precision, 0.3)
    with timing_side("peer", args.threads):
        t_peer3, _ = timed(fit_peer, layers, 0.3)
    print("\n(a') fit for one setting, n_components=0.3 (--var 0.3), all decompositions")
    print(f"  pcasurgery    {t_ours3:8.2f} s   (whole spectrum, kept components only)")
    print(f"  scikit-learn  {t_peer3:8.2f} s   (full SVD, then truncation)")
    print(f"  ratio         {t_peer3 / t_ours3:8.2f}x faster")

    if args.skip_sweep:
        return
    with timing_side("ours", args.threads):
        s_ours, _ = timed(sweep_ours, layers, args.precision, dest)
    with timing_side("peer", args.threads):
        s_peer, _ = timed(sweep_peer, layers, dest)
    print(f"\n(b) sweep: {len(THRESHOLDS)} thresholds, every matrix reconstructed at each")
    print(f"  pcasurgery    {s_ours:8.2f} s   (one fit per group + {len(THRESHOLDS)} reconstructions)")
    print(f"  scikit-learn  {s_peer:8.2f} s   (refit per threshold)")
    print(f"  ratio         {s_peer / s_ours:8.2f}x faster   (target >= 20x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
