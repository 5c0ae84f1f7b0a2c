"""A surgery sweep on a TinyLlama-1.1B-shaped checkpoint: pcasurgery against
the original experiment's way (scikit-learn PCA refitted for every
threshold), in one run.

The sweep, without evaluation: the spectra of every group and the
reconstruction of every planned matrix at 11 variance thresholds, for two
modes (separate, shared-kv).
- ours: Surgery.fit once per group (components up to the largest threshold;
  q_proj, alone in both modes, is decomposed once), then Surgery.apply per
  threshold (reconstructions written into the model);
- peer: per mode and threshold, PCA(n_components=t, svd_solver="full").fit on
  each group's stacked matrices and inverse_transform(transform(W)) for each
  member, copied into a weight buffer.
Then, separately: the seconds one evaluation setting costs (perplexity, KL
and top-1 on 512 tokens) with our forward pass.

Checkpoint: the one bench_forward.py writes (TinyLlama's config and names,
random bf16 weights), created here if missing.

Usage: python benchmarks/bench_sweep.py [--layers 22] [--threads 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import prepare  # noqa: E402

THRESHOLDS = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
MODES = ("separate", "shared-kv")


def sweep_ours(model, n_layers: int) -> float:
    from pcasurgery.surgery import Surgery

    t0 = time.perf_counter()
    fits: dict = {}  # q_proj is alone in both modes: decomposed once
    for mode in MODES:
        s = Surgery(model, mode, fits=fits)
        s.groups = [g for g in s.groups if g.layers[0] < n_layers]
        s.fit(keep=max(THRESHOLDS))
        for t in THRESHOLDS:
            s.apply(var=t)
        s.restore()
    return time.perf_counter() - t0


def sweep_peer(model, n_layers: int) -> float:
    from sklearn.decomposition import PCA

    from pcasurgery.surgery import plan

    dest = np.empty((2048, 2048), np.float32)
    t0 = time.perf_counter()
    for mode in MODES:
        groups = [g for g in plan(model.config, mode) if g.layers[0] < n_layers]
        for t in THRESHOLDS:
            for g in groups:
                mats = [model.weights[n] for n in g.names]
                p = PCA(n_components=t, svd_solver="full").fit(np.vstack(mats))
                for W in mats:
                    R = p.inverse_transform(p.transform(W))
                    np.copyto(dest[: R.shape[0]], R)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="layers swept (TinyLlama: 22)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                      "pcasurgery-bench", "tinyllama-random"))
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    import pcasurgery
    from pcasurgery.evaluate import Evaluator

    folder = Path(args.workdir)
    prepare(folder)
    model = pcasurgery.LlamaModel.from_pretrained(folder)
    print(f"checkpoint: {folder}; {args.layers} layers swept, {len(THRESHOLDS)} thresholds x "
          f"{len(MODES)} modes; {args.threads} threads per side")
    with threadpool_limits(1, user_api="blas"):  # peers' pools idle while we run
        pcasurgery.set_num_threads(args.threads)
        t_ours = sweep_ours(model, args.layers)
    with threadpool_limits(args.threads, user_api="blas"):
        pcasurgery.set_num_threads(1)
        t_peer = sweep_peer(model, args.layers)
    pcasurgery.set_num_threads(args.threads)
    print(f"sweep, no evaluation: pcasurgery {t_ours:.1f} s, scikit-learn refit per threshold "
          f"{t_peer:.1f} s: {t_peer / t_ours:.1f}x faster (target >= 20x)")
    tokens = np.random.default_rng(0).integers(3, 32000, 511)
    t0 = time.perf_counter()
    ev = Evaluator(model, tokens, n_ctx=512)
    t_base = time.perf_counter() - t0
    q = ev.evaluate()
    print(f"one evaluation setting (perplexity + KL + top-1 on {q.tokens} tokens, one window): "
          f"{q.seconds:.2f} s on {args.threads} threads (base log-probs once: {t_base:.2f} s)")


if __name__ == "__main__":
    main()
