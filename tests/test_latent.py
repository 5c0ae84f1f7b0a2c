"""The latent KV path (csrc/llama.c): a layer whose K and V come from a
latent caches the latent, rebuilds its keys from it at every step and
applies V's up-projection after the attention weights. It must compute the
same function as the dense model whose weights are the reconstructions:
within 1e-4 of the largest logit over a 512-token prefill and 64 decode
steps, for every mode and basis, on stories260K, the demo model and random
GQA 1:1, 4:1 and 8:1 models; and its cache must be what it says it is."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED

from pcasurgery import LlamaModel
from pcasurgery import budget as B
from pcasurgery import calibrate as cal
from pcasurgery.config import LlamaConfig, expected_shapes, weight_names
from pcasurgery.surgery import Surgery

MODEL = SHARED / "models" / "stories260K.bin"
TOK = SHARED / "models" / "tok512.bin"
N_PREFILL, N_DECODE = 512, 64
N_CTX = N_PREFILL + N_DECODE


def random_model(heads: int, kv_heads: int, seed: int = 0, bias: bool = False,
                 window: int = 0, hidden: int = 64) -> LlamaModel:
    """A small float32 model with random weights (std large enough that its
    distributions are peaked), GQA heads:kv_heads, head size hidden / heads."""
    c = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=200,
                    max_position_embeddings=N_CTX, qkv_bias=bias, sliding_window=window,
                    architecture="Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
    rng = np.random.default_rng(seed)
    w = {}
    for n, shape in expected_shapes(c).items():
        if n.endswith("norm.weight"):
            w[n] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif n.endswith(".bias"):
            w[n] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[n] = (rng.standard_normal(shape) / np.sqrt(shape[-1]) * 1.5).astype(np.float32)
    assert set(w) == set(weight_names(c))
    return LlamaModel(c, w, n_ctx=N_CTX, max_batch=256)


def run(m: LlamaModel, toks: np.ndarray) -> np.ndarray:
    """Logits of a prefill of N_PREFILL tokens (in two chunks: max_batch is
    256) and then N_DECODE single-token steps, teacher-forced."""
    rt = m._rt
    rt.reset()
    out = [rt.forward(toks[:N_PREFILL], 0, True)]
    for i in range(N_DECODE):
        out.append(rt.forward(toks[N_PREFILL + i:N_PREFILL + i + 1], N_PREFILL + i, False))
    return np.vstack(out)


def dense_and_latent(m: LlamaModel, s: Surgery, toks: np.ndarray, **setting):
    """run() with the setting applied as reconstructions, then factored;
    the model restored."""
    s.apply(**setting)
    dense = run(m, toks)
    s.apply(**setting, factored=True)
    latent = run(m, toks)
    s.restore()
    return dense, latent


def assert_same_function(latent, dense):
    np.testing.assert_allclose(latent, dense, rtol=0, atol=1e-4 * np.abs(dense).max())


def tokens_for(m: LlamaModel, seed: int = 1) -> np.ndarray:
    if m.tokenizer is not None:
        text = (SHARED / "data" / "tinystories_sample.txt").read_text()
        ids = m.tokenizer.encode(text)
        if len(ids) >= N_CTX:
            return np.asarray(ids[:N_CTX])
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, N_CTX)


@pytest.fixture(scope="module")
def models():
    out = {"gqa1": random_model(4, 4), "gqa4": random_model(8, 2, seed=1),
           "gqa8": random_model(8, 1, seed=2),
           "demo": LlamaModel.from_pretrained("demo", dtype="float32", n_ctx=N_CTX)}
    if MODEL.is_file():
        out["stories260K"] = LlamaModel.from_pretrained(MODEL, tokenizer=TOK, n_ctx=N_CTX)
    return out


MODELS = ["gqa1", "gqa4", "gqa8", "demo", "stories260K"]


def get(models, key):
    if key not in models:
        pytest.skip(f"{MODEL} not found")
    return models[key]


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize("mode", ["shared-kv", "separate", "shared-kv-xlayer"])
def test_weight_bases_latent_equals_reconstruction(models, key, mode):
    m = get(models, key)
    toks = tokens_for(m)
    base = run(m, toks)
    s = Surgery(m, mode, layers_per_group=2 if mode == "shared-kv-xlayer" else 0).fit()
    st = s.apply(var=0.6)
    dense = run(m, toks)
    assert m.latent_layers() == ["dense"] * m.config.num_hidden_layers
    st_f = s.apply(var=0.6, factored=True)
    assert st_f.ks == st.ks and st_f.factored
    want = "q,k|v shared" if mode != "separate" else "q,k,v"
    assert m.latent_layers() == [want] * m.config.num_hidden_layers
    latent = run(m, toks)
    s.restore()
    assert np.abs(dense - base).max() > 1e-2 * np.abs(base).max()  # the surgery does something
    assert_same_function(latent, dense)
    np.testing.assert_array_equal(run(m, toks), base)  # restore: the dense path, bit for bit


@pytest.mark.parametrize("key", ["gqa4", "stories260K"])
@pytest.mark.parametrize("mode", ["shared-kv", "separate"])
def test_calibrated_bases_latent_equals_reconstruction(models, key, mode):
    m = get(models, key)
    toks = tokens_for(m)
    calib = cal.calibrate(m, cal.sampled_documents(m, 512, seed=3)) if m.tokenizer else \
        cal.calibrate(m, [np.random.default_rng(7).integers(0, m.config.vocab_size, 256)])
    bases = B.Bases(m, calib)
    groups = bases.groups(mode, "activations")
    al = B.allocate(groups, m.config, 0.3, "greedy")
    originals = {n: m.stored_weight(n) for layer in groups for g in layer for n in g.names}
    B.apply_latent(m, groups, al.ks)
    dense = run(m, toks)
    B.restore(m, originals)
    B.apply_latent(m, groups, al.ks, factored=True)
    latent = run(m, toks)
    B.restore(m, originals)
    assert_same_function(latent, dense)


def test_mixed_layers_and_projections(models):
    """K alone latent, V alone latent, and dense layers beside latent ones."""
    m = get(models, "gqa4")
    toks = tokens_for(m)
    for proj in ("k", "v", "q", "k,v"):
        dense, latent = dense_and_latent(m, Surgery(m, "separate", proj=proj).fit(), toks, rank=5)
        assert_same_function(latent, dense)
    # layer 1 only: the others keep a dense cache
    s = Surgery(m, "shared-kv", proj="k,v").fit()
    s.apply(rank=6, factored=True)
    for layer in (0, 2):
        m.set_latent(layer, None, None)
    mixed = run(m, toks)
    widths = m._rt.cache_widths()
    s.restore()
    kv = m.config.kv_dim
    assert widths == [2 * kv, 7, 2 * kv]
    ref = Surgery(m, "shared-kv", proj="k,v").fit()
    ref.apply(rank=6)
    full = {n: m.stored_weight(n) for n in ref._originals}
    ref.restore()
    for n in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        m.set_weight(n, full[n])
    dense = run(m, toks)
    ref.restore()
    assert_same_function(mixed, dense)


@pytest.mark.parametrize("bias,window", [(True, 0), (False, 40)])
def test_biases_and_sliding_window(bias, window):
    """Qwen2's k/v biases stay dense (K = A c + b_k rebuilt, V's bias added
    after the absorbed up-projection); Mistral's window over rebuilt keys."""
    m = random_model(8, 2, seed=4, bias=bias, window=window)
    toks = tokens_for(m)
    for mode in ("shared-kv", "separate"):
        dense, latent = dense_and_latent(m, Surgery(m, mode).fit(), toks, var=0.7)
        assert_same_function(latent, dense)


