"""Surgery one group at a time (the path a 7-8B bf16 model takes) and the
weights it works on: held as stored (bf16 bits, memory-mapped), never a
float32 copy of the model."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from test_surgery import model as stories  # noqa: F401  (the stories260K fixture)

from pcasurgery import LlamaModel
from pcasurgery.checkpoints import load_safetensors, mapped_page_sizes, smaps_sizes
from pcasurgery.dtypes import from_bf16_bits, to_bf16_bits
from pcasurgery.evaluate import Evaluator
from pcasurgery.export import write_safetensors
from pcasurgery.surgery import Surgery, proj_name


@pytest.fixture(scope="module")
def bf16_model(stories):  # noqa: F811
    """stories260K with its matrices rounded to bf16 and held as bits."""
    w = {n: stories.weights[n] for n in stories.weights}
    return LlamaModel(stories.config, w, stories.tokenizer, dtype="bfloat16")


def stored(m):
    return {n: m.stored_weight(n) for n in m.weights}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode,setting", [("shared-kv", {"var": 0.5}), ("separate", {"rank": 3}),
                                           ("seed", {"var": 0.3})])
def test_streaming_writes_what_the_kept_fits_write(stories, bf16_model, dtype, mode, setting):  # noqa: F811
    m = bf16_model if dtype == "bfloat16" else stories
    before = stored(m)
    # the same fit: only the components this setting needs
    kept = Surgery(m, mode, streaming=False).fit(keep=next(iter(setting.values())))
    st_kept = kept.apply(**setting)
    want = stored(m)
    kept.restore()
    s = Surgery(m, mode, streaming=True)
    assert s.fit() is s and s.fit_count == 0  # nothing is fitted ahead
    st = s.apply(**setting)
    assert st.ks == st_kept.ks and st.budget == st_kept.budget
    got = stored(m)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    assert s.fit_count == len(s.groups)
    assert all(g.pca is None and not g.scores for g in s.groups)  # nothing kept
    assert all(g.spectrum is not None for g in s.groups)
    s.restore()
    for n, a in stored(m).items():  # the very arrays the model held
        assert a is before[n], n
    s.apply(**setting)  # a second setting fits again
    assert s.fit_count == 2 * len(s.groups)
    s.restore()
    with pytest.raises(RuntimeError, match="streaming"):
        s.ks_for(**setting)
    with pytest.raises(ValueError, match="exceeds the 64 components of the largest group"):
        s.apply(rank=65)
    assert s.fit_count == 2 * len(s.groups)  # refused before any fit
    for bad in ({}, {"var": 0.5, "rank": 2}, {"rank": 0}, {"rank": True}):
        with pytest.raises(ValueError, match="var|rank"):
            s.apply(**bad)


def test_streaming_is_chosen_when_the_fits_are_big(stories, monkeypatch):  # noqa: F811
    import pcasurgery.surgery as surgery

    s = Surgery(stories, "shared-kv")
    assert not s.streaming and 0 < s.fit_bytes()
    monkeypatch.setattr(surgery, "STREAMING_BYTES", s.fit_bytes() - 1)
    assert Surgery(stories, "shared-kv").streaming
    assert not Surgery(stories, "shared-kv", streaming=False).streaming


def test_streaming_error_restores_the_model(bf16_model, monkeypatch):
    before = stored(bf16_model)
    s = Surgery(bf16_model, "shared-kv", streaming=True)
    calls = []
    real = s._write

    def failing(g, pca, scores, k):
        calls.append(g.label)
        if len(calls) == 3:
            raise MemoryError("out of memory in the third group")
        real(g, pca, scores, k)

    monkeypatch.setattr(s, "_write", failing)
    with pytest.raises(MemoryError):
        s.apply(var=0.5)
    for n, a in stored(bf16_model).items():
        assert a is before[n], n


def test_bf16_surgery_keeps_one_group_in_float32(bf16_model):
    """Streaming on a bf16 model: the float32 memory at any time is one
    group's (its widened matrices and fit), not every group's fit."""
    peaks = {}
    for streaming in (False, True):
        s = Surgery(bf16_model, "separate", proj="q,k,v", streaming=streaming)
        tracemalloc.start()
        try:
            s.fit().apply(var=0.9)
            _, peaks[streaming] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            s.restore()
    c = bf16_model.config
    one_group = 5 * c.hidden_size * c.hidden_size * 4  # matrix, components, scores, R, bf16 R
    assert peaks[True] < 2 * one_group + (64 << 10)
    assert peaks[True] < peaks[False] / 2  # both hold the bf16 reconstructions written
    assert peaks[False] > s.fit_bytes()


def test_bf16_weights_are_shared_not_copied(bf16_model):
    n = proj_name(0, "k")
    other = LlamaModel(bf16_model.config, bf16_model.weights)
    assert other.dtype == "bfloat16"
    assert other.stored_weight(n) is bf16_model.stored_weight(n)
    assert bf16_model.stored_weight(n).dtype == np.uint16
    np.testing.assert_array_equal(bf16_model.weights[n], from_bf16_bits(bf16_model.stored_weight(n)))
    with pytest.raises(KeyError, match="no weight named"):
        bf16_model.stored_weight("nope")


def test_set_weight_takes_bf16_bits(stories, bf16_model):  # noqa: F811
    n = proj_name(1, "v")
    bits = bf16_model.stored_weight(n)
    m32 = LlamaModel(stories.config, stories.weights)  # shares, then one weight is replaced
    m32.set_weight(n, bits)
    assert m32.stored_weight(n).dtype == np.float32
    np.testing.assert_array_equal(m32.stored_weight(n), from_bf16_bits(bits))
    copy = bits.copy()
    bf16_model.set_weight(n, copy)
    assert bf16_model.stored_weight(n) is copy  # kept as it is, not rounded again
    bf16_model.set_weight(n, bits)
    bad = copy.copy()
    bad[0, 0] = 0x7FC0  # a bf16 NaN
    with pytest.raises(ValueError, match="NaN or Inf"):
        bf16_model.set_weight(n, bad)
    with pytest.raises(ValueError, match="must keep its shape"):
        bf16_model.set_weight(n, bits[:1])


def test_streaming_evaluation_equals_kept(bf16_model):
    tokens = np.random.default_rng(0).integers(3, bf16_model.config.vocab_size, 200)
    ev = Evaluator(bf16_model, tokens=tokens, n_ctx=128)
    out = []
    for streaming in (False, True):
        s = Surgery(bf16_model, "shared-kv", proj="k,v", streaming=streaming).fit(keep=0.4)
        s.apply(var=0.4)
        out.append(ev.evaluate().kl)
        s.restore()
    assert out[0] == out[1] > 0
    assert ev.evaluate().kl == 0.0


def test_write_safetensors_one_tensor_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = to_bf16_bits(rng.standard_normal((4, 2)).astype(np.float32))
    made = []

    def make_b():
        made.append("b")
        return b

    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": a, "b": make_b}, "BF16", shapes={"b": (4, 2)})
    assert made == ["b"]
    got = load_safetensors(p, bf16=frozenset({"a", "b"}))
    np.testing.assert_array_equal(got["b"], b)  # bits written as they are
    np.testing.assert_array_equal(got["a"], to_bf16_bits(a))
    write_safetensors(p, {"b": b}, "F32")
    np.testing.assert_array_equal(load_safetensors(p)["b"], from_bf16_bits(b))
    with pytest.raises(ValueError, match="shapes must give the shape of b"):
        write_safetensors(p, {"b": make_b}, "BF16")
    with pytest.raises(ValueError, match=r"b has shape \(4, 2\), expected \(2, 4\)"):
        write_safetensors(tmp_path / "y.safetensors", {"b": make_b}, "BF16", shapes={"b": (2, 4)})


def test_window_scores_equal_the_whole_window_formulas():
    """The row-chunked scores (no (T, V) float64 temporaries) equal
    window_nll / window_kl_agree on whole windows, across chunk edges."""
    from pcasurgery.evaluate import ROWS, log_softmax, window_kl_agree, window_nll, window_scores

    rng = np.random.default_rng(0)
    for T in (1, ROWS - 1, ROWS, ROWS + 1, 2 * ROWS + 7):
        logits = (3 * rng.standard_normal((T, 50))).astype(np.float32)
        ref_logits = logits + rng.standard_normal((T, 50)).astype(np.float32)
        ref = log_softmax(ref_logits)
        win = rng.integers(0, 50, T)
        nll, kl, agree = window_scores(logits, win, ref_logits)
        whole = log_softmax(logits)
        assert nll == pytest.approx(window_nll(whole, win), rel=1e-12, abs=1e-12)
        k, a = window_kl_agree(ref, whole)
        assert kl == pytest.approx(k, rel=1e-12) and agree == a
        assert window_scores(logits, win)[1:] == (0.0, 0)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_release_mapped_drops_a_replaced_tensor_from_rss(tmp_path):
    from pcasurgery.checkpoints import release_mapped

    def rss() -> int:
        import mmap

        return int(open("/proc/self/statm").read().split()[1]) * mmap.PAGESIZE

    big = to_bf16_bits(np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32))
    p = tmp_path / "w.safetensors"
    write_safetensors(p, {"small": np.ones((3, 3), np.float32), "w": big}, "BF16")
    del big
    t = load_safetensors(p, bf16=frozenset({"w", "small"}))
    want = int(t["w"].astype(np.int64).sum())  # every page read: resident
    before = rss()
    assert release_mapped(t["w"])
    assert before - rss() > 0.9 * t["w"].nbytes  # 16 MB left the resident set
    assert int(t["w"].astype(np.int64).sum()) == want  # and read back from the file
    assert not release_mapped(np.ones(3))  # not memory-mapped: nothing to do


SMAPS = """\
7f0000000000-7f0000400000 r--s 00000000 fd:00 123                        /m/a.safetensors
Size:               4096 kB
Rss:                4096 kB
FilePmdMapped:      2048 kB
VmFlags: rd sh mr mw me ms hg
7f0000400000-7f0000600000 r--s 00400000 fd:00 123                        /m/a.safetensors
Size:               2048 kB
Rss:                 100 kB
FilePmdMapped:         0 kB
7f1000000000-7f1000200000 rw-p 00000000 00:00 0
Rss:                2048 kB
AnonHugePages:      2048 kB
FilePmdMapped:      2048 kB
"""


def test_smaps_sizes_sums_the_mappings_that_overlap_the_spans():
    lo = 0x7F0000000000
    assert smaps_sizes(SMAPS, [(lo, lo + 0x500000)]) == (2048 << 10, 4196 << 10)
    assert smaps_sizes(SMAPS, [(lo + 0x400000, lo + 0x400001)]) == (0, 100 << 10)
    assert smaps_sizes(SMAPS, [(lo + 0x10, lo + 0x20), (0x7F1000000000, 0x7F1000000001)]) == (
        4096 << 10, 6144 << 10)
    assert smaps_sizes(SMAPS, [(lo + 0x600000, lo + 0x700000)]) == (0, 0)  # touches none
    assert smaps_sizes(SMAPS, []) == (0, 0)


def _file_system(path) -> str:
    """The type of the file system holding path (/proc/mounts' longest match)."""
    import os

    best, kind = "", ""
    path = os.path.realpath(path)
    for line in open("/proc/mounts"):
        _, mnt, fs = line.split()[:3]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, fs
    return kind


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_mapped_page_sizes_counts_a_mapped_tensor_read_afresh(tmp_path):
    import os
    import platform

    big = np.random.default_rng(1).integers(0x3000, 0x3F00, (8192, 4096), dtype=np.uint16)  # 64 MiB
    p = tmp_path / "w.safetensors"
    write_safetensors(p, {"w": big}, "BF16")
    fd = os.open(p, os.O_RDONLY)  # as a file read afresh (after a reboot): out of the page cache
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    t = load_safetensors(p, bf16=frozenset({"w"}))  # its NaN scan reads every page
    assert np.array_equal(t["w"], big)
    huge, rss = mapped_page_sizes([t["w"]])
    size = p.stat().st_size
    assert big.nbytes <= rss <= size + 4096 and 0 <= huge <= rss and huge % (2 << 20) == 0
    assert mapped_page_sizes([t["w"].copy(), np.ones(3)]) == (0, 0)  # nothing mapped
    # 2 MiB folios for a file read afresh: Linux >= 6.16 on ext4, or xfs; and THP on
    release = tuple(int(v) for v in platform.release().split(".")[:2] if v.isdigit())
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "[never]"
    fs = _file_system(tmp_path)
    if "[never]" in thp or not (fs == "xfs" or (fs == "ext4" and release >= (6, 16))):
        pytest.skip(f"Linux {platform.release()}, {fs}: a file read afresh may be cached in 4 KiB "
                    "pages")
    # 60 of 64 MiB here; 32 when reading the header let readahead cache the tensor in small folios
    assert huge >= 0.75 * rss, (huge, rss)
