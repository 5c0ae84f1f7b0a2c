"""Tokenizers against a peer's test vectors and round trips."""
from __future__ import annotations

import pytest
from conftest import SHARED

from pcasurgery.tokenizers import SentencePieceTokenizer, chat_prompt, load_hf_tokenizer

SPM = SHARED / "models" / "llama2-tokenizer.model"
VEC_IN = SHARED / "models" / "ggml-vocab-llama-spm.gguf.inp"
VEC_OUT = SHARED / "models" / "ggml-vocab-llama-spm.gguf.out"

pytestmark = pytest.mark.skipif(not SPM.is_file(), reason=f"{SPM} not found")


def llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: inputs separated by lines
    `__ggml_vocab_test__`, one line of expected ids (without BOS) each."""
    texts = VEC_IN.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = VEC_OUT.read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(ids) + 1 and texts[-1] == ""  # file ends in a separator
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def test_llama_cpp_vectors_all_pass():
    tok = SentencePieceTokenizer(SPM)
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    vectors = llama_cpp_vectors()
    assert len(vectors) == 46
    failures = [(t, tok.encode(t, bos=False), want) for t, want in vectors
                if tok.encode(t, bos=False) != want]
    assert not failures, failures


@pytest.mark.parametrize("text", ["Hello world", "Zoë's café — 東京 🎉!", "tabs\tand\nnewlines",
                                  "   leading spaces", "Äpfel 4 ½ months"])
def test_sentencepiece_round_trip(text):
    tok = SentencePieceTokenizer(SPM)
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text


def test_bad_ids_and_text():
    tok = SentencePieceTokenizer(SPM)
    with pytest.raises(ValueError, match=r"token id 32000 is outside the vocabulary \[0, 32000\)"):
        tok.decode([1, 32000])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentencePieceTokenizer(SPM.with_name("nope.model"))


def test_folder_lookup_prefers_tokenizer_model(tmp_path):
    assert load_hf_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(SPM.read_bytes())
    assert isinstance(load_hf_tokenizer(tmp_path), SentencePieceTokenizer)


def test_chat_template():
    p = chat_prompt("What is machine learning?")
    assert p == ("<|system|>\nYou are a friendly chatbot.</s>\n"
                 "<|user|>\nWhat is machine learning?</s>\n<|assistant|>\n")
    assert chat_prompt("Hi", system=None) == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_chat_prompt_special_tokens():
    tok = SentencePieceTokenizer(SPM)
    ids = tok.encode(chat_prompt("Hi", system=None), bos=True, special=True)
    # BOS, "<|user|>\nHi", EOS, then "\n<|assistant|>\n" without a dummy-prefix space
    assert ids[0] == 1 and ids.count(2) == 1
    after = ids[ids.index(2) + 1:]
    assert after == tok.sp.encode("\n<|assistant|>\n")[1:]  # drop the "▁" prefix piece
    assert tok.decode(ids[ids.index(2) + 1:]).startswith("\n<|assistant|>")
    # without special, "</s>" is ordinary text
    assert 2 not in tok.encode("Hi</s>", bos=False)