def test_cache_bytes_are_what_is_allocated(models):
    m = get(models, "gqa4")
    c = m.config
    dense = m.kv_cache_bytes()
    assert dense == 2 * c.kv_dim * N_CTX * c.num_hidden_layers * 4
    assert m.kv_cache_bytes(per_layer=True) == [2 * c.kv_dim * N_CTX * 4] * c.num_hidden_layers
    s = Surgery(m, "shared-kv", proj="k,v").fit()
    for r in (3, 8):
        st = s.apply(rank=r, factored=True)
        # latent floats (the components and the mean) x tokens x layers x 4 bytes
        assert st.kv_cache_bytes == m.kv_cache_bytes() == (r + 1) * N_CTX * c.num_hidden_layers * 4
        assert st.budget["kv_latent_per_token"] == (r + 1) * c.num_hidden_layers
    s = Surgery(m, "separate", proj="k,v").fit()
    st = s.apply(rank=4, factored=True)
    assert m.kv_cache_bytes(per_layer=True) == [(4 + 1) * 2 * N_CTX * 4] * c.num_hidden_layers
    s.restore()
    assert m.kv_cache_bytes() == dense


def test_seed_mode_keeps_kv_dense(models):
    m = get(models, "demo")
    s = Surgery(m, "seed").fit()
    assert not s.latent_kv
    assert Surgery(m, "separate", proj="q").latent_kv is False
    assert Surgery(m, "shared-kv").latent_kv
    dense = m.kv_cache_bytes()
    s.apply(var=0.5, factored=True)
    assert m.latent_layers() == ["q"] * m.config.num_hidden_layers
    assert m.kv_cache_bytes() == dense
    s.restore()


