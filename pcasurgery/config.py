"""LlamaConfig: the architecture numbers the forward pass needs, and the weight
layout they imply (names in the C kernel's order, shapes)."""
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

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"config {name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("head_dim", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"config {name} must be an int >= 0, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"config {name} must be a positive finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.tie_word_embeddings, bool):  # "false" is not False
            raise ValueError("config tie_word_embeddings must be true or false, got "
                             f"{self.tie_word_embeddings!r}")
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

    @property
    def kv_dim(self) -> int:
        """Width of k_proj / v_proj outputs: num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
