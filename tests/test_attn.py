"""Decode on pcasurgery's own threads (csrc/attn.c, llama.c's on_pool
step): the scores (latent keys rebuilt, rotated and scored in L1), the
softmax, the values (or the latents' absorbed up-projection) and the gemv
row ranges all run on pool.c's threads, OpenBLAS single-threaded meanwhile.
The step must compute what the OpenBLAS path computes (attn_kernel("blas")):
same function, summed in another order, for every head size the kernel
takes, GQA ratio, bias, window, latent layout and context length (blocks of
24 and 8 positions with their short tails); and OpenBLAS's thread count must
come back. Prefill chunks run on those threads too (each thread's rows of a
weight, its share of the query rows, part of SwiGLU): every row of their
logits is checked against the BLAS path on 1-3 threads."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_latent import random_model

from pcasurgery import _C, LlamaModel, blas_library, get_num_threads, set_num_threads
from pcasurgery.surgery import Surgery

pytestmark = pytest.mark.skipif(_C.attn_kernel() != "avx2+fma",
                                reason="this CPU has no AVX2+FMA: decode stays on OpenBLAS")


@pytest.fixture(autouse=True)
def auto_kernel():
    yield
    _C.attn_kernel("auto")


def steps(m: LlamaModel, toks: np.ndarray, n_prefill: int) -> np.ndarray:
    """Logits of a prefill of n_prefill tokens, then one decode step per
    remaining token (contexts n_prefill + 1 .. len(toks))."""
    rt = m._rt
    rt.reset()
    out = [rt.forward(toks[:n_prefill], 0, False)[None]]
    for i in range(n_prefill, len(toks)):
        out.append(rt.forward(toks[i:i + 1], i, False)[None])
    return np.vstack(out)


def both_kernels(m: LlamaModel, toks: np.ndarray, n_prefill: int):
    _C.attn_kernel("blas")
    ref = steps(m, toks, n_prefill)
    assert _C.attn_kernel("auto") == "avx2+fma"
    return ref, steps(m, toks, n_prefill)


def latent_both_kernels(m: LlamaModel, s: Surgery, toks: np.ndarray, n_prefill: int, **setting):
    """both_kernels with s's setting applied factored; the model restored."""
    s.apply(**setting, factored=True)
    try:
        return both_kernels(m, toks, n_prefill)
    finally:
        s.restore()


def assert_close(ref, got):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# (hidden, heads, kv heads): head sizes 16, 32, 48, 64; GQA 1, 2, 4, 8
SHAPES = [(64, 4, 4), (128, 4, 2), (96, 2, 1), (256, 4, 1), (128, 8, 1)]


@pytest.mark.parametrize("hidden,heads,kv", SHAPES)
def test_dense_decode_matches_the_blas_path(hidden, heads, kv):
    m = random_model(heads, kv, seed=hidden + heads, hidden=hidden)
    toks = np.random.default_rng(1).integers(0, m.config.vocab_size, 120)
    for n_prefill in (1, 70):  # contexts 2.. (shorter than a block) and 71..120
        ref, got = both_kernels(m, toks, n_prefill)
        assert_close(ref, got)


@pytest.mark.parametrize("hidden,heads,kv", SHAPES)
@pytest.mark.parametrize("mode,proj", [("shared-kv", "k,v"), ("separate", "k,v"),
                                       ("separate", "k"), ("separate", "v")])
def test_latent_decode_matches_the_blas_path(hidden, heads, kv, mode, proj):
    m = random_model(heads, kv, seed=hidden + kv, hidden=hidden)
    toks = np.random.default_rng(2).integers(0, m.config.vocab_size, 100)
    assert_close(*latent_both_kernels(m, Surgery(m, mode, proj=proj).fit(), toks, 50, var=0.7))


@pytest.mark.parametrize("hidden,heads,kv", [(128, 8, 1), (256, 4, 1)])
def test_long_contexts_match_the_blas_path(hidden, heads, kv):
    """Contexts past 256 and 512 positions: the weighted sums run 256
    positions at a time, adding each block to the last."""
    m = random_model(heads, kv, seed=7, hidden=hidden)
    toks = np.random.default_rng(8).integers(0, m.config.vocab_size, 560)
    ref, got = both_kernels(m, toks, 500)
    assert_close(ref, got)
    assert_close(*latent_both_kernels(m, Surgery(m, "shared-kv").fit(), toks, 500, var=0.7))


