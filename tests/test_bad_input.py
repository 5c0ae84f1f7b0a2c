"""Lying, crafted and hostile inputs to the loaders and the CLI (issue #9):
each gets one clear line naming the file or argument and what was expected,
never a traceback, a hang, a wrong number or a stale file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cli

from pcasurgery import LlamaModel
from pcasurgery.checkpoints import load_hf_folder, load_safetensors, read_safetensors_header
from pcasurgery.lookup import DEMO_MODEL_DIR
from pcasurgery.tokenizers import Llama2cTokenizer, SentencePieceTokenizer, check_text

DEMO_CONFIG = json.loads((DEMO_MODEL_DIR / "config.json").read_text())


@pytest.fixture
def demo_copy(tmp_path):
    """A copy of the embedded demo model's folder, to break."""
    d = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, d)
    return d


def one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def bf16_bytes(a: np.ndarray) -> bytes:
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


# ---------------------------------------------- 5. non-finite weights in a file

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_bf16_weight_is_refused_naming_file_and_tensor(demo_copy, value):
    """A NaN in a bf16 q_proj gave NaN logits, perplexity nan and
    generate() [0, 0, 0]; the file now fails to load, naming the tensor."""
    path = demo_copy / "model.safetensors"
    header, start = read_safetensors_header(path)
    name = "model.layers.3.self_attn.q_proj.weight"
    data = bytearray(path.read_bytes())
    at = start + header[name]["begin"] + 2 * 1000
    data[at:at + 2] = bf16_bytes(np.array([value]))
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{name}' contains NaN or "
                                         r"Inf \(first at flat index 1000 of 16384\)"):
        LlamaModel.from_pretrained(demo_copy)
    line = one_error_line(cli("--model", demo_copy))
    assert name in line and "NaN or Inf" in line


# ---------------------------------------------- 6. shard paths that escape

def make_sharded(folder, tmp_path, target: str):
    idx = {"metadata": {}, "weight_map": {}}
    header, _ = read_safetensors_header(folder / "model.safetensors")
    for n in header:
        idx["weight_map"][n] = target
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("target", ["ABS", "../outside.safetensors", "sub/../../x.safetensors",
                                    "", 5])
def test_index_paths_must_stay_inside_the_folder(demo_copy, tmp_path, target):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(demo_copy / "model.safetensors", outside)
    make_sharded(demo_copy, tmp_path, str(outside) if target == "ABS" else target)
    with pytest.raises(ValueError, match="expected the name of a .safetensors file inside the "
                                         "model folder"):
        load_hf_folder(demo_copy)


def test_index_pointing_at_a_fifo_fails_at_once(demo_copy, tmp_path):
    """A FIFO as a shard used to hang from_pretrained forever."""
    os.mkfifo(demo_copy / "pipe.safetensors")
    make_sharded(demo_copy, tmp_path, "pipe.safetensors")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import sys; from pcasurgery.checkpoints import "
                        "load_hf_folder; load_hf_folder(sys.argv[1])", str(demo_copy)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)  # not the source tree
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    assert "pipe.safetensors is not a regular file" in r.stderr.strip().splitlines()[-1]
    line = one_error_line(cli("--model", demo_copy))
    assert "is not a regular file" in line


def test_symlinked_shards_inside_the_folder_load(demo_copy, tmp_path):
    """The Hugging Face cache links snapshot files to blobs elsewhere: a
    link whose name is inside the folder is fine."""
    blob = tmp_path / "blob"
    shutil.move(demo_copy / "model.safetensors", blob)
    (demo_copy / "model.safetensors").symlink_to(blob)
    m = LlamaModel.from_pretrained(demo_copy)
    ref = LlamaModel.from_pretrained(DEMO_MODEL_DIR)
    np.testing.assert_array_equal(m.logits([1, 50, 60]), ref.logits([1, 50, 60]))


# ---------------------------------------------- 7. --save into an existing folder

