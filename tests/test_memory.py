"""Reference counts and resident memory stay flat over many kernel calls."""
from __future__ import annotations

import gc
import os
import sys

import numpy as np
import pytest

import pcasurgery
from pcasurgery import StackedPCA


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_refcounts_and_rss_flat_over_1000_calls():
    rng = np.random.default_rng(0)
    Wk = rng.standard_normal((64, 512)).astype(np.float32)
    Wv = rng.standard_normal((64, 512)).astype(np.float32)
    W64 = Wk.astype(np.float64)  # converted (copied) inside the C core
    names = ["k_proj", "v_proj"]
    mats = [Wk, Wv]

    def cycle() -> None:
        p = StackedPCA(0.9).fit({"k_proj": Wk, "v_proj": Wv})
        Z = p.transform(Wk)
        p.inverse_transform(Z)
        p.reconstruct([Wk, W64], k=5)
        pcasurgery._C.pca_fit(mats, names, True, 0, 0, 0, 0.0)
        try:  # the error path must release what it took too
            pcasurgery._C.pca_fit([Wk, Wv[:, :10]], names, True, 0, 0, 0, 0.0)
        except ValueError:
            pass

    for _ in range(50):  # warm up allocator pools and caches
        cycle()
    gc.collect()
    refs = [sys.getrefcount(x) for x in (Wk, Wv, W64, mats, names)]
    rss0 = rss_bytes()
    for _ in range(1000):
        cycle()
    gc.collect()
    assert [sys.getrefcount(x) for x in (Wk, Wv, W64, mats, names)] == refs
    # One cycle allocates ~3 MB; a leak of even the smallest buffer (the (d,)
    # mean, 4 KB) per fit would add 12 MB over 1000 cycles. Allow 4 MB. (Under
    # AddressSanitizer freed memory sits in quarantine: RSS is meaningless.)
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        assert rss_bytes() - rss0 < 4 * 2**20
    # Fresh outputs are owned only by the caller.
    comps, eig, mean, _ = pcasurgery._C.pca_fit(mats, names, True, 0, 0, 0, 0.0)
    assert sys.getrefcount(comps) == 2 and sys.getrefcount(eig) == 2 and sys.getrefcount(mean) == 2
