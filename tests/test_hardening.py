"""Defects found by probing the loaders, the runtime and the C core as a
hostile user would (issue #9); each test failed before its fix.

C core: the threaded conversion, size arithmetic in the runtime, a
half-initialised runtime, inputs mutated while pca_fit converts them,
non-finite weights in safetensors, 16-bit data at odd addresses.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import pcasurgery
from pcasurgery import _C, LlamaConfig, LlamaModel
from pcasurgery.config import runtime_names

# --------------------------------------------------------------- helpers

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


def tiny_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    from pcasurgery.config import expected_shapes

    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * (1.0 if len(s) == 1 else 0.3)).astype(np.float32)
            for n, s in expected_shapes(config).items()}


@pytest.fixture(scope="module")
def tiny() -> LlamaModel:
    c = LlamaConfig(**TINY)
    return LlamaModel(c, tiny_weights(c))


def runtime_args(model: LlamaModel) -> tuple:
    c = model.config
    cfg = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
           c.num_key_value_heads, c.head_dim, c.vocab_size, model.n_ctx,
           float(c.rms_norm_eps), float(c.rope_theta), None, 0)
    names = runtime_names(c)
    return cfg, [model.weights.get(n) for n in names], names


class threads:
    """pcasurgery's BLAS (and conversion) thread count, restored on exit."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.old = pcasurgery.get_num_threads()
        pcasurgery.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        pcasurgery.set_num_threads(self.old)


# ------------------------------------------- 1. threaded conversion, every size

N_BIG = 2 * 2**20  # the threaded path starts at 2**20 values per thread


@pytest.mark.parametrize("n_threads", range(1, 9))
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_threaded_conversion_writes_every_value(dtype, n_threads):
    """Sizes just around the chunk boundaries (multiples of 1024 per thread,
    +-1), converted on 1-8 threads, equal NumPy's own widening at every
    index. The old chunking left the tail of 2*2**20 + 1 values unwritten."""
    rng = np.random.default_rng(n_threads)
    src = rng.standard_normal(N_BIG * 4 + 5).astype(np.float32)
    if dtype == "F16":
        raw = src.astype(np.float16)
        want = raw.astype(np.float32)
    elif dtype == "BF16":
        raw = (src.view(np.uint32) >> 16).astype(np.uint16)
        want = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        raw, want = src, src
    buf = raw.tobytes()
    item = raw.itemsize
    with threads(n_threads):
        for n in sorted({N_BIG - 1, N_BIG, N_BIG + 1, N_BIG * n_threads + 1,
                         N_BIG * 2 + 1023, 3 * 2**20 + 7}):
            n = min(n, len(raw))
            got = _C.to_float32(buf, 0, n * item, dtype, (n,))
            # poison-free check: every value compared, the last ones too
            np.testing.assert_array_equal(got, want[:n], err_msg=f"n={n}")
            assert got[-1] == want[n - 1]


def test_every_16bit_pattern_widens_exactly_or_is_refused():
    """All 65536 bf16 and f16 bit patterns: the finite ones equal NumPy's
    widening bit for bit, each NaN/Inf is refused at its index."""
    bits = np.arange(2**16, dtype=np.uint16)
    f16 = bits.view(np.float16)
    finite = np.isfinite(f16)
    got = _C.to_float32(bits[finite].tobytes(), 0, int(finite.sum()) * 2, "F16",
                        (int(finite.sum()),))
    np.testing.assert_array_equal(got.view(np.uint32), f16[finite].astype(np.float32).view(np.uint32))
    bf = (bits.astype(np.uint32) << 16).view(np.float32)
    finite = np.isfinite(bf)
    got = _C.to_float32(bits[finite].tobytes(), 0, int(finite.sum()) * 2, "BF16",
                        (int(finite.sum()),))
    np.testing.assert_array_equal(got.view(np.uint32), bf[finite].view(np.uint32))
    for dtype, pattern in (("F16", 0x7C00), ("F16", 0xFE01), ("BF16", 0x7F80), ("BF16", 0xFFC1)):
        raw = np.zeros(10, np.uint16)
        raw[7] = pattern
        with pytest.raises(ValueError, match=r"w\.q contains NaN or Inf \(first at flat index 7"):
            _C.to_float32(raw.tobytes(), 0, 20, dtype, (2, 5), "w.q")


