"""The embedded demo model (pcasurgery/models/demo): TinyLlama's layout and
proportions, its held-out numbers, the default-model resolution, and the
run a new user gets on a fresh machine with no data and no network."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from conftest import ROOT, SHARED, cli

from pcasurgery import LlamaModel
from pcasurgery.checkpoints import read_safetensors_header
from pcasurgery.config import weight_names
from pcasurgery.lookup import DEFAULT_MODEL_ID, DEMO_MODEL_DIR, resolve_auto

DEMO = DEMO_MODEL_DIR
AUSTEN = SHARED / "data" / "austen"
HELD_OUT = AUSTEN / "persuasion.txt"
need_austen = pytest.mark.skipif(not HELD_OUT.is_file(), reason=f"{HELD_OUT} not found")


@pytest.fixture(scope="module")
def demo() -> LlamaModel:
    return LlamaModel.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def heldout(demo) -> list[int]:
    """persuasion.txt's first 20,000 tokens (without BOS)."""
    return demo.tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"), bos=False)[:20000]


def test_folder_has_tinyllamas_layout_and_proportions(demo):
    assert sorted(p.name for p in DEMO.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
        "tokenizer_config.json"]
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_attention_heads"] == 8 * cfg["num_key_value_heads"]
    assert 2.6 <= cfg["intermediate_size"] / cfg["hidden_size"] <= 2.9
    assert cfg["tie_word_embeddings"] is False and cfg["rope_scaling"] is None
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["torch_dtype"]) == (1e-5, 1e4, "bfloat16")
    header, _ = read_safetensors_header(DEMO / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(tensors) == set(weight_names(demo.config))
    assert {v["dtype"] for v in tensors.values()} == {"BF16"}
    size = (DEMO / "model.safetensors").stat().st_size + (DEMO / "tokenizer.model").stat().st_size
    assert size <= 5_000_000, size
    # SentencePiece BPE with byte fallback, TinyLlama's special tokens
    tok, sp = demo.tokenizer, demo.tokenizer.sp
    assert 2048 <= tok.vocab_size == cfg["vocab_size"] <= 4096
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sum(sp.is_byte(i) for i in range(tok.vocab_size)) == 256
    ids = [i for i in tok.encode("東", bos=False) if sp.id_to_piece(i) != "▁"]
    assert [sp.id_to_piece(i) for i in ids] == ["<0xE6>", "<0x9D>", "<0xB1>"]
    assert tok.decode(tok.encode("Zoë's café — 東京 🎉!\n\tyes", bos=False)) == \
        "Zoë's café — 東京 🎉!\n\tyes"


@need_austen
def test_transformers_loads_it_and_its_logits_match_ours(demo, heldout):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_fixtures import assert_logits_close, hf_logits
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    ref = LlamaForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    passage = [1] + heldout[1000:1000 + demo.n_ctx - 1]  # a full 512-token window
    want = hf_logits(ref, passage)
    assert_logits_close(demo.logits(passage), want)
    demo._rt.reset()  # and token by token through the KV cache
    steps = np.vstack([demo._rt.forward(np.array([t]), i, False)
                       for i, t in enumerate(passage[:64])])
    assert_logits_close(steps, want[:64])


@need_austen
def test_heldout_perplexity_beats_unigram_and_is_the_readmes(demo, heldout, report):
    ppl, n = demo.perplexity(heldout, n_ctx=512)
    assert n == 20000
    counts = np.ones(demo.config.vocab_size)  # add-one unigram of the training novels
    for f in sorted(AUSTEN.glob("*.txt")):
        if f.name != HELD_OUT.name:
            np.add.at(counts, demo.tokenizer.encode(f.read_text(encoding="utf-8"), bos=False), 1)
    unigram = float(np.exp(-np.mean(np.log(counts[heldout] / counts.sum()))))
    report(f"demo model, held-out perplexity on persuasion.txt (first {n} tokens, n_ctx 512): "
           f"{ppl:.2f}; add-one unigram of the training novels: {unigram:.2f} "
           f"({unigram / ppl:.1f}x higher)")
    assert ppl < unigram / 3
    assert f"{ppl:.1f}" in (ROOT / "README.md").read_text(), "README's held-out perplexity"


def test_auto_is_tinyllama_from_the_cache_else_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path, which = resolve_auto()
    assert path == DEMO and "demo model" in which and DEFAULT_MODEL_ID in which
    assert LlamaModel.from_pretrained("auto").source == str(DEMO)
    snap = fake_tinyllama_in_cache(tmp_path / "hub")
    path, which = resolve_auto()
    assert path == snap and which.startswith(f"{DEFAULT_MODEL_ID} from the Hugging Face cache")
    assert LlamaModel.from_pretrained("auto").source == str(snap)
    assert LlamaModel.from_pretrained("demo").source == str(DEMO)


def fake_tinyllama_in_cache(hub):
    """A snapshot under TinyLlama's id (the demo's files: the resolution, not
    the weights, is under test)."""
    repo = hub / ("models--" + DEFAULT_MODEL_ID.replace("/", "--"))
    snap = repo / "snapshots" / "0123abc"
    shutil.copytree(DEMO, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    return snap


def fresh_user_cli(tmp_path, *args, hub=None):
    """python -m pcasurgery as a new user runs it: outside the source tree, no
    ../shared, an empty Hugging Face cache, no network."""
    t0 = time.perf_counter()
    r = cli(*args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1",
                                      "HF_HUB_CACHE": str(hub or tmp_path / "empty-hub"),
                                      "PCASURGERY_SHARED": str(tmp_path / "no-shared")})
    return r, time.perf_counter() - t0


def test_default_run_on_a_fresh_machine_uses_the_demo(tmp_path, report):
    r, seconds = fresh_user_cli(tmp_path, "--var", "0.3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("model: pcasurgery's embedded demo model")
    assert "choose another with --model" in lines[0]
    head = next(i for i, s in enumerate(lines) if s.startswith("mode "))
    assert lines[head + 2].startswith("shared-kv") and "var 0.3" in lines[head + 2]
    assert any(s.startswith("before: '") for s in lines)
    assert any(s.startswith("after (shared-kv, var 0.3): '") for s in lines)
    report(f"fresh-machine default run (python -m pcasurgery --var 0.3 on the demo model): "
           f"{seconds:.1f} s wall (target < 30 s on 2 cores)")


def test_default_run_names_tinyllama_when_cached(tmp_path):
    fake_tinyllama_in_cache(tmp_path / "hub")
    r, _ = fresh_user_cli(tmp_path, "--var", "0.3", "--max-new-tokens", "0",
                          "--eval-tokens", "64", hub=tmp_path / "hub")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"model: {DEFAULT_MODEL_ID} from the Hugging Face cache")


@pytest.mark.slow
@need_austen
def test_training_script_is_deterministic(tmp_path):
    """The recipe, shortened (a narrower model, 30 steps): the same seed
    gives the same loss and the same bytes; the full run's reproduction is
    recorded in benchmarks/RESULTS.md."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")

    def train(name: str) -> dict:
        out = tmp_path / name
        cmd = [sys.executable, str(ROOT / "tools" / "train_demo_model.py"), "--data", str(AUSTEN),
               "--out", str(out / "model"), "--log-dir", str(out), "--summary",
               str(out / "summary.json"), "--vocab", "2048", "--hidden", "32", "--layers", "2",
               "--steps", "30", "--batch", "4", "--warmup", "5", "--lr", "1e-2",
               "--eval-every", "10", "--seed", "3", "--device", "cpu"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return json.loads((out / "summary.json").read_text())

    a, b = train("a"), train("b")
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=0.01)
    assert a["final_train_loss"] < 7.0  # it learnt something (ln 2048 = 7.6)
    for f in ("model.safetensors", "tokenizer.model", "config.json"):  # no paths, no stamps
        assert (tmp_path / "a" / "model" / f).read_bytes() == (tmp_path / "b" / "model" / f).read_bytes()
    for f in ("loss_curve.png", "train_log.txt"):
        assert (tmp_path / "a" / f).is_file()
    # the script's held-out number (PyTorch, float32 on the bf16 weights) is ours
    m = LlamaModel.from_pretrained(tmp_path / "a" / "model")
    ids = m.tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"), bos=False)[:20000]
    assert m.perplexity(ids, n_ctx=512)[0] == pytest.approx(a["heldout_ppl"], rel=1e-4)


@pytest.mark.slow
def test_wheel_ships_the_demo_and_stays_under_10_mb(tmp_path, report):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", ".*"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pcasurgery-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in DEMO.iterdir():
        assert f"pcasurgery/models/demo/{f.name}" in names
    size = wheel.stat().st_size
    report(f"wheel: {wheel.name}, {size / 1e6:.2f} MB (limit 10 MB)")
    assert size < 10_000_000
