"""The C forward pass on a really trained model: stories260K (llama2.c, GQA 2:1)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED
from llama_reference import forward as ref_forward
from llama_reference import read_llama2c

from pcasurgery import LlamaModel
from pcasurgery.tokenizers import Llama2cTokenizer

MODEL = SHARED / "models" / "stories260K.bin"
TOK = SHARED / "models" / "tok512.bin"

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not found")

# karpathy/llama2.c doc/stories260K.md: `./run stories260K.bin -z tok512.bin -t 0.0`
# (256 steps from BOS, greedy).
PUBLISHED_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what "
    "to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to "
    "do.\" Her mom said, \"Don't worry, Lily. We can help you."
)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.from_pretrained(MODEL, tokenizer=TOK)


def test_greedy_from_bos_reproduces_published_text(model):
    ids = model.generate_ids(None, max_new_tokens=256)
    assert len(ids) == 256
    assert model.tokenizer.decode(ids) == PUBLISHED_GREEDY


def test_logits_match_numpy_reference_in_llama2c_layout(model):
    """Independent reference: run.c's math in float64 on the file's own
    (interleaved-RoPE) weights; ours permutes q/k rows to rotate_half."""
    cfg, w = read_llama2c(MODEL)
    tokens = model.tokenizer.encode("Once upon a time, a cat sat on a mat. It was happy.")
    want = ref_forward(cfg, w, np.array(tokens))
    got = model.logits(tokens)
    # float32 through 5 layers of width 64: ~1e-6 relative; logits are O(10).
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_decode_steps_equal_prefill_and_chunks(model):
    tokens = model.tokenizer.encode("Lily and Ben went to the park to play with a red ball.")
    full = model.logits(tokens)
    rt = model._rt
    rt.reset()
    steps = np.vstack([rt.forward(np.array([t]), i, False) for i, t in enumerate(tokens)])
    # the same float32 arithmetic in another order (gemv vs sgemm)
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-4)
    small = LlamaModel(model.config, model.weights, model.tokenizer, max_batch=3)
    np.testing.assert_allclose(small.logits(tokens), full, rtol=0, atol=1e-4)


def test_perplexity_per_story(model, report):
    text = (SHARED / "data" / "tinystories_sample.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    assert len(stories) == 5
    cfg, w = read_llama2c(MODEL)
    ppls, total_nll, total_n, ref_nll = [], 0.0, 0, 0.0
    for s in stories:
        ids = model.tokenizer.encode(s, bos=False)
        assert len(ids) < 512  # one window per story
        ppl, n = model.perplexity(ids, n_ctx=512)
        ppls.append(ppl)
        total_nll += np.log(ppl) * n
        total_n += n
        # the independent float64 NumPy reference, same protocol: BOS + story
        win = np.array([1] + ids)
        logits = ref_forward(cfg, w, win)[:-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ref_nll -= logp[np.arange(len(ids)), ids].sum()
    overall = float(np.exp(total_nll / total_n))
    reference = float(np.exp(ref_nll / total_n))
    report(f"stories260K perplexity on tinystories_sample.txt, one window per story: "
           f"{', '.join(f'{p:.2f}' for p in ppls)}; all {total_n} tokens: {overall:.3f} "
           f"(float64 NumPy reference {reference:.4f})")
    # float32 vs float64 logits differ by ~1e-6 relative (see above): the mean
    # NLL agrees to ~1e-5; Karpathy reports validation loss 1.2968 (ppl 3.66)
    # on TinyStories, and these 5 stories give 3.548
    assert total_n == 1804
    assert overall == pytest.approx(reference, rel=1e-4)
    assert round(overall, 3) == 3.548


def test_perplexity_equals_mean_nll(model):
    ids = model.tokenizer.encode("The little dog ran to the tree and barked at a bird.", bos=False)
    ppl, n = model.perplexity(ids, n_ctx=8)  # several windows of 7
    assert n == len(ids)
    nll = 0.0
    for i in range(0, len(ids), 7):
        win = [1] + ids[i:i + 7]
        lg = model.logits(win).astype(np.float64)
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        nll -= sum(lp[j, win[j + 1]] for j in range(len(win) - 1))
    assert ppl == pytest.approx(np.exp(nll / n), rel=1e-9)


def test_set_weight_and_restore(model):
    tokens = model.tokenizer.encode("Once upon a time")
    base = model.logits(tokens)
    name = "model.layers.2.self_attn.k_proj.weight"
    orig = model.weights[name]
    model.set_weight(name, np.zeros_like(orig))
    assert not np.allclose(model.logits(tokens), base)
    model.set_weight(name, orig)
    np.testing.assert_array_equal(model.logits(tokens), base)
    with pytest.raises(ValueError, match=r"must keep its shape \(32, 64\)"):
        model.set_weight(name, np.zeros((64, 64), np.float32))
    # stories260K ties lm_head to the embedding: one array under both names
    emb = model.weights["model.embed_tokens.weight"]
    model.set_weight("model.embed_tokens.weight", emb * 0.5)
    assert model.weights["lm_head.weight"] is model.weights["model.embed_tokens.weight"]
    halved = {n: w for n, w in model.weights.items() if n != "lm_head.weight"}
    fresh = LlamaModel(model.config, halved)  # ties lm_head to the new embedding itself
    np.testing.assert_array_equal(model.logits(tokens), fresh.logits(tokens))
    model.set_weight("model.embed_tokens.weight", emb)
    np.testing.assert_array_equal(model.logits(tokens), base)
    with pytest.raises(KeyError, match="no weight named"):
        model.set_weight("model.layers.9.self_attn.k_proj.weight", orig)


def test_sampling_is_reproducible(model):
    a = model.generate(None, max_new_tokens=40, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(None, max_new_tokens=40, temperature=1.0, top_p=0.9, seed=7)
    c = model.generate(None, max_new_tokens=40, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match=r"tokens\[1\] = 512 is outside the vocabulary \[0, 512\)"):
        model.logits([1, 512])
    with pytest.raises(ValueError, match=r"tokens\[0\] = -3 is outside the vocabulary"):
        model.logits([-3])
    with pytest.raises(ValueError, match="tokens is empty"):
        model.logits([])
    with pytest.raises(TypeError, match="tokens must be a 1-D sequence of ints"):
        model.logits([1.5, 2.0])
    with pytest.raises(ValueError, match="513 tokens exceed the context of 512 tokens"):
        model.logits([1] * 513)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate("")
    with pytest.raises(ValueError, match="prompt has 600 tokens but the context holds 512"):
        model.generate_ids([1] * 600)
    with pytest.raises(ValueError, match=r"pos must be between 0 and the \d+ positions already cached"):
        model._rt.forward(np.array([1]), 10_000, False)
    data = MODEL.read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated or not a llama2.c legacy checkpoint"):
        LlamaModel.from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlamaModel.from_pretrained(tmp_path / "missing.bin")


def test_llama2c_tokenizer_round_trip():
    tok = Llama2cTokenizer(TOK)
    assert tok.vocab_size == 512
    for text in ("Once upon a time, there was a big dog.", "Zoë's café — 東京 🎉!", "a\nb\tc"):
        ids = tok.encode(text)
        assert ids[0] == 1
        assert tok.decode(ids) == text
    # byte fallback: characters outside the 512 pieces become <0xXX> tokens (id = byte + 3)
    ids = tok.encode("東", bos=False)
    assert ids[1:] == [b + 3 for b in "東".encode()]
