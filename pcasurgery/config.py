"""LlamaConfig: the architecture numbers the forward pass needs, and the weight
layout they imply (names in the C kernel's order, shapes).

One decoder covers the Llama family: LlamaForCausalLM (Llama 1-3.x, TinyLlama,
SmolLM2; RoPE plain, "llama3" or "linear"; optional attention biases),
MistralForCausalLM (a sliding window) and Qwen2ForCausalLM (q/k/v biases)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any

import numpy as np


def _is_int(v: Any) -> bool:
    """An integer that is not a bool (JSON's 16.0 and "16" are not ints)."""
    return isinstance(v, Integral) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (Hugging Face's names).

    hidden_size D, intermediate_size F, num_hidden_layers L,
    num_attention_heads H, num_key_value_heads KV (H % KV == 0), head_dim
    hd (default D / H), vocab_size V, max_position_embeddings (the context),
    rms_norm_eps, rope_theta, tie_word_embeddings.

    architecture: the Hugging Face class (``ARCHITECTURES``), which the
    export writes back. RoPE: rope_type "default", "llama3" (Llama 3.1/3.2:
    rope_factor, rope_low_freq_factor, rope_high_freq_factor,
    rope_original_max_position_embeddings) or "linear" (rope_factor).
    qkv_bias: q_proj, k_proj and v_proj have biases (Qwen2; Llama's
    attention_bias); o_bias: o_proj has one too (Llama's attention_bias).
    sliding_window: attend to the last W positions only (Mistral; 0: none).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    bos_token_id: int = 1
    eos_token_id: int = 2
    architecture: str = "LlamaForCausalLM"
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"config {name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("head_dim", "bos_token_id", "eos_token_id", "sliding_window",
                     "rope_original_max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"config {name} must be an int >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"config {name} must be a positive finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias"):
            if not isinstance(getattr(self, name), bool):  # "false" is not False
                raise ValueError(f"config {name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3":
            if not self.rope_high_freq_factor > self.rope_low_freq_factor:
                raise ValueError("config rope high_freq_factor must exceed low_freq_factor, got "
                                 f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
            if not self.rope_original_max_position_embeddings:
                object.__setattr__(self, "rope_original_max_position_embeddings",
                                   self.max_position_embeddings)
        if self.o_bias and not self.qkv_bias:
            raise ValueError("config o_bias needs qkv_bias (Llama's attention_bias sets both)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"config hidden_size ({self.hidden_size}) is not divisible by "
                    f"num_attention_heads ({self.num_attention_heads}); give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"config head_dim must be even (RoPE pairs), got {self.head_dim}")

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE's inverse frequencies (head_dim/2,) float32, computed as
        transformers' ROPE_INIT_FUNCTIONS do, in float32."""
        hd = self.head_dim
        inv = (1.0 / (np.float32(self.rope_theta)
                      ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.rope_factor)).astype(np.float32)
        if self.rope_type == "llama3":
            f = np.float32(self.rope_factor)
            lo, hi = self.rope_low_freq_factor, self.rope_high_freq_factor
            old = self.rope_original_max_position_embeddings
            low_wavelen, high_wavelen = old / lo, old / hi
            wavelen = np.float32(2 * math.pi) / inv
            scaled = np.where(wavelen > low_wavelen, inv / f, inv).astype(np.float32)
            smooth = ((np.float32(old) / wavelen - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
            smoothed = ((1 - smooth) * scaled / f + smooth * scaled).astype(np.float32)
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    @property
    def kv_dim(self) -> int:
        """Width of k_proj / v_proj outputs: num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "llama3", "linear")

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


# the C runtime's four optional per-layer slots, after the nine weights
BIAS_KEYS = (
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
)


MATRIX_KEYS = tuple(k for k in LAYER_KEYS if "norm" not in k)


def is_matrix(name: str) -> bool:
    """A weight matrix (the embedding, lm_head, the seven projections of a
    layer), which can stay bf16 in memory; norms and biases are float32."""
    return name in ("model.embed_tokens.weight", "lm_head.weight") or name.endswith(MATRIX_KEYS)


def layer_keys(config: LlamaConfig) -> tuple[str, ...]:
    """A layer's tensors: the nine weights, then the biases it has."""
    return LAYER_KEYS + BIAS_KEYS[:3 * config.qkv_bias + config.o_bias]


def runtime_names(config: LlamaConfig) -> list[str]:
    """The C runtime's slots: embedding, final norm, lm_head, then 13 per
    layer (the nine weights and the four bias slots, used or not)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{k}" for k in LAYER_KEYS + BIAS_KEYS]
    return names


def weight_names(config: LlamaConfig) -> list[str]:
    """Every tensor the model has, in the C kernel's order: embedding, final
    norm, lm_head, then each layer's nine weights and its biases."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    keys = layer_keys(config)
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{k}" for k in keys]
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
        "self_attn.q_proj.bias": (Dq,),
        "self_attn.k_proj.bias": (Dkv,),
        "self_attn.v_proj.bias": (Dkv,),
        "self_attn.o_proj.bias": (D,),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}
    keys = layer_keys(config)
    for i in range(config.num_hidden_layers):
        for k in keys:
            shapes[f"model.layers.{i}.{k}"] = per_layer[k]
    return shapes
