"""Reading checkpoints into float32 weight arrays named as Hugging Face names them.

Supported so far: llama2.c "legacy" .bin files (stories260K and friends).

Internal conventions: every weight is a C-contiguous float32 NumPy array
keyed by its Hugging Face name (``model.layers.0.self_attn.k_proj.weight``),
row-major (out_features, in_features). RoPE follows Hugging Face's
"rotate_half" layout, so llama2.c's q/k rows, which rotate interleaved pairs,
are permuted at load time exactly as transformers' conversion script does. A
row permutation of Wq or Wk does not change a PCA over their rows.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import LlamaConfig

LAYER_KEYS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def weight_names(config: LlamaConfig) -> list[str]:
    """Every weight name in the C kernel's order: embedding, final norm,
    lm_head, then the nine tensors of each layer."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{k}" for k in LAYER_KEYS]
    return names


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Dq = config.num_attention_heads * config.head_dim
    Dkv = config.kv_dim
    per_layer = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (Dq, D),
        "self_attn.k_proj.weight": (Dkv, D),
        "self_attn.v_proj.weight": (Dkv, D),
        "self_attn.o_proj.weight": (D, Dq),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    return shapes


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Meta/llama2.c/GGUF q or k projection (RoPE on pairs
    (2i, 2i+1) of each head) reordered for Hugging Face's rotate_half RoPE
    (pairs (i, i + hd/2)); transformers' convert_llama_weights_to_hf.permute."""
    rows, cols = w.shape
    hd = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
    )


def load_llama2c(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read a llama2.c legacy checkpoint (.bin, fp32).

    Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len; a negative vocab_size means an untied classifier
    follows), then the tensors in run.c's order, then the RoPE tables
    (ignored). RMSNorm eps 1e-5, RoPE theta 10000 (run.c's constants).
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 28:
        raise ValueError(f"{path} is {size} bytes, too short for a llama2.c header (28)")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(28), dtype="<i4")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in header)
    tied = vocab > 0
    vocab = abs(vocab)
    for name, v in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers),
                    ("n_heads", n_heads), ("n_kv_heads", n_kv), ("vocab_size", vocab),
                    ("seq_len", seq_len)):
        if v <= 0 or v > 1 << 20:
            raise ValueError(f"{path}: header {name}={v} is not a plausible llama2.c value")
    if dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{path}: header dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} "
                         "are inconsistent")
    hd = dim // n_heads
    kv_dim = n_kv * hd
    counts = [
        ("tok_emb", (vocab, dim)), ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)), ("freq_cis", (2, seq_len, hd // 2)),
    ]
    if not tied:
        counts.append(("wcls", (vocab, dim)))
    need = 28 + 4 * sum(int(np.prod(s)) for _, s in counts)
    if size != need:
        raise ValueError(
            f"{path} is {size} bytes but its header (dim={dim}, hidden_dim={hidden}, "
            f"n_layers={n_layers}, vocab_size={vocab}, seq_len={seq_len}, "
            f"{'tied' if tied else 'untied'} classifier) implies {need}: truncated or not a "
            "llama2.c legacy checkpoint"
        )
    data = np.fromfile(path, dtype="<f4", offset=28).astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError(f"{path} contains NaN or Inf weights")
    t: dict[str, np.ndarray] = {}
    off = 0
    for name, shape in counts:
        n = int(np.prod(shape))
        t[name] = data[off:off + n].reshape(shape)
        off += n
    config = LlamaConfig(
        hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=vocab,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": t["tok_emb"],
        "model.norm.weight": t["rms_final"],
    }
    w["lm_head.weight"] = t["tok_emb"] if tied else t["wcls"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = t["rms_att"][i]
        w[p + "self_attn.q_proj.weight"] = interleaved_to_rotate_half(t["wq"][i], n_heads)
        w[p + "self_attn.k_proj.weight"] = interleaved_to_rotate_half(t["wk"][i], n_kv)
        w[p + "self_attn.v_proj.weight"] = t["wv"][i]
        w[p + "self_attn.o_proj.weight"] = t["wo"][i]
        w[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        w[p + "mlp.gate_proj.weight"] = t["w1"][i]
        w[p + "mlp.up_proj.weight"] = t["w3"][i]
        w[p + "mlp.down_proj.weight"] = t["w2"][i]
    return config, w