def test_bf16_model_runs_the_latent_path():
    """bf16-resident weights: the factors are float32, the rest bf16."""
    m0 = random_model(8, 2, seed=5)
    m = LlamaModel(m0.config, m0.weights, n_ctx=N_CTX, max_batch=256, dtype="bfloat16")
    toks = tokens_for(m)
    s = Surgery(m, "shared-kv").fit()
    s.apply(var=0.8)
    dense = run(m, toks)  # reconstructions rounded to bf16
    st = s.apply(var=0.8, factored=True)
    latent = run(m, toks)
    s.restore()
    assert st.kv_cache_bytes < m.kv_cache_bytes()
    assert np.isfinite(latent).all()
    # bf16 rounding of the reconstruction, not an error of the latent path
    assert np.abs(latent - dense).max() < 0.05 * np.abs(dense).max()


def test_set_factored_q_bad_input(models):
    m = get(models, "gqa4")
    D, Dq = m.config.hidden_size, m.config.num_attention_heads * m.config.head_dim
    with pytest.raises(ValueError, match="q_down and q_up go together"):
        m.set_factored_q(0, np.ones((3, D)), None)
    with pytest.raises(ValueError, match=rf"q_up must have shape \({Dq}, 3\)"):
        m.set_factored_q(0, np.ones((3, D)), np.ones((Dq, 4)))
    with pytest.raises(ValueError, match="exceeds hidden_size"):
        m.set_factored_q(0, np.ones((D + 2, D)), np.ones((Dq, D + 2)))
    with pytest.raises(IndexError, match="layer must be between"):
        m.set_factored_q(9, None, None)
    with pytest.raises(ValueError, match="n must be between 0 and seq_len"):
        m._rt.fill_cache(N_CTX + 1)
    assert m.latent_layers() == ["dense"] * m.config.num_hidden_layers


# ------------------------------------------------------ factored folders

@pytest.mark.parametrize("mode,proj", [("shared-kv", "q,k,v"), ("separate", "k,v"),
                                       ("separate", "v"), ("shared-kv-xlayer", "k,v")])