def test_save_refuses_a_non_empty_folder(tmp_path):
    """A stale model.safetensors.index.json shadowed the new weights: the
    run exited 0 but the folder loaded un-surgered. Now refused up front."""
    target = tmp_path / "out"
    target.mkdir()
    stale = target / "model.safetensors.index.json"
    stale.write_text('{"weight_map": {}}')
    line = one_error_line(cli("--model", "demo", "--rank", "4", "--save", target))
    assert f"--save {target} exists and is not empty" in line
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors.index.json"]
    from pcasurgery.export import save_hf_folder
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_hf_folder(LlamaModel.from_pretrained("demo"), target)


def test_save_into_an_empty_folder_and_help_says_so(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    r = cli("--model", "demo", "--rank", "4", "--save", target, "--max-new-tokens", "0")
    assert r.returncode == 0, r.stderr
    assert (target / "model.safetensors").is_file()
    assert "new or empty" in " ".join(cli("--help").stdout.split())


def test_save_reuses_the_runs_fits(monkeypatch):
    """--save applies the setting again from the fits the run made."""
    import argparse

    import pcasurgery.export as export
    from pcasurgery.__main__ import save_setting
    from pcasurgery.evaluate import Evaluator
    from pcasurgery.experiment import run

    m = LlamaModel.from_pretrained("demo")
    ev = Evaluator(m, np.arange(5, 40), n_ctx=64)
    fits: dict = {}
    run(m, ev, ["shared-kv"], [("var", 0.5)], fits=fits)
    n_fits = len(fits)
    args = argparse.Namespace(proj="q,k,v", center=True, layers_per_group=0, save=None)
    k_name = "model.layers.0.self_attn.k_proj.weight"
    saved = []
    monkeypatch.setattr(export, "save_hf_folder",
                        lambda model, folder: saved.append(model.weights[k_name].copy()))
    before = m.weights[k_name].copy()
    save_setting(m, args, "shared-kv", ("var", 0.5), fits)
    assert len(fits) == n_fits  # nothing decomposed again
    assert not np.array_equal(saved[0], before)  # it saved surgered weights
    np.testing.assert_array_equal(m.weights[k_name], before)  # and restored the model


# ---------------------------------------------- 8. unclear errors made clear

@pytest.mark.parametrize("which", ["config.json", "model.safetensors.index.json",
                                   "tokenizer_config.json"])
@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "5", "null"])
def test_json_files_that_are_not_objects(demo_copy, which, text):
    if which == "model.safetensors.index.json":
        os.remove(demo_copy / "model.safetensors")
    (demo_copy / which).write_text(text)
    line = one_error_line(cli("--model", demo_copy, "--max-new-tokens", "0"))
    assert f"{demo_copy / which} must hold a JSON object" in line


@pytest.mark.parametrize("which", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json(demo_copy, which):
    (demo_copy / which).write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=f"{which} is nested too deeply"):
        load_hf_folder(demo_copy)


def test_deeply_nested_safetensors_header(tmp_path):
    raw = b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    p = tmp_path / "deep.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError, match="header is nested too deeply"):
        read_safetensors_header(p)


@pytest.mark.parametrize("shape", [[2**70, 1], [2**70, 0], [1, -1]])
def test_absurd_shapes(tmp_path, shape):
    hb = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    p = tmp_path / "s.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb)
    with pytest.raises(ValueError, match="tensor 't' has an invalid shape"):
        read_safetensors_header(p)


@pytest.mark.parametrize("which", ["config.json", "model.safetensors.index.json"])
def test_non_utf8_json(demo_copy, which):
    (demo_copy / which).write_bytes(b'{"hidden_size": "\xff\xfe"}')
    with pytest.raises(ValueError, match=f"{which} is not UTF-8 text"):
        load_hf_folder(demo_copy)