@pytest.mark.parametrize("bias,window", [(True, 0), (False, 30), (True, 30)])
def test_biases_and_window_match_the_blas_path(bias, window):
    m = random_model(4, 2, seed=9, bias=bias, window=window, hidden=128)
    toks = np.random.default_rng(3).integers(0, m.config.vocab_size, 90)
    ref, got = both_kernels(m, toks, 40)
    assert_close(ref, got)
    assert_close(*latent_both_kernels(m, Surgery(m, "shared-kv").fit(), toks, 40, var=0.8))


def test_bf16_weights_match_the_blas_path():
    m0 = random_model(4, 1, seed=11, hidden=128)
    m = LlamaModel(m0.config, m0.weights, max_batch=64, dtype="bfloat16")
    toks = np.random.default_rng(4).integers(0, m.config.vocab_size, 80)
    ref, got = both_kernels(m, toks, 30)
    assert_close(ref, got)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype,window,latent", [("float32", 0, False), ("float32", 50, True),
                                                 ("bfloat16", 0, True), ("bfloat16", 50, False)])
def test_prefill_rows_match_the_blas_path(n_threads, dtype, window, latent):
    """Prefill on pcasurgery's threads (every weight product, the attention
    of each thread's share of the query rows, SwiGLU): every row's logits,
    in chunks of 64 (later chunks start at P > 0), on 1-3 threads."""
    m0 = random_model(4, 2, seed=13, window=window, hidden=128)
    m = LlamaModel(m0.config, m0.weights, max_batch=64, dtype=dtype)
    toks = np.random.default_rng(6).integers(0, m.config.vocab_size, 150)
    s = Surgery(m, "shared-kv").fit() if latent else None
    if s:
        s.apply(var=0.8, factored=True)
    old = get_num_threads()
    try:
        set_num_threads(n_threads)
        out = []
        for kernel in ("blas", "auto"):
            _C.attn_kernel(kernel)
            m._rt.reset()
            out.append(m._rt.forward(toks, 0, True))
        assert out[0].shape == (150, m.config.vocab_size)
        assert_close(*out)
    finally:
        set_num_threads(old)
        if s:
            s.restore()


def test_head_sizes_the_kernel_does_not_take_stay_on_blas():
    """Head size 8 (stories260K's): no kernel; a decode step is the BLAS
    path's, bit for bit, whichever is asked for. (Prefill runs on
    pcasurgery's threads for every head size: both prefill on BLAS here.)"""
    m = random_model(8, 2, seed=5)  # hidden 64 / 8 heads
    toks = np.random.default_rng(5).integers(0, m.config.vocab_size, 40)
    out = []
    for kernel in ("blas", "auto"):
        _C.attn_kernel("blas")
        m._rt.reset()
        m._rt.forward(toks[:20], 0, False)
        _C.attn_kernel(kernel)
        out.append(np.vstack([m._rt.forward(toks[i:i + 1], i, False) for i in range(20, 40)]))
    np.testing.assert_array_equal(out[1], out[0])


def test_openblas_threads_come_back():
    lib = ctypes.CDLL(blas_library())
    get = getattr(lib, "scipy_openblas_get_num_threads", None) or lib.openblas_get_num_threads
    before = get_num_threads()
    try:
        set_num_threads(2)
        m = random_model(4, 2, seed=6, hidden=128)
        toks = np.random.default_rng(6).integers(0, m.config.vocab_size, 30)
        steps(m, toks, 10)  # decode steps run with OpenBLAS at 1 thread
        assert get() == 2 and get_num_threads() == 2
    finally:
        set_num_threads(before)


