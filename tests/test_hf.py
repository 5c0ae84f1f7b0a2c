"""Hugging Face folders against transformers' LlamaForCausalLM (PyTorch, CPU).

The checkpoints are written by transformers itself (save_pretrained) with
random weights, in bf16 and f32, single-file and sharded; the reference
model is transformers loading the same folder in float32.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hf_fixtures import (  # noqa: E402
    SMALL_CONFIGS,
    assert_logits_close,
    hf_logits,
    make_hf_model,
    save_hf,
    write_safetensors,
)
from transformers import LlamaForCausalLM  # noqa: E402

from pcasurgery import LlamaModel  # noqa: E402
from pcasurgery.checkpoints import load_safetensors, read_safetensors_header  # noqa: E402

torch.set_num_threads(2)
CASES = [(k, dt, sh) for k in SMALL_CONFIGS for dt, sh in (("f32", False), ("bf16", True),
                                                           ("bf16", False))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for key, dtype, sharded in CASES:
        folder = tmp_path_factory.mktemp(f"{key}-{dtype}-{'sharded' if sharded else 'single'}")
        save_hf(make_hf_model(SMALL_CONFIGS[key]), folder, dtype, sharded)
        ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out[key, dtype, sharded] = (folder, ref)
    return out


@pytest.mark.parametrize("key,dtype,sharded", CASES)
def test_prefill_and_decode_logits_match_transformers(checkpoints, key, dtype, sharded):
    folder, ref = checkpoints[key, dtype, sharded]
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    ours = LlamaModel.from_pretrained(folder)
    cfg = SMALL_CONFIGS[key]
    tokens = np.random.default_rng(1).integers(3, cfg["vocab_size"], 48)
    want = hf_logits(ref, tokens)
    assert_logits_close(ours.logits(tokens), want)
    ours._rt.reset()
    steps = np.vstack([ours._rt.forward(np.array([t]), i, False) for i, t in enumerate(tokens)])
    assert_logits_close(steps, want)


@pytest.mark.parametrize("key", list(SMALL_CONFIGS))
def test_greedy_50_tokens_identical(checkpoints, key):
    folder, ref = checkpoints[key, "bf16", True]
    ours = LlamaModel.from_pretrained(folder)
    prompt = [1, 5, 6, 7]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    # (this prompt meets neither EOS nor BOS, at which we would stop, in 50 tokens)
    assert len(out) == 50 and not {1, 2} & set(out)
    assert ours.generate_ids(prompt, max_new_tokens=50) == out


def test_perplexity_equals_transformers(checkpoints):
    folder, ref = checkpoints["gqa8", "bf16", False]
    ours = LlamaModel.from_pretrained(folder)
    ids = np.random.default_rng(2).integers(3, 320, 100)
    ppl, n = ours.perplexity(ids, n_ctx=32)
    assert n == 100
    nll = 0.0
    for i in range(0, 100, 31):  # windows of n_ctx - 1 = 31, BOS in front
        win = np.concatenate([[1], ids[i:i + 31]])
        lg = hf_logits(ref, win)[:-1]
        lp = lg - lg.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(win) - 1), win[1:]].sum()
    assert ppl == pytest.approx(np.exp(nll / n), rel=1e-5)


def test_kl_to_itself_is_zero_and_to_a_changed_model_positive(checkpoints):
    folder, _ = checkpoints["gqa8", "f32", False]
    a = LlamaModel.from_pretrained(folder)
    b = LlamaModel.from_pretrained(folder)
    ids = np.random.default_rng(3).integers(3, 320, 60)
    kl, top1 = b.kl_divergence(a, ids, n_ctx=64)
    assert kl == pytest.approx(0.0, abs=1e-9) and top1 == 1.0
    name = "model.layers.0.self_attn.v_proj.weight"
    b.set_weight(name, b.weights[name] * 0.5)
    kl, top1 = b.kl_divergence(a, ids, n_ctx=64)
    assert kl > 1e-3 and top1 < 1.0


# -------------------------------------------------------------- bad files

def small_folder(tmp_path, checkpoints):
    folder, _ = checkpoints["gqa8", "f32", False]
    dst = tmp_path / "m"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_lying_safetensors_are_rejected(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    ok = write_safetensors(tmp_path / "ok.safetensors", {"a": a})
    np.testing.assert_array_equal(load_safetensors(ok)["a"], a)
    cases = {
        "header length": dict(header_len=10_000),
        "not valid JSON": dict(raw_header=b'{"a": {"dtype": "F32",'),
        "must be a JSON object": dict(raw_header=b"[1, 2]"),
        "unknown dtype 'F31'": dict(header_override={"a": {"dtype": "F31"}}),
        "lie outside the data section": dict(header_override={"a": {"data_offsets": [0, 4000]}}),
        "span 24 bytes but shape": dict(header_override={"a": {"shape": [2, 2]}}),
        "invalid shape": dict(header_override={"a": {"shape": [2, -3]}}),
        "invalid data_offsets": dict(header_override={"a": {"data_offsets": [0]}}),
        "overlap": dict(header_override={"b": {"dtype": "F32", "shape": [2],
                                               "data_offsets": [8, 16]}}),
    }
    for msg, kw in cases.items():
        bad = write_safetensors(tmp_path / "bad.safetensors", {"a": a}, **kw)
        with pytest.raises(ValueError, match=msg):
            read_safetensors_header(bad)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        read_safetensors_header(tmp_path / "tiny.safetensors")
    i64 = write_safetensors(tmp_path / "i64.safetensors", {"a": a},
                            header_override={"a": {"dtype": "I32"}})
    with pytest.raises(ValueError, match="has dtype I32; pcasurgery loads F32, F16, BF16"):
        load_safetensors(i64)


def test_bad_folders(tmp_path, checkpoints):
    m = small_folder(tmp_path, checkpoints)
    cfg = json.loads((m / "config.json").read_text())

    def with_config(**changes):
        d = dict(cfg)
        d.update(changes)
        (m / "config.json").write_text(json.dumps(d))

    with_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE type 'dynamic' is not supported; supported: "
                                         "default, llama3, linear"):
        LlamaModel.from_pretrained(m)
    with_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        LlamaModel.from_pretrained(m)
    with_config(architectures=["GemmaForCausalLM"])
    with pytest.raises(ValueError, match="architecture GemmaForCausalLM is not supported; "
                                         "supported: LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM"):
        LlamaModel.from_pretrained(m)
    with_config(intermediate_size=200)
    with pytest.raises(ValueError, match=r"has shape \[176, 64\] but config.json implies \[200, 64\]"):
        LlamaModel.from_pretrained(m)
    with_config()
    st = m / "model.safetensors"
    header, start = read_safetensors_header(st)
    # a missing tensor: rewrite the file without one layer norm
    from safetensors.numpy import load_file, save_file
    t = load_file(st)
    del t["model.layers.1.input_layernorm.weight"]
    save_file(t, st)
    with pytest.raises(ValueError, match="has no tensor 'model.layers.1.input_layernorm.weight'"):
        LlamaModel.from_pretrained(m)
    st.write_bytes(st.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="lie outside the data section|exceeds the file"):
        LlamaModel.from_pretrained(m)
    (m / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LlamaModel.from_pretrained(m)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlamaModel.from_pretrained(tmp_path / "nowhere")


def test_model_id_from_hf_cache(tmp_path, checkpoints, monkeypatch):
    folder, ref = checkpoints["tied", "bf16", False]
    snap = tmp_path / "hub" / "models--Org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--Org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--Org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    m = LlamaModel.from_pretrained("Org/tiny")
    assert m.source == str(snap)
    assert_logits_close(m.logits([1, 5, 9]), hf_logits(ref, [1, 5, 9]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="is not in the Hugging Face cache .* pass the path of a local folder"):
        LlamaModel.from_pretrained("Org/absent")


def test_f16_and_bf16_tensors_widen_exactly(tmp_path):
    rng = np.random.default_rng(4)
    h = (rng.standard_normal((7, 5)) * 100).astype(np.float16)
    h[0, :4] = [65504, -65504, 6e-8, -0.0]  # the largest, a subnormal, -0
    p = write_safetensors(tmp_path / "h.safetensors", {"h": h})
    got = load_safetensors(p)["h"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, h.astype(np.float32))
    assert np.signbit(got[0, 3])
    t = torch.tensor(rng.standard_normal((3, 4)), dtype=torch.bfloat16)
    from safetensors.torch import save_file
    save_file({"b": t}, str(tmp_path / "b.safetensors"))
    np.testing.assert_array_equal(load_safetensors(tmp_path / "b.safetensors")["b"],
                                  t.float().numpy())


def test_tokenizer_json_folder(tmp_path, checkpoints):
    """A folder with tokenizer.json (no tokenizer.model) uses the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    m = small_folder(tmp_path, checkpoints)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 50, trainer)
    tk.save(str(m / "tokenizer.json"))
    # no post-processor and no tokenizer_config.json: no BOS, as transformers' tokenizer
    model = LlamaModel.from_pretrained(m)
    assert not model.tokenizer.add_bos and model.tokenizer.encode("the cat")[0] != 1
    (m / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    model = LlamaModel.from_pretrained(m)
    ids = model.tokenizer.encode("the cat ran")
    assert ids[0] == 1 and model.tokenizer.decode(ids) == "the cat ran"
    # greedy text equals transformers' greedy continuation, decoded by the tokenizers library
    _, ref = checkpoints["gqa8", "f32", False]
    prompt = model.tokenizer.encode("the cat")
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert model.generate_ids("the cat", max_new_tokens=5) == want
    want_text = tk.decode([i for i in want if i < 300], skip_special_tokens=True)
    assert model.generate("the cat", max_new_tokens=5) == want_text


def test_download_asks_only_for_what_the_forward_pass_reads(tmp_path, checkpoints, monkeypatch):
    """A model id not in the cache is downloaded with huggingface_hub's
    snapshot_download, asking for the config, the safetensors weights (not
    .bin or consolidated copies), the tokenizer and the chat template."""
    import fnmatch

    import huggingface_hub

    folder, ref = checkpoints["tied", "f32", False]
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(folder)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    m = LlamaModel.from_pretrained("Org/remote")
    assert m.source == str(folder) and calls[0][0] == "Org/remote"
    assert calls[0][1]["cache_dir"] == tmp_path / "empty"
    repo = ["config.json", "generation_config.json", "model.safetensors.index.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth",
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE"]
    pats = calls[0][1]["allow_patterns"]
    got = sorted(f for f in repo if any(fnmatch.fnmatch(f, p) for p in pats))
    assert got == sorted(set(repo) - {"consolidated.safetensors", "pytorch_model.bin",
                                      "original/consolidated.00.pth", "README.md", "LICENSE"})


@pytest.mark.parametrize("error,needle", [
    ("GatedRepoError", "it is gated: accept its license on huggingface.co and log in"),
    ("RepositoryNotFoundError", "the Hugging Face Hub has no such model"),
    ("OSError", r"downloading it failed \(OSError: no network\)"),
])
def test_download_failures_are_one_clear_line(tmp_path, monkeypatch, error, needle):
    import huggingface_hub
    import huggingface_hub.errors as hub_errors

    def fake(repo_id, **kw):
        if error == "OSError":
            raise OSError("no network")
        cls = getattr(hub_errors, error)
        raise cls.__new__(cls)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(FileNotFoundError, match=needle) as e:
        LlamaModel.from_pretrained("Org/private")
    assert "\n" not in str(e.value) and "Org/private" in str(e.value)
