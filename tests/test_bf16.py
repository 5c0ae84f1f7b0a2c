"""bf16-resident weights: the matrices stay bf16 (uint16 bits, memory-mapped
from the checkpoint), the kernels widen them exactly and compute in float32,
so the model equals transformers running the bf16-rounded weights in
float32."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_fixtures import assert_logits_close, hf_logits, make_hf_model, save_hf  # noqa: E402

import pcasurgery  # noqa: E402
from pcasurgery import _C, LlamaModel  # noqa: E402
from pcasurgery.dtypes import from_bf16_bits, to_bf16_bits  # noqa: E402

torch.set_num_threads(2)
CFG = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
           num_key_value_heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    m = make_hf_model(CFG, seed=3)
    return {dt: save_hf(m, tmp_path_factory.mktemp(dt), dt, False) for dt in ("f32", "bf16")}


def test_float32_checkpoint_held_in_bf16_equals_transformers_on_rounded_weights(folders):
    """The acceptance reference: transformers in float32 on the bf16-rounded
    weights (norms and biases stay float32 on both sides)."""
    ref = transformers.LlamaForCausalLM.from_pretrained(folders["f32"], dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ours = LlamaModel.from_pretrained(folders["f32"], dtype="bfloat16")
    assert ours.dtype == "bfloat16"
    tokens = np.random.default_rng(0).integers(3, 300, 80)
    want = hf_logits(ref, tokens)
    assert_logits_close(ours.logits(tokens), want)
    ours._rt.reset()
    rows = [ours._rt.forward(tokens[:16], 0, True)]
    rows += [ours._rt.forward(np.array([t]), 16 + i, False) for i, t in enumerate(tokens[16:-1])]
    assert_logits_close(np.vstack(rows), want[:-1])


def test_bf16_checkpoint_is_memory_mapped_and_equals_the_float32_run(folders):
    m16 = LlamaModel.from_pretrained(folders["bf16"])  # the default: its own dtype
    m32 = LlamaModel.from_pretrained(folders["bf16"], dtype="float32")
    assert (m16.dtype, m32.dtype) == ("bfloat16", "float32")
    a = m16._weights["model.layers.0.mlp.up_proj.weight"]
    assert a.dtype == np.uint16 and not a.flags.owndata and not a.flags.writeable
    base = a
    while isinstance(base, np.ndarray):  # the array views the file's mapping: no copy
        base = base.base
    assert isinstance(base, memoryview) and type(base.obj).__name__ == "mmap"
    assert m16._weights["model.norm.weight"].dtype == np.float32
    np.testing.assert_array_equal(m16.weights["model.layers.0.mlp.up_proj.weight"],
                                  m32.weights["model.layers.0.mlp.up_proj.weight"])
    tokens = np.arange(3, 60)
    assert_logits_close(m16.logits(tokens), m32.logits(tokens))


def test_no_mmap_copies_the_bf16_bits_and_computes_the_same(folders):
    """mmap=False: every bf16 matrix is the process's own array (no view of
    the file), bit for bit the mapped one, and the logits are identical."""
    mapped = LlamaModel.from_pretrained(folders["bf16"])
    owned = LlamaModel.from_pretrained(folders["bf16"], mmap=False)
    assert owned.dtype == "bfloat16"
    for name, a in mapped._weights.items():
        b = owned._weights[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(a, b)
        if a.dtype == np.uint16:
            assert not a.flags.owndata and b.flags.owndata, name
    tokens = np.arange(3, 60)
    np.testing.assert_array_equal(owned.logits(tokens), mapped.logits(tokens))
    with pytest.raises(TypeError, match="mmap must be True or False"):
        LlamaModel.from_pretrained(folders["bf16"], mmap="no")


def test_decode_is_the_same_on_one_and_two_threads(folders):
    """Rows are split over threads, each row's sum in one order: identical.
    (Prefill is not: OpenBLAS's sgemm rounds a block of rows differently
    from the whole, so both runs prefill on one thread.)"""
    m = LlamaModel.from_pretrained(folders["bf16"])
    old = pcasurgery.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            pcasurgery.set_num_threads(1)
            m._rt.reset()
            m._rt.forward(np.arange(3, 20), 0, False)
            pcasurgery.set_num_threads(n)
            out.append(m._rt.forward(np.array([7]), 17, False))
        np.testing.assert_array_equal(out[0], out[1])
    finally:
        pcasurgery.set_num_threads(old)


def test_set_weight_rounds_to_bf16(folders):
    m = LlamaModel.from_pretrained(folders["bf16"])
    name = "model.layers.1.self_attn.k_proj.weight"
    new = np.random.default_rng(1).standard_normal(m.weights[name].shape).astype(np.float32)
    m.set_weight(name, new)
    assert m._weights[name].dtype == np.uint16
    np.testing.assert_array_equal(m.weights[name], from_bf16_bits(to_bf16_bits(new)))
    big = np.full(m.weights[name].shape, 3.4e38, np.float32)  # rounds past bf16's largest
    with pytest.raises(ValueError, match="overflows bfloat16"):
        m.set_weight(name, big)


def test_rounding_is_round_to_nearest_even_as_torch():
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32) * 1e3
    x[:4] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, np.inf]  # ties both ways, -0, inf
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16_bits(x), want)


def test_nonfinite_bf16_tensor_is_refused_naming_it(folders, tmp_path):
    import shutil

    from pcasurgery.checkpoints import read_safetensors_header

    d = tmp_path / "nan"
    shutil.copytree(folders["bf16"], d)
    st = d / "model.safetensors"
    header, start = read_safetensors_header(st)
    e = header["model.layers.1.mlp.down_proj.weight"]
    raw = bytearray(st.read_bytes())
    at = start + e["begin"] + 2 * 123
    raw[at:at + 2] = b"\xc0\x7f"  # a bf16 NaN at flat index 123
    st.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' "
                                         r"contains NaN or Inf \(first at flat index 123"):
        LlamaModel.from_pretrained(d)
    assert _C.bf16_nonfinite(np.array([0, 0x7F80, 0x7FC0], np.uint16)) == 1
    assert _C.bf16_nonfinite(np.array([0x7F7F, 0xFF7F], np.uint16)) == -1


def test_bf16_surgery_saves_bf16_that_transformers_loads(folders, tmp_path):
    from pcasurgery.export import save_hf_folder
    from pcasurgery.surgery import Surgery

    m = LlamaModel.from_pretrained(folders["bf16"])
    Surgery(m, "shared-kv", "k,v").fit().apply(rank=24)
    out = save_hf_folder(m, tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert_logits_close(m.logits(np.arange(3, 40)), hf_logits(ref, np.arange(3, 40)))


def test_cli_dtype(folders, tmp_path):
    from conftest import cli

    r = cli("--model", folders["bf16"], "--dtype", "float16")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--dtype" in r.stderr and "bfloat16" in r.stderr
    r = cli("--model", folders["bf16"], "--mmap=yes")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--mmap" in r.stderr
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path / "bf16"  # with a tokenizer, which the CLI needs
    shutil.copytree(folders["bf16"], folder)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    for flag, held in (("--mmap", "memory-mapped"), ("--no-mmap", "copied into memory")):
        r = cli("--model", folder, flag, "--var", "0.5", "--max-new-tokens", "0")
        assert r.returncode == 0, r.stderr
        assert f"weights in bfloat16, {held}" in r.stdout and "rounded to bf16)" in r.stdout
        if flag == "--mmap" and os.path.exists("/proc/self/smaps"):  # how it is mapped
            assert re.search(r"memory-mapped, [0-9.]+ of [0-9.]+ GB in 2 MiB pages", r.stdout)


def test_load_line_says_how_the_mapped_weights_are_paged(folders, monkeypatch):
    from pcasurgery import __main__ as cli_main
    from pcasurgery import checkpoints

    mapped = LlamaModel.from_pretrained(folders["bf16"], dtype="bfloat16")
    copied = LlamaModel.from_pretrained(folders["bf16"], dtype="bfloat16", mmap=False)
    assert cli_main.held(copied) == "copied into memory"
    sizes = {}
    monkeypatch.setattr(checkpoints, "mapped_page_sizes", lambda arrays: sizes["v"])
    sizes["v"] = (2 << 30, 2 << 30)  # all of it in 2 MiB pages
    assert cli_main.held(mapped) == "memory-mapped, 2.15 of 2.15 GB in 2 MiB pages"
    sizes["v"] = (0, 2 << 30)  # a file just written: cached in small pieces
    assert cli_main.held(mapped) == "memory-mapped, 0.00 of 2.15 GB in 2 MiB pages"
    sizes["v"] = (0, 0)  # no /proc/self/smaps
    assert cli_main.held(mapped) == "memory-mapped"


KERNEL_RUN = """
import sys, numpy as np, pcasurgery
from pcasurgery import _C, LlamaModel
m = LlamaModel.from_pretrained(sys.argv[1])
tokens = np.random.default_rng(0).integers(3, 300, 40)
m._rt.reset()
rows = [m._rt.forward(tokens[:1], 0, True)]
rows += [m._rt.forward(np.array([t]), 1 + i, False) for i, t in enumerate(tokens[1:-1])]
np.save(sys.argv[2], np.vstack(rows))
m._rt.reset()
np.save(sys.argv[3], m._rt.forward(tokens[:-1], 0, True))  # one prefill chunk
print(_C.bf16_prefill(), _C.bf16_kernel())
"""


@pytest.mark.parametrize("kernel", ["generic", "avx2+fma", ""])
def test_every_decode_kernel_equals_transformers(folders, tmp_path, kernel):
    """Each matrix-vector kernel this CPU has (PCASURGERY_BF16_KERNEL picks a
    narrower one), in decode: K/V and row counts that are not multiples of 4
    rows or of the 8/16-lane steps reach every tail of the kernels (hidden
    96, intermediate 200, kv_dim 32, vocab 300). And the prefill product
    that goes with it (gemm.c's where the CPU has AVX-512F; the widening +
    sgemm path with a narrower kernel), on a 39-token chunk."""
    import subprocess
    import sys

    env = dict(os.environ, PCASURGERY_BF16_KERNEL=kernel)
    # cwd: not the repository root, whose pcasurgery/ has no built extension in CI
    p = subprocess.run([sys.executable, "-c", KERNEL_RUN, str(folders["bf16"]),
                        str(tmp_path / "l.npy"), str(tmp_path / "p.npy")], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    prefill, out = p.stdout.split()[-2:]
    if kernel:
        if out != kernel:
            pytest.skip(f"this CPU has no {kernel} (got {out})")
    else:
        assert out == _C.bf16_kernel()
    ref = transformers.LlamaForCausalLM.from_pretrained(folders["bf16"], dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(3, 300, 40)
    want = hf_logits(ref, tokens)[:-1]
    assert_logits_close(np.load(tmp_path / "l.npy"), want)
    assert_logits_close(np.load(tmp_path / "p.npy"), want)
    assert prefill == (_C.bf16_prefill() if kernel == "" else "sgemm")


def _gemm_case(T, K, n, seed=0, ldx_pad=0):
    rng = np.random.default_rng(seed)
    xw = rng.standard_normal((T, K + ldx_pad)).astype(np.float32)
    W = to_bf16_bits(rng.standard_normal((n, K)).astype(np.float32))
    return xw[:, :K], W


@pytest.fixture
def prefill_paths():
    """The prefill paths of bf16 weights this CPU has: the widening + sgemm
    one, and gemm.c's (AVX-512F); the default is restored afterwards."""
    paths = ["sgemm"] + (["auto"] if _C.bf16_prefill("auto") != "sgemm" else [])
    yield paths
    _C.bf16_prefill("auto")