def test_openblas_threads_come_back_after_concurrent_decodes():
    """Decode steps in several threads at once nest: the count that comes
    back is the one before the first, and set_num_threads during them
    wins."""
    import threading

    lib = ctypes.CDLL(blas_library())
    get = getattr(lib, "scipy_openblas_get_num_threads", None) or lib.openblas_get_num_threads
    before = get_num_threads()
    models = [random_model(4, 2, seed=20 + i, hidden=128) for i in range(3)]
    toks = np.random.default_rng(9).integers(0, 200, 60)
    errors = []

    def decode(m):
        try:
            for _ in range(3):
                steps(m, toks, 5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        for want in (2, 1, 2):
            set_num_threads(want)
            threads = [threading.Thread(target=decode, args=(m,)) for m in models]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            assert get() == want and get_num_threads() == want
        threads = [threading.Thread(target=decode, args=(m,)) for m in models]
        for t in threads:
            t.start()
        set_num_threads(1)  # while they decode
        for t in threads:
            t.join()
        assert get() == 1 and get_num_threads() == 1
    finally:
        set_num_threads(before)


def test_attn_kernel_bad_name():
    with pytest.raises(ValueError, match="name must be 'blas' or 'auto', got 'avx'"):
        _C.attn_kernel("avx")
    assert _C.attn_kernel() == "avx2+fma"


SPECIAL = [0.0, -0.0, 1e-8, -1e-8, 88.3762626647949, 88.38, 89.0, -87.3365, -87.34, -200.0,
           np.inf, -np.inf, np.nan]


def test_exp_of_softmax_and_swiglu_is_within_an_ulp_and_the_same_on_every_path():
    """The forward pass's e^x (softmax, SiLU): 8 lanes at a time (AVX2) and
    one at a time give the same bits, every length (the vector loop's
    tail), within 1 ulp of e^x; NaN stays NaN, +Inf past 88.3763 (e^x is
    within 1.5x of FLT_MAX there), 0 where e^x would be subnormal."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87, 88, 100_000), rng.standard_normal(50_000) * 3,
                        SPECIAL]).astype(np.float32)
    for n in (1, 7, 8, 9, 23, len(x)):  # the whole of x last: a is e^x below
        a, b = x[:n].copy(), x[:n].copy()
        _C.elementwise("exp", a, None, 0.0, True)
        _C.elementwise("exp", b, None, 0.0, False)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    ref = np.exp(x.astype(np.float64))
    normal = (ref > np.finfo(np.float32).tiny) & (ref < 2.4e38)
    ulp = np.abs(a[normal] - ref[normal]) / np.spacing(ref[normal].astype(np.float32))
    assert ulp.max() <= 1.0
    sp = a[-len(SPECIAL):]
    assert list(sp[:4]) == [1.0, 1.0, 1.0, 1.0] and sp[5] == np.inf
    top = np.exp(np.float64(np.float32(88.3762626647949)))  # the last finite input
    assert abs(sp[4] - top) <= np.spacing(np.float32(top))
    assert sp[6] == np.inf and sp[7] > 0 and list(sp[8:12]) == [0.0, 0.0, np.inf, 0.0]
    assert np.isnan(sp[12])
    m = x[:1000].copy()  # softmax's shift: e^(a - m)
    _C.elementwise("exp", m, None, 3.5, True)
    want = x[:1000] - np.float32(3.5)  # rounded to float32, as the C side subtracts
    _C.elementwise("exp", want, None, 0.0, False)
    assert np.array_equal(m, want)

    g = np.concatenate([rng.standard_normal(10_001) * 6, SPECIAL]).astype(np.float32)
    h = rng.standard_normal(len(g)).astype(np.float32)
    a, b = g.copy(), g.copy()
    _C.elementwise("swiglu", a, h, 0.0, True)
    _C.elementwise("swiglu", b, h, 0.0, False)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    gd = g.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gd / (1 + np.exp(-gd)) * h
    fin = np.isfinite(ref)
    assert np.allclose(a[fin], ref[fin], rtol=1e-6, atol=1e-30)
    assert np.isnan(a[-1]) and a[-3] == np.inf * np.sign(h[-3]) and np.isnan(a[-2])


def test_elementwise_names_bad_input():
    with pytest.raises(ValueError, match="name must be 'exp' or 'swiglu'"):
        _C.elementwise("tanh", np.zeros(3, np.float32), None, 0.0, True)
    with pytest.raises(TypeError, match="a must be a writable 1-D C-contiguous float32"):
        _C.elementwise("exp", np.zeros(3), None, 0.0, True)
    with pytest.raises(TypeError, match="b must be a 1-D C-contiguous float32 array as long as a"):
        _C.elementwise("swiglu", np.zeros(3, np.float32), np.zeros(2, np.float32), 0.0, True)
