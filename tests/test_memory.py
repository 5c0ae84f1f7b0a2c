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


def tiny_model(hidden: int, intermediate: int, seed: int, dtype: str = "float32"):
    """A 2-layer GQA model with random weights (and the weights it was given)."""
    from pcasurgery import LlamaConfig, LlamaModel
    from pcasurgery.config import expected_shapes

    c = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                    max_position_embeddings=64)
    rng = np.random.default_rng(seed)
    w = {n: (rng.standard_normal(s) * 0.3).astype(np.float32)
         for n, s in expected_shapes(c).items()}
    return LlamaModel(c, w, dtype=dtype), w


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_runtime_and_conversion_flat_over_1000_calls():
    """LlamaRuntime.forward / set_weight / reset and to_float32 (success and
    error paths) neither leak references nor memory."""
    m, w = tiny_model(64, 96, seed=1)
    rt = m._rt
    k_idx = m._rt_index["model.layers.1.self_attn.k_proj.weight"]
    k_new = m.weights["model.layers.1.self_attn.k_proj.weight"] * 0.5
    k_old = m.weights["model.layers.1.self_attn.k_proj.weight"]
    tokens = np.arange(1, 33, dtype=np.int64)
    bf16 = (np.random.default_rng(1).standard_normal(300_000).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16).tobytes()
    bad = bytearray(bf16)
    bad[-2:] = b"\xc0\x7f"  # a NaN at the end
    bad = bytes(bad)

    def cycle() -> None:
        rt.reset()
        rt.forward(tokens, 0, True)
        rt.forward(np.array([5]), 32, False)
        rt.set_weight(k_idx, k_new)
        rt.set_weight(k_idx, k_old)
        try:
            rt.forward(np.array([500]), 0, True)  # outside the vocabulary
        except ValueError:
            pass
        try:
            rt.set_weight(k_idx, k_new[:, :3].copy())  # wrong shape
        except ValueError:
            pass
        pcasurgery._C.to_float32(bf16, 0, len(bf16), "BF16", (len(bf16) // 2,), "t")
        try:
            pcasurgery._C.to_float32(bad, 0, len(bad), "BF16", (len(bad) // 2,), "t")
        except ValueError:
            pass

    for _ in range(50):
        cycle()
    gc.collect()
    watched = (k_new, k_old, tokens, bf16, bad, rt)
    refs = [sys.getrefcount(x) for x in watched]
    rss0 = rss_bytes()
    for _ in range(1000):
        cycle()
    gc.collect()
    assert [sys.getrefcount(x) for x in watched] == refs
    # one cycle allocates ~1.3 MB (two converted 600 KB tensors, logits); a
    # leak of the (32, 128) logits (16 KB) per cycle would add 16 MB over
    # 1000 cycles, of a converted tensor 600 MB. Allow 4 MB.
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        assert rss_bytes() - rss0 < 4 * 2**20
    logits = rt.forward(tokens, 0, True)
    assert sys.getrefcount(logits) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_bf16_runtime_and_streaming_surgery_flat_over_many_calls():
    """bf16-resident weights: prefill (widened blocks), decode (the thread
    pool), set_weight with float and bf16 arrays, and a streaming surgery
    applied and restored, neither leak references nor memory."""
    from pcasurgery.surgery import Surgery

    m, w = tiny_model(128, 160, seed=2, dtype="bfloat16")
    name = "model.layers.1.mlp.up_proj.weight"
    bits = m.stored_weight(name)
    floats = w[name]
    tokens = np.arange(3, 40)
    old = pcasurgery.get_num_threads()
    pcasurgery.set_num_threads(2)

    def cycle() -> None:
        m._rt.reset()
        m._rt.forward(tokens, 0, False)
        m._rt.forward(np.array([5]), len(tokens), False)
        m.set_weight(name, floats)
        m.set_weight(name, bits)
        s = Surgery(m, "shared-kv", proj="k,v", streaming=True)
        s.apply(var=0.5)
        s.restore()

    try:
        for _ in range(30):
            cycle()
        gc.collect()
        refs = [sys.getrefcount(x) for x in (bits, floats, tokens)]
        rss0 = rss_bytes()
        for _ in range(300):
            cycle()
        gc.collect()
        assert [sys.getrefcount(x) for x in (bits, floats, tokens)] == refs
        # one cycle allocates ~0.5 MB (fits, reconstructions, logits); leaking
        # one k_proj reconstruction per cycle (64 x 128: 16 KB in bf16, 32 KB
        # in float32) would add 4.8-9.6 MB over 300 cycles: allow 4 MB
        if "libasan" not in os.environ.get("LD_PRELOAD", ""):
            assert rss_bytes() - rss0 < 4 * 2**20
    finally:
        pcasurgery.set_num_threads(old)