# T: one token, a part tile, tiles of 8; K: < 8, one 8-step tail, past
# gemm.c's KC = 512 with a tail; n: 1, partial 16-column groups, whole and
# partial 48-column panels, several of them
@pytest.mark.parametrize("T,K,n", [(1, 5, 1), (7, 96, 104), (8, 200, 48), (13, 515, 49),
                                   (150, 1100, 203), (9, 1030, 17), (64, 64, 97)])
def test_prefill_product_equals_float64_on_every_edge(prefill_paths, T, K, n):
    x, W = _gemm_case(T, K, n, ldx_pad=3)  # x's rows strided
    ref = x.astype(np.float64) @ from_bf16_bits(W).astype(np.float64).T
    for path in prefill_paths:
        _C.bf16_prefill(path)
        for threads in (1, 2, 3):
            out = np.full((T, n), np.nan, np.float32)  # beta = 0: nothing of out is read
            _C.matmul_bf16(out, x, W, 0.0, threads)
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (path, threads, err)


def test_prefill_gemm_is_the_same_on_any_thread_count_and_token_chunk(prefill_paths):
    """Each output is one sum in one order whatever the split: the same bits
    on 1-3 threads (each packing its share of x's tiles into one shared
    copy) and when the scratch holds only 72 tokens at a time on 2 and 3
    threads (a panel of W, 48 x K, per thread, then the shared x: W packed
    again for each chunk; 64 is the least gemm.c is used with, and the sgemm
    path's sums differ in their last bits)."""
    if len(prefill_paths) < 2:
        pytest.skip("this CPU has no AVX-512F: gemm.c's product is not used")
    x, W = _gemm_case(150, 1100, 203, seed=1)
    _C.bf16_prefill("sgemm")
    ref = np.empty((150, 203), np.float32)
    _C.matmul_bf16(ref, x, W, 0.0, 2)
    for path in prefill_paths[1:]:
        assert _C.bf16_prefill(path) == "avx512f"
        outs = []
        for threads, scratch in ((1, 0), (2, 0), (3, 0), (2, (48 + 36) * 1100),
                                 (3, (48 + 24) * 1100)):
            out = np.empty((150, 203), np.float32)
            _C.matmul_bf16(out, x, W, 0.0, threads, scratch)
            outs.append(out)
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        np.testing.assert_allclose(outs[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        assert not np.array_equal(outs[0], ref)  # not the sgemm path's sums


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_prefill_product_adds_beta_out_and_writes_only_its_columns(prefill_paths, beta):
    x, W = _gemm_case(21, 530, 53, seed=2)
    prod = x.astype(np.float64) @ from_bf16_bits(W).astype(np.float64).T
    for path in prefill_paths:
        _C.bf16_prefill(path)
        wide = np.random.default_rng(3).standard_normal((21, 60)).astype(np.float32)
        before = wide.copy()
        out = wide[:, 4:57]  # row stride 60
        _C.matmul_bf16(out, x, W, beta, 2)
        np.testing.assert_array_equal(wide[:, :4], before[:, :4])
        np.testing.assert_array_equal(wide[:, 57:], before[:, 57:])
        want = beta * before[:, 4:57].astype(np.float64) + prod
        assert np.abs(out - want).max() < 1e-5 * np.abs(want).max(), path


def test_prefill_product_bad_input_is_named():
    x, W = _gemm_case(4, 16, 8)
    with pytest.raises(ValueError, match="bf16_prefill: name must be 'sgemm' or 'auto'"):
        _C.bf16_prefill("fast")
    with pytest.raises(ValueError, match=r"W \(8, 16\)"):
        _C.matmul_bf16(np.empty((4, 9), np.float32), x, W, 0.0, 1)
    with pytest.raises(TypeError, match="W must be a 2-D uint16"):
        _C.matmul_bf16(np.empty((4, 8), np.float32), x, W.astype(np.int32), 0.0, 1)
    with pytest.raises(TypeError, match="out must be a writable"):
        ro = np.empty((4, 8), np.float32)
        ro.flags.writeable = False
        _C.matmul_bf16(ro, x, W, 0.0, 1)
    with pytest.raises(ValueError, match="n_threads must be"):
        _C.matmul_bf16(np.empty((4, 8), np.float32), x, W, 0.0, 0)
