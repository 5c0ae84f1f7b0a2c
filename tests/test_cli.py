"""python -m pcasurgery end to end on stories260K, as a user would run it."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import SHARED, cli

MODEL = SHARED / "models" / "stories260K.bin"
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not found")




def test_default_run_prints_model_table_and_samples():
    r = cli("--model", MODEL, "--var", "0.3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"model: {MODEL}")
    assert "eval text: 511 tokens sampled from the unmodified model (seed 0), windows of 512" in out
    assert "shared-kv" in out and "var 0.3" in out
    assert "before: " in out and "after (shared-kv, var 0.3): " in out


def test_sweep_with_out_writes_json_csv_and_plots(tmp_path):
    out = tmp_path / "res"
    r = cli("--model", MODEL, "--sweep", "0.99,0.9,0.5", "--mode", "separate,shared-kv",
            "--out", out, "--max-new-tokens", "0")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert [(row["mode"], row["var"]) for row in res["rows"]] == [
        (m, v) for m in ("separate", "shared-kv") for v in (0.99, 0.9, 0.5)]
    for row in res["rows"]:
        assert row["kl"] >= 0 and 0 <= row["top1"] <= 1 and row["perplexity"] > 1
        assert len(row["components"]["q"]) == 5
    # var thresholds give each mode its own sizes: nothing is interpolated
    assert any("exactly equal KV-cache size" in s for s in res["summary"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and float(rows[0]["kv_ratio"]) > 0
    import matplotlib.image as mpimg
    for name in ("quality_vs_threshold", "quality_vs_budget", "components_per_layer", "spectra"):
        img = mpimg.imread(out / f"{name}.png")
        assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.01  # not blank
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_json_flag_prints_parseable_results():
    r = cli("--model", MODEL, "--rank", "4", "--json", "--max-new-tokens", "0")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rows"][0]["rank"] == 4 and res["rows"][0]["components_max"] == 4


def test_save_loads_in_transformers_and_pcasurgery(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from pcasurgery import LlamaModel
    from pcasurgery.surgery import Surgery

    out = tmp_path / "surgered"
    r = cli("--model", MODEL, "--var", "0.9", "--save", out, "--max-new-tokens", "0")
    assert r.returncode == 0, r.stderr
    ours = LlamaModel.from_pretrained(out)
    ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # the same surgery done in-process gives the same weights: the run's own
    # fits (components computed up to the setting), the ones its table measured
    direct = LlamaModel.from_pretrained(MODEL)
    Surgery(direct, "shared-kv").fit(keep=0.9).apply(var=0.9)
    tokens = direct.tokenizer.encode("Once upon a time, there was a cat.")
    want = direct.logits(tokens)
    np.testing.assert_array_equal(ours.logits(tokens), want)
    with torch.no_grad():
        got = ref(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("args,msg", [
    (["--var", "0"], "expected a number in (0, 1]"),
    (["--var", "1.5"], "expected a number in (0, 1]"),
    (["--var", "abc"], "expected a number in (0, 1], got 'abc'"),
    (["--rank", "0"], "expected a positive integer"),
    (["--mode", "shared-qk"], "--mode must be among"),
    (["--sweep", "0.9", "--save", "x"], "--save needs one mode and one setting"),
])
def test_bad_arguments_one_line_exit_2(args, msg, tmp_path):
    r = cli("--model", MODEL, *args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcasurgery: error:") and msg in lines[0]
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())


def test_missing_model():
    r = cli("--model", "/nonexistent/nope.bin", "--var", "0.5")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_out_fails_before_any_work(where, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # /proc refuses new files even to root
    out = blocker / "sub" if where == "under_a_file" else "/proc/pcasurgery-test-out"
    r = cli("--model", MODEL, "--var", "0.5", "--out", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not writable" in lines[0] and "model:" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_help_has_examples():
    r = cli("--help")
    assert r.returncode == 0 and "Examples:" in r.stdout and "--var 0.3" in r.stdout
