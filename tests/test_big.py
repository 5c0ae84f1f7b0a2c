"""benchmarks/bench_big.py's path at a size CI runs: a Llama-3.1-shaped
checkpoint written tensor by tensor in shards, loaded bf16-resident and
memory-mapped, decoded, and evaluated under surgery one group at a time."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_fixtures import assert_logits_close, hf_logits  # noqa: E402

from pcasurgery import LlamaModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_big  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("big")
    bench_big.write_checkpoint(f, bench_big.SMALL, 2)
    return f


def test_checkpoint_has_the_real_layout_and_loads_in_transformers(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shapes = bench_big.tensor_shapes(bench_big.SMALL)
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == sum(2 * int(np.prod(s)) for s in shapes.values())
    assert bench_big.write_checkpoint(folder, bench_big.SMALL, 2) == 0.0  # kept, not rewritten
    ours = LlamaModel.from_pretrained(folder)
    assert ours.dtype == "bfloat16" and ours.config.rope_type == "llama3"
    w = ours.stored_weight("model.layers.0.self_attn.k_proj.weight")
    assert w.dtype == np.uint16 and not w.flags.owndata  # memory-mapped, not copied
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(3, 1000, 40)
    assert_logits_close(ours.logits(tokens), hf_logits(ref, tokens))


def test_the_measured_side_runs_streaming_surgery(folder):
    args = argparse.Namespace(threads=2, decode=4, tokens=96, var=0.3, streaming="on")
    r = bench_big.run_side(folder, args)
    assert r["streaming"] and r["written_dtype"] == "bfloat16" and r["dtype"] == "bfloat16"
    assert r["eval_tokens"] == 96 and r["kl"] > 0 and r["restored"]
    assert r["decode_tps"] > 0 and r["peak_rss_gb"] > 0
    if os.path.exists("/proc/self/smaps"):  # the mapped weights, resident after the NaN scan
        mats = sum(2 * int(np.prod(s)) for s in bench_big.tensor_shapes(bench_big.SMALL).values()
                   if len(s) == 2) / 1e9
        assert 0.9 * mats < r["mapped_gb"] < 1.1 * mats + 0.01
        assert 0 <= r["huge_gb"] <= r["mapped_gb"]
    kept = bench_big.run_side(folder, argparse.Namespace(**{**vars(args), "streaming": "off"}))
    assert not kept["streaming"]
    assert kept["kl"] == r["kl"] and kept["kv_ratio"] == r["kv_ratio"]
