"""The Llama family beyond plain LlamaForCausalLM, against transformers
(PyTorch, CPU): Llama 3.x's scaled RoPE ("llama3") and "linear" RoPE,
Llama's attention_bias, Mistral's sliding window, Qwen2's q/k/v biases, tied
embeddings and explicit head_dim.

Each checkpoint is written by transformers itself (save_pretrained) with
random weights (biases and norms randomised too), in f32 and bf16, single
and sharded; the reference is transformers loading that folder in float32.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_fixtures import assert_logits_close, hf_logits, make_hf_model, save_hf  # noqa: E402

from pcasurgery import LlamaModel  # noqa: E402
from pcasurgery.checkpoints import config_from_hf  # noqa: E402

torch.set_num_threads(2)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# name -> (class, config): GQA from 1:1 to 8:1, head_dim given or implied
ARCH_CONFIGS = {
    # Llama 3.2-1B's shape in miniature: llama3 RoPE (wavelengths on both
    # sides of the smoothing band), tied embeddings, head_dim != hidden/heads
    "llama3_tied": ("LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE)),
    # linear RoPE and attention_bias (q, k, v and o biases), plain MHA
    "llama_linear_bias": ("LlamaForCausalLM", dict(
        hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, attention_bias=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    # Mistral with a window (16) far shorter than the tested context, 8:1
    "mistral_window": ("MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=1, vocab_size=300, sliding_window=16)),
    # Mistral v0.3's layout: no window, explicit head_dim, 3:1
    "mistral_nowindow": ("MistralForCausalLM", dict(
        hidden_size=48, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, vocab_size=256, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen2.5-0.5B's 7:1 heads and tied embeddings, with q/k/v biases
    "qwen2_tied": ("Qwen2ForCausalLM", dict(
        hidden_size=112, intermediate_size=224, num_hidden_layers=2, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen2-7B's 4:1 (untied)
    "qwen2": ("Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=288)),
}
CASES = [(k, dt, sh) for k in ARCH_CONFIGS for dt, sh in (("f32", False), ("bf16", True),
                                                           ("bf16", False))]
N_PROMPT, N_DECODE = 16, 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for key, dtype, sharded in CASES:
        arch, cfg = ARCH_CONFIGS[key]
        folder = tmp_path_factory.mktemp(f"{key}-{dtype}-{'sharded' if sharded else 'single'}")
        save_hf(make_hf_model(cfg, arch=arch), folder, dtype, sharded)
        ref = getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32).eval()
        out[key, dtype, sharded] = (folder, ref)
    return out


@pytest.mark.parametrize("key,dtype,sharded", CASES)
def test_prefill_and_decode_logits_match_transformers(checkpoints, key, dtype, sharded):
    """A prefill of 80 tokens, and 16 prefilled then 64 decode steps, against
    transformers' logits for the same 80 tokens."""
    folder, ref = checkpoints[key, dtype, sharded]
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    ours = LlamaModel.from_pretrained(folder)
    assert ours.config.architecture == ARCH_CONFIGS[key][0]
    # a bf16 checkpoint stays bf16 in memory (the default), a float32 one float32
    assert ours.dtype == ("bfloat16" if dtype == "bf16" else "float32")
    mats = [n for n in ours._weights if n.endswith("proj.weight")]
    assert {ours._weights[n].dtype for n in mats} == {np.dtype(
        np.uint16 if dtype == "bf16" else np.float32)}
    tokens = np.random.default_rng(1).integers(3, ARCH_CONFIGS[key][1]["vocab_size"],
                                               N_PROMPT + N_DECODE)
    want = hf_logits(ref, tokens)
    assert_logits_close(ours.logits(tokens), want)
    ours._rt.reset()
    rows = [ours._rt.forward(tokens[:N_PROMPT], 0, True)]
    rows += [ours._rt.forward(np.array([t]), N_PROMPT + i, False)
             for i, t in enumerate(tokens[N_PROMPT:-1])]
    assert_logits_close(np.vstack(rows), want[:-1])


def test_every_feature_is_exercised(checkpoints):
    """The fixtures really have what they are meant to test: biases that
    are not zero, a window shorter than the tested context, scaled RoPE."""
    cfg = {k: LlamaModel.from_pretrained(checkpoints[k, "f32", False][0]).config
           for k in ARCH_CONFIGS}
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias
    assert cfg["llama_linear_bias"].qkv_bias and cfg["llama_linear_bias"].o_bias
    assert 0 < cfg["mistral_window"].sliding_window < N_PROMPT + N_DECODE
    assert cfg["mistral_nowindow"].sliding_window == 0
    assert cfg["llama3_tied"].rope_type == "llama3" and cfg["llama3_tied"].tie_word_embeddings
    m = LlamaModel.from_pretrained(checkpoints["qwen2", "f32", False][0])
    assert np.abs(m.weights["model.layers.0.self_attn.k_proj.bias"]).max() > 0.1


def test_window_changes_the_logits(checkpoints):
    """Mistral's window matters: the same weights without it give other
    logits past the window (so the test above would notice it missing)."""
    import dataclasses

    folder, _ = checkpoints["mistral_window", "f32", False]
    m = LlamaModel.from_pretrained(folder)
    full = LlamaModel(dataclasses.replace(m.config, sliding_window=0), m.weights)
    tokens = np.random.default_rng(2).integers(3, 300, 40)
    a, b = m.logits(tokens), full.logits(tokens)
    np.testing.assert_array_equal(a[:16], b[:16])  # within the window: identical
    assert np.abs(a[16:] - b[16:]).max() > 1e-2