def test_factored_folder_loads_back_to_the_same_logits(models, tmp_path, mode, proj):
    import json

    from pcasurgery.factored import save_factored

    m = get(models, "gqa4")
    toks = tokens_for(m)
    s = Surgery(m, mode, proj=proj).fit()
    s.apply(rank=5, factored=True)
    want, layers, cache = run(m, toks), m.latent_layers(), m.kv_cache_bytes()
    save_factored(m, tmp_path / "f")
    s.restore()
    m2 = LlamaModel.from_pretrained(tmp_path / "f", n_ctx=N_CTX)
    assert m2.latent_layers() == layers and m2.kv_cache_bytes() == cache
    assert_same_function(run(m2, toks), want)  # one prefill chunk here, two there
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    key = "kv_lora_rank" if mode != "separate" else f"{proj.split(',')[0]}_lora_rank"
    assert cfg[key] == [6] * m.config.num_hidden_layers  # 5 components + the mean


def test_factored_folder_that_disagrees_with_its_config_is_refused(models, tmp_path):
    import json

    from pcasurgery.factored import save_factored

    m = get(models, "gqa4")
    s = Surgery(m, "shared-kv", proj="k,v").fit()
    s.apply(rank=5, factored=True)
    save_factored(m, tmp_path / "f")
    s.restore()
    cfg_path = tmp_path / "f" / "config.json"
    good = json.loads(cfg_path.read_text())
    for change, needle in [
        ({"kv_lora_rank": [6, 7, 6]}, r"model.layers.1.self_attn.kv_a_proj.weight.*\[6, 64\].*"
                                      r"implies \[7, 64\]"),
        ({"kv_lora_rank": [6, 6]}, "kv_lora_rank must be a list of 3 ints"),
        ({"k_lora_rank": [6, 0, 0]}, "layer 0 has both kv_lora_rank and k/v_lora_rank"),
        ({"pcasurgery_factored": {"format": 9}}, "pcasurgery_factored must be an object"),
    ]:
        cfg_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=needle):
            LlamaModel.from_pretrained(tmp_path / "f")


# ------------------------------------------------------------------ CLI

def test_cli_latent_reports_allocated_bytes_and_saves_factored(tmp_path):
    import json

    from conftest import cli

    if not MODEL.is_file():
        pytest.skip(f"{MODEL} not found")
    out = tmp_path / "f"
    r = cli("--model", MODEL, "--var", "0.5", "--latent", "--json", "--max-new-tokens", "0",
            "--save", out, "--factored")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    row = res["rows"][0]
    m = LlamaModel.from_pretrained(MODEL, tokenizer=TOK)
    c = m.config
    assert res["latent"] and row["latent"]
    assert row["kv_cache_dense_bytes"] == m.kv_cache_bytes()
    # the allocated latent cache: (components + mean) x n_ctx x 4 bytes, per layer
    comps = row["components"]["k|v"]
    assert row["kv_cache_bytes"] == sum(k + 1 for k in comps) * m.n_ctx * 4
    assert row["kv_cache_bytes"] / row["kv_cache_dense_bytes"] == pytest.approx(row["kv_ratio"])
    m2 = LlamaModel.from_pretrained(out)  # a llama2c model: no tokenizer file to copy
    assert m2.latent_layers() == ["q,k|v shared"] * c.num_hidden_layers
    assert m2.kv_cache_bytes() == row["kv_cache_bytes"]
    r = cli("--model", MODEL, "--var", "0.5", "--latent", "--max-new-tokens", "0")
    assert r.returncode == 0, r.stderr
    assert "KV alloc" in r.stdout and "MiB" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--mode", "seed", "--latent"], "--latent: mode seed compresses q_proj only"),
    (["--proj", "q", "--latent"], "--latent: --proj q has neither k nor v"),
    (["--factored"], "--factored writes the factors of --save"),
])
def test_cli_latent_bad_input(args, needle):
    from conftest import cli

    r = cli("--model", "demo", "--var", "0.5", "--max-new-tokens", "0", *args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
