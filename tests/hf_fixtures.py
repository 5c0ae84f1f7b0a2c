"""Checkpoints with Hugging Face's exact layout (LlamaForCausalLM,
save_pretrained), random weights, written by transformers itself."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# TinyLlama-1.1B's config.json, the architecture these miniatures copy.
TINYLLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, hidden_act="silu",
)

SMALL_CONFIGS = {
    # TinyLlama's 8:1 query:KV head ratio, untied lm_head
    "gqa8": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=1, vocab_size=320),
    # tied embeddings, non-default rope_theta and rms eps, 2:1
    "tied": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=3, vocab_size=256,
                 tie_word_embeddings=True, rope_theta=5000.0, rms_norm_eps=1e-6),
    # plain multi-head attention with an explicit head_dim != hidden / heads
    "mha_hd": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                   vocab_size=300),
}


def make_hf_model(cfg: dict, seed: int = 0, init_std: float = 0.2,
                  arch: str = "LlamaForCausalLM"):
    """A model of the transformers class `arch` (LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM) with random weights, large enough
    (init_std) that its next-token distributions are peaked rather than
    uniform; norms away from 1 and biases away from 0 (transformers
    initialises them to 1 and 0), so that every tensor matters."""
    import torch
    import transformers

    kw = dict(max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              initializer_range=init_std)
    kw.update(cfg)
    conf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def save_hf(model, folder: Path, dtype: str, sharded: bool) -> Path:
    import torch

    m = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    kw = {"max_shard_size": "40KB"} if sharded else {}
    m.save_pretrained(folder, safe_serialization=True, **kw)
    model.to(torch.float32)
    return folder


def write_safetensors(path: Path, tensors: dict, header_override: dict | None = None,
                      raw_header: bytes | None = None, header_len: int | None = None) -> Path:
    """A hand-made .safetensors file, possibly lying (for the validation tests)."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        dt = {"float32": "F32", "float16": "F16"}[str(arr.dtype)]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if header_override:
        for k, v in header_override.items():
            header.setdefault(k, {}).update(v)
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    n = len(hb) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hb + b"".join(blobs))
    return path


def hf_logits(ref, tokens) -> np.ndarray:
    """transformers' logits (float64 copy) for one sequence of token ids."""
    import torch

    with torch.no_grad():
        return ref(torch.tensor(np.asarray(tokens))[None]).logits[0].double().numpy()


# Both sides compute in float32 with different summation orders: the logits
# (|logits| up to ~7 here) agree to ~2e-6 relative; 2e-5 of the largest
# leaves a 10x margin. bf16 files are compared after the same bf16 -> f32
# widening on both sides, so the dtype does not change the tolerance.
def assert_logits_close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