@pytest.mark.parametrize("n_threads", [1, 2, 5])
def test_nonfinite_found_in_any_chunk(n_threads):
    """The first NaN is reported wherever it lies, on the threaded path too."""
    n = 2 * N_BIG + 3
    with threads(n_threads):
        for where in (0, N_BIG - 1, N_BIG + 1025, n - 1):
            a = np.ones(n, np.float32)
            a[where] = np.nan
            a[min(where + 5, n - 1)] = np.inf
            with pytest.raises(ValueError, match=f"first at flat index {where} of {n}"):
                _C.to_float32(a.tobytes(), 0, 4 * n, "F32", (n,))


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_data_at_odd_addresses_converts(dtype):
    """An unpadded safetensors header leaves tensors at odd offsets."""
    a = np.linspace(-3, 3, 21, dtype=np.float32)
    raw = {"F16": a.astype(np.float16).tobytes(), "F32": a.tobytes(),
           "BF16": (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()}[dtype]
    want = _C.to_float32(raw, 0, len(raw), dtype, (21,))
    for pad in (1, 3):
        buf = b"\x00" * pad + raw
        np.testing.assert_array_equal(_C.to_float32(buf, pad, len(raw), dtype, (21,)), want)


# --------------------------------------------------- 2. size arithmetic

@pytest.mark.parametrize("max_batch", [2**62, 2**63 - 1, 2**64, 10**6, 65])
def test_huge_max_batch_is_bounded_by_the_context(tiny, max_batch):
    """max_batch beyond the context used to overflow the buffer sizes (heap
    corruption at 2**63-1, wrong logits at 2**62); a chunk never holds more
    than the context, so any max_batch >= the context means "one chunk"."""
    toks = np.arange(1, 40) % 64
    want = tiny.logits(toks)
    m = LlamaModel(tiny.config, dict(tiny.weights), max_batch=max_batch)
    np.testing.assert_array_equal(m.logits(toks), want)


@pytest.mark.parametrize("max_batch", [0, -1, True, 2.5, "8"])
def test_bad_max_batch_is_refused(tiny, max_batch):
    with pytest.raises((ValueError, TypeError), match="max_batch must be"):
        LlamaModel(tiny.config, dict(tiny.weights), max_batch=max_batch)


@pytest.mark.parametrize("field,value,what", [
    (5, 2**62, "head_dim"),
    (5, 2**30, "n_heads \\* head_dim"),
    (3, 2**40, "n_heads"),
    (2, 2**40, "n_layers"),
    (7, 2**40, "seq_len"),
    (6, 2**33, "vocab_size"),
    (0, 2**31, "hidden_size"),
])
def test_runtime_refuses_sizes_that_overflow(tiny, field, value, what):
    """Huge head_dim / layer / KV-head counts reached the RoPE loop with
    overflowed sizes (a bus error); now each is named before any work."""
    cfg, arrays, names = runtime_args(tiny)
    cfg = list(cfg)
    cfg[field] = value
    if field in (3, 4):  # keep n_heads a multiple of n_kv_heads
        cfg[3] = cfg[4] = value
    with pytest.raises(ValueError, match=f"config is too large: {what}"):
        _C.LlamaRuntime(tuple(cfg), arrays, names)


SMALL_SHAPES = [(4, 8), (8,), (4, 8), (8,), (8, 8), (8, 8), (8, 8), (8, 8), (8,), (8, 8),
                (8, 8), (8, 8), None, None, None, None]  # D=8, F=8, L=1, H=KV=2, hd=4, V=4


@pytest.mark.parametrize("seq_len,max_batch,err,match", [
    # (B, S) attention buffer: 2**62 floats, 2**64 bytes: overflows size_t
    (2**31 - 1, 2**63 - 1, ValueError, "config is too large: the KV cache and activation"),
    # fits size_t but not memory: a clear MemoryError, not a crash
    (2**28 - 1, 2**63 - 1, MemoryError, "cannot allocate the KV cache"),
])
def test_runtime_buffer_sizes_are_checked(seq_len, max_batch, err, match):
    """Arrays consistent with the config, so only the buffer sizes remain."""
    c = (8, 8, 1, 2, 2, 4, 4, seq_len, 1e-5, 1e4, None, 0)
    arrays = [None if s is None else np.zeros(s, np.float32) for s in SMALL_SHAPES]
    with pytest.raises(err, match=match):
        _C.LlamaRuntime(c, arrays, [f"w{i}" for i in range(16)], max_batch=max_batch)


def test_runtime_config_messages_show_the_values(tiny):
    cfg, arrays, names = runtime_args(tiny)
    bad = cfg[:8] + (-1.0, 1e4, None, 0)
    with pytest.raises(ValueError, match=r"got -1\.0 and 10000\.0"):
        _C.LlamaRuntime(bad, arrays, names)
    with pytest.raises(ValueError, match="sliding_window must be >= 0"):
        _C.LlamaRuntime(cfg[:11] + (-1,), arrays, names)
    with pytest.raises(TypeError, match=r"rope_inv_freq must be None or a contiguous float32 "
                                        r"array of shape \(4,\)"):
        _C.LlamaRuntime(cfg[:10] + (np.ones(3, np.float32), 0), arrays, names)
    with pytest.raises(ValueError, match=r"rope_inv_freq\[1\] must be positive and finite"):
        _C.LlamaRuntime(cfg[:10] + (np.array([1, np.nan, 1, 1], np.float32), 0), arrays, names)
    with pytest.raises(ValueError, match="must each hold 29 entries"):
        _C.LlamaRuntime(cfg, arrays[:-1], names[:-1])
    with pytest.raises(TypeError, match="model.layers.0.input_layernorm.weight must be a numpy"):
        _C.LlamaRuntime(cfg, arrays[:3] + [None] + arrays[4:], names)
    with pytest.raises(TypeError, match="config head_dim must be an int, got 8.0"):
        _C.LlamaRuntime(cfg[:5] + (8.0,) + cfg[6:], arrays, names)


# ------------------------------------------------ 3. half-initialised runtime

def test_failed_init_leaves_no_usable_runtime(tiny):
    """A failing __init__ used to leave arrays stored and pointers unset:
    forward then segfaulted. Now every method raises."""
    cfg, arrays, names = runtime_args(tiny)
    rt = _C.LlamaRuntime.__new__(_C.LlamaRuntime)
    broken = list(arrays)
    broken[7] = np.zeros((3, 3), np.float32)  # wrong shape halfway through
    with pytest.raises(ValueError, match="must have shape"):
        rt.__init__(cfg, broken, names)
    with pytest.raises(RuntimeError, match="not initialised"):
        rt.forward([1, 2, 3], 0)
    with pytest.raises(RuntimeError, match="not initialised"):
        rt.set_weight(0, arrays[0])
    assert rt.n_cached == 0 and rt.arrays == []
    rt.__init__(cfg, arrays, names)  # the same object can still be set up
    np.testing.assert_array_equal(rt.forward([1, 2, 3], 0), tiny.logits([1, 2, 3]))
    with pytest.raises(RuntimeError, match="already initialised"):
        rt.__init__(cfg, arrays, names)


def test_runtime_keeps_its_own_lists(tiny):
    cfg, arrays, names = runtime_args(tiny)
    rt = _C.LlamaRuntime(cfg, arrays, names)
    want = rt.forward([5, 6], 0)
    arrays.clear()
    names.clear()
    np.testing.assert_array_equal(rt.forward([5, 6], 0), want)


class Mutating:
    """An array-like whose conversion empties the list that holds it."""

    def __init__(self, a: np.ndarray, victim: list) -> None:
        self.a, self.victim = a, victim

    def __array__(self, dtype=None, copy=None):
        self.victim.clear()
        return self.a


def test_pca_fit_survives_inputs_that_mutate_the_caller_list():
    """pca_fit borrowed the caller's list while converting its items, which
    can run Python code; emptying the list freed items still in use."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 8)).astype(np.float32)
    B = rng.standard_normal((20, 8)).astype(np.float32)
    want = _C.pca_fit([A, B], ["a", "b"], True, 0, 0, 0, 0.0)
    mats: list = []
    names = ["a", "b"]
    mats += [Mutating(A, mats), B, ]
    got = _C.pca_fit(mats, names, True, 0, 0, 0, 0.0)
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(g, w)
    names2: list = ["a", "b"]
    got = _C.pca_fit([Mutating(A, names2), B], names2, True, 0, 0, 0, 0.0)
    np.testing.assert_array_equal(got[0], want[0])


def test_pca_fit_names_must_be_str():
    A = np.ones((3, 2), np.float32)
    with pytest.raises(TypeError, match=r"names\[1\] must be a str"):
        _C.pca_fit([A, A], ["a", 3], True, 0, 0, 0, 0.0)
    with pytest.raises(TypeError, match="matrices must be a sequence"):
        _C.pca_fit(5, ["a"], True, 0, 0, 0, 0.0)


def test_c_runtime_bounds_max_batch_itself(tiny):
    """The C runtime caps max_batch at the context on its own (the model
    passes min(max_batch, n_ctx), but the runtime must not rely on it)."""
    cfg, arrays, names = runtime_args(tiny)
    rt = _C.LlamaRuntime(cfg, arrays, names, max_batch=2**63 - 1)
    np.testing.assert_array_equal(rt.forward(np.arange(30) % 64, 0),
                                  tiny.logits(np.arange(30) % 64))


# ---------------------------------------- 4. one model shared between threads

def test_generate_holds_the_model_between_decode_steps(tiny, monkeypatch):
    """Deterministic replay of the race: while generate() is between two
    decode steps, another thread calls logits() on the same model. Before,
    that call reset and overwrote the KV cache and the generation went on
    from someone else's context; now it waits for generate to finish."""
    prompt = [1, 5, 9, 13]
    want = tiny.generate_ids(prompt, max_new_tokens=12)
    other_tokens = [3] * 40
    other_want = tiny.logits(other_tokens)
    sample = LlamaModel._sample
    result = {}
    started = []

    def intruder():
        result["logits"] = tiny.logits(other_tokens)

    def sample_and_intrude(logits, temperature, top_p, rng):
        if not started:
            t = threading.Thread(target=intruder)
            started.append(t)
            t.start()
            t.join(timeout=0.5)  # before the fix it ran to the end right here
        return sample(logits, temperature, top_p, rng)

    monkeypatch.setattr(tiny, "_sample", sample_and_intrude)
    got = tiny.generate_ids(prompt, max_new_tokens=12)
    started[0].join(timeout=30)
    assert not started[0].is_alive()
    assert got == want
    np.testing.assert_array_equal(result["logits"], other_want)


def test_concurrent_generate_logits_set_weight_are_correct(tiny):
    """Threads hammering one model: every generation equals the
    single-threaded one, every logits call equals its reference, while a
    third thread swaps a weight back and forth (to the same values)."""
    prompts = [[1, 2, 3], [1, 7], [1, 30, 31, 32, 33]]
    want = {tuple(p): tiny.generate_ids(p, max_new_tokens=10) for p in prompts}
    toks = np.arange(1, 50) % 64
    want_logits = tiny.logits(toks)
    name = "model.layers.1.self_attn.k_proj.weight"
    same = tiny.weights[name].copy()
    errors: list[str] = []

    def gen():
        for i in range(60):
            p = prompts[i % len(prompts)]
            if tiny.generate_ids(p, max_new_tokens=10) != want[tuple(p)]:
                errors.append(f"generate {p}")

    def logit():
        for _ in range(60):
            if not np.array_equal(tiny.logits(toks), want_logits):
                errors.append("logits")

    def swap():
        for _ in range(60):
            tiny.set_weight(name, same.copy())

    ts = [threading.Thread(target=f) for f in (gen, gen, logit, swap)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts)
    assert errors == []


def test_kl_between_two_shared_models_in_both_orders_does_not_deadlock(tiny):
    other = LlamaModel(tiny.config, dict(tiny.weights))
    toks = np.arange(1, 60) % 64
    res = []

    def run(a, b):
        for _ in range(20):
            res.append(a.kl_divergence(b, toks, n_ctx=32))

    ts = [threading.Thread(target=run, args=(tiny, other)),
          threading.Thread(target=run, args=(other, tiny))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts)
    assert len(res) == 40 and all(kl == 0.0 and agree == 1.0 for kl, agree in res)