def _hf_config(arch: str, cfg: dict):
    return getattr(transformers, arch.replace("ForCausalLM", "Config"))(**cfg)


@pytest.mark.parametrize("key", list(ARCH_CONFIGS))
def test_rope_frequencies_match_transformers(key):
    """inv_freq of every RoPE type, from our config, equals transformers'
    ROPE_INIT_FUNCTIONS on the same config (both in float32)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch, cfg = ARCH_CONFIGS[key]
    hf = _hf_config(arch, cfg)
    ours = config_from_hf(hf.to_dict())
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        d = hf.rope_parameters["rope_theta"]
        hd = ours.head_dim
        want = 1.0 / (d ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    else:
        want, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    np.testing.assert_allclose(ours.rope_inv_freq(), want.numpy(), rtol=2e-7)


# Real checkpoints' config.json files, as their hubs ship them (abridged to the
# keys that matter), each compared with what transformers itself reads.
REAL_CONFIGS = {
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "vocab_size": 128256},
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936},
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "vocab_size": 32000},
    "SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "vocab_size": 49152},
    # transformers 5's own writing: rope_parameters, dtype
    "transformers-5": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 100,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
        "bos_token_id": 5, "eos_token_id": [7, 8]},
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_configs_read_as_transformers_reads_them(name):
    from transformers import AutoConfig

    d = REAL_CONFIGS[name]
    hf = AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
    ours = config_from_hf(json.loads(json.dumps(d)), name)
    assert ours.architecture == d["architectures"][0]
    assert ours.head_dim == (getattr(hf, "head_dim", None)
                             or hf.hidden_size // hf.num_attention_heads)
    assert ours.num_key_value_heads == hf.num_key_value_heads
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.rope_type == hf.rope_parameters["rope_type"]
    win = getattr(hf, "sliding_window", None) if d["model_type"] == "mistral" else None
    assert ours.sliding_window == (win or 0)
    bos = hf.bos_token_id[0] if isinstance(hf.bos_token_id, list) else hf.bos_token_id
    assert ours.bos_token_id == bos
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if ours.rope_type != "default":
        want, _ = ROPE_INIT_FUNCTIONS[ours.rope_type](hf, "cpu")
        np.testing.assert_allclose(ours.rope_inv_freq(), want.numpy(), rtol=2e-7)


@pytest.mark.parametrize("change,needle", [
    ({"architectures": ["GemmaForCausalLM"]}, "GemmaForCausalLM is not supported"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "llama"}, "does not match"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "RoPE type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": "yes"}, "attention_bias must be true or false"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True},
     "use_sliding_window"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 0},
     "sliding_window must be a positive int"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "default"}}}, "per layer type"),
])
def test_unsupported_features_are_refused_by_name(change, needle):
    d = dict(REAL_CONFIGS["SmolLM2-135M"], **change)
    with pytest.raises(ValueError, match=needle):
        config_from_hf(d, "config.json")


@pytest.mark.parametrize("key", ["llama3_tied", "llama_linear_bias", "mistral_window", "qwen2"])
def test_surgery_and_save_load_back_in_transformers(checkpoints, key, tmp_path):
    """Surgery (shared K/V basis at half the rank) on each architecture; the
    saved folder loads in transformers with the same class and gives our
    surgered model's logits. Biases are kept, not reconstructed."""
    from pcasurgery.export import save_hf_folder
    from pcasurgery.surgery import Surgery

    arch = ARCH_CONFIGS[key][0]
    folder, _ = checkpoints[key, "f32", False]
    m = LlamaModel.from_pretrained(folder)
    biases = {n: m.weights[n].copy() for n in m.weights if n.endswith(".bias")}
    before = m.logits(np.arange(3, 40))
    s = Surgery(m, "shared-kv", "q,k,v").fit()
    s.apply(rank=m.config.hidden_size // 2)
    after = m.logits(np.arange(3, 40))
    assert np.abs(after - before).max() > 1e-3  # the surgery changed something
    for n, b in biases.items():
        np.testing.assert_array_equal(m.weights[n], b)
    out = save_hf_folder(m, tmp_path / "saved")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    ref = getattr(transformers, arch).from_pretrained(out, dtype=torch.float32).eval()
    assert type(ref).__name__ == arch
    assert_logits_close(after, hf_logits(ref, np.arange(3, 40)))
    back = LlamaModel.from_pretrained(out)
    assert back.config == m.config


def test_cli_kv_budget_on_qwen2_says_what_biases_cost(checkpoints, tmp_path):
    """The equal-budget run works on a model with biases and says that the
    latent cache needs no bytes for them."""
    import shutil

    from conftest import cli
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path / "qwen2"
    shutil.copytree(checkpoints["qwen2", "f32", False][0], folder)
    tk = Tokenizer(models.BPE())  # Qwen2-style byte-level BPE, no BOS
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>"}))
    r = cli("--model", folder, "--kv-budget", "0.5", "--mode", "shared-kv,kv-int8",
            "--basis", "weights,activations", "--calib-tokens", "128", "--eval-tokens", "96",
            "--max-new-tokens", "0", env={"PCASURGERY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "biases: k_proj and v_proj biases stay dense and exact" in r.stdout
    assert "shared-kv activations greedy balance=auto" in r.stdout