def test_non_utf8_eval_text(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9 au lait".encode("latin-1"))
    line = one_error_line(cli("--model", "demo", "--eval-text", p))
    assert f"--eval-text {p} is not UTF-8 text" in line


def test_eval_text_that_is_a_folder(tmp_path):
    line = one_error_line(cli("--model", "demo", "--eval-text", tmp_path))
    assert f"--eval-text {tmp_path} is a folder; expected a regular file" in line
    line = one_error_line(cli("--model", "demo", "--eval-text", tmp_path / "nope.txt"))
    assert "does not exist" in line


@pytest.mark.parametrize("corrupt", [b"", b"\x00" * 64, b"not a model at all", None])
def test_corrupt_tokenizer_model(demo_copy, corrupt):
    p = demo_copy / "tokenizer.model"
    data = p.read_bytes()
    p.write_bytes(corrupt if corrupt is not None else data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"tokenizer model {p} is not a valid SentencePiece"):
        SentencePieceTokenizer(p)
    line = one_error_line(cli("--model", demo_copy))
    assert "is not a valid SentencePiece model" in line


@pytest.mark.parametrize("text", ["", "{}", '{"model": 5}', "[1]", '{"version": "1.0"'])
def test_corrupt_tokenizer_json(demo_copy, text):
    os.remove(demo_copy / "tokenizer.model")
    (demo_copy / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        LlamaModel.from_pretrained(demo_copy)


@pytest.mark.parametrize("field,value,msg", [
    ("head_dim", "16", "config head_dim must be an int >= 0, got '16'"),
    ("head_dim", 16.0, "config head_dim must be an int >= 0, got 16.0"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive finite number, got '1e-5'"),
    ("hidden_size", 128.0, "hidden_size must be a positive int, got 128.0"),
    ("bos_token_id", "1", "bos_token_id must be an int >= 0"),
    ("rope_scaling", [1], "rope_scaling must be a JSON object or null, got \\[1\\]"),
])
def test_config_values_of_the_wrong_type(demo_copy, field, value, msg):
    cfg = dict(DEMO_CONFIG, **{field: value})
    (demo_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json: (config )?{msg}"):
        load_hf_folder(demo_copy)


def test_string_false_tie_was_taken_as_true(demo_copy):
    """"tie_word_embeddings": "false" silently tied lm_head to the embedding."""
    (demo_copy / "config.json").write_text(json.dumps(dict(DEMO_CONFIG,
                                                           tie_word_embeddings="false")))
    line = one_error_line(cli("--model", demo_copy))
    assert "tie_word_embeddings must be true or false" in line


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_unpadded_safetensors_header_loads(tmp_path, dtype):
    """An odd-length header (valid: the format does not require padding)
    leaves 16-bit data at odd addresses; it loads, bit for bit."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    raw = bf16_bytes(a) if dtype == "BF16" else a.tobytes()
    hb = json.dumps({"t": {"dtype": dtype, "shape": [5, 7], "data_offsets": [0, len(raw)]}},
                    separators=(",", ":")).encode()
    if len(hb) % 2 == 0:
        hb += b" "
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + raw)
    want = (a if dtype == "F32" else
            (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(load_safetensors(p)["t"], want.reshape(5, 7))


def test_threads_beyond_the_build_limit():
    import pcasurgery

    limit = pcasurgery.threads.max_threads()
    assert limit >= 1
    line = one_error_line(cli("--model", "demo", "--threads", "10000"))
    assert f"--threads 10000: at most {limit}" in line
    with pytest.raises(ValueError, match=f"threads must be between 1 and {limit}"):
        pcasurgery.set_num_threads(limit + 1)
    with pytest.raises(ValueError, match="threads must be between 1 and"):
        pcasurgery.set_num_threads(2**80)


def write_tok512(path, pieces: list[bytes]):
    """A llama2.c tokenizer file with these pieces, all scores 0."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, pieces))))
        for piece in pieces:
            f.write(struct.pack("<fi", 0.0, len(piece)) + piece)
    return path


LETTERS = [b"<unk>", b"<s>", b"</s>"] + [bytes([i]) for i in range(97, 123)]


def test_llama2c_tokenizer_without_a_space_piece(tmp_path):
    p = write_tok512(tmp_path / "tok.bin", LETTERS)
    with pytest.raises(ValueError, match=f"tokenizer {p} has no ' ' piece"):
        Llama2cTokenizer(p).encode("abc")
    p = write_tok512(tmp_path / "tok2.bin", LETTERS + [b" "])
    assert Llama2cTokenizer(p).encode("ab", bos=False) == [29, 3, 4]
    with pytest.raises(ValueError, match=f"tokenizer {p} has no piece for 'Z' and, with 30 "
                                         "pieces, no <0x00>..<0xFF> byte fallback"):
        Llama2cTokenizer(p).encode("aZ")


@pytest.mark.parametrize("tok", ["sentencepiece", "llama2c"])
def test_lone_surrogates(tok, tmp_path):
    t = (LlamaModel.from_pretrained("demo").tokenizer if tok == "sentencepiece" else
         Llama2cTokenizer(write_tok512(tmp_path / "t.bin", LETTERS + [b" "])))
    with pytest.raises(ValueError, match="text has a lone surrogate U\\+DCFF at index 3"):
        t.encode("abc\udcff def")
    with pytest.raises(ValueError, match="prompt has a lone surrogate"):
        check_text("\ud800", "prompt")


def test_lone_surrogate_prompt_on_the_command_line():
    line = one_error_line(cli("--model", "demo", "--prompt", "caf\udce9"))
    assert "--prompt has a lone surrogate U+DCE9 at index 3" in line


def test_rank_larger_than_any_group():
    """--rank 100000 was reported as "rank 100000" while 64 components ran."""
    line = one_error_line(cli("--model", "demo", "--rank", "100000"))
    assert "--rank 100000 exceeds the 128 components of the largest group" in line
    from pcasurgery.surgery import Surgery
    s = Surgery(LlamaModel.from_pretrained("demo"), "separate").fit()
    with pytest.raises(ValueError, match="rank 129 exceeds the 128 components"):
        s.ks_for(rank=129)
    assert set(s.ks_for(rank=128).values()) == {128, 16}  # q: 128; k, v: 16 rows each


# ---------------------------------------------- 9. Ctrl-C

def test_ctrl_c_prints_one_line_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "pcasurgery", "--model", "demo", "--sweep", "--mode",
         "separate,shared-kv,shared-kv-xlayer", "--eval-tokens", "20000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = p.stdout.readline()  # the model line: the run is under way
    assert first.startswith("model:")
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "pcasurgery: interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layers", [2**31, 2**70])
def test_config_claiming_absurd_layer_counts_fails_at_once(demo_copy, layers):
    """Found by tools/fuzz.py: num_hidden_layers=2**70 looped over every
    claimed layer's tensor names (a hang); the checkpoint's tensor count
    now bounds it before any loop."""
    (demo_copy / "config.json").write_text(json.dumps(dict(DEMO_CONFIG,
                                                           num_hidden_layers=layers)))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"num_hidden_layers={layers} needs at least "
                                         f"{9 * layers + 2} tensors but .* holds 75"):
        load_hf_folder(demo_copy)
    assert time.monotonic() - t0 < 5
    from pcasurgery import LlamaConfig
    c = LlamaConfig(**dict(TINY_KW, num_hidden_layers=layers))
    with pytest.raises(ValueError, match="holds 0"):
        LlamaModel(c, {})


TINY_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


def test_tokenizer_json_whose_unk_token_is_missing(tmp_path):
    """Found by tools/fuzz.py --atheris: a tokenizer.json whose unk_token
    is not in its vocabulary loads, then the tokenizers library raised a
    bare Exception at encode time."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from pcasurgery.tokenizers import HFTokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the cat sat"] * 10, trainers.BpeTrainer(
        vocab_size=50, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    cfg = json.loads(tk.to_str())
    cfg["model"]["unk_token"] = "<unk<"
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(cfg))
    tok = HFTokenizer(p)
    assert tok.encode("the cat", bos=False) == tk.encode("the cat").ids
    with pytest.raises(ValueError, match=f"tokenizer {p} cannot encode the text "
                                         r"\(Unk token `<unk<` not found in the vocabulary\)"):
        tok.encode("the dog")
