"""Factored checkpoints: a surgered model written as its factors, so that
loading it runs the latent path (and holds the latent cache) at once.

A Hugging Face folder (config.json, model.safetensors in float32, the
tokenizer files) where a factored layer's projections are replaced by
their factors, named as DeepSeek-V2 names its MLA tensors where they fit:

- one latent shared by K and V: ``self_attn.kv_a_proj.weight`` (r, D), the
  down-projection, and ``self_attn.kv_b_proj.weight`` (2 kv_dim, r), the
  up-projections of K (its first kv_dim rows) and V (the rest);
- separate latents: ``k_a_proj``/``k_b_proj`` and ``v_a_proj``/``v_b_proj``;
- a factored q_proj: ``q_a_proj`` (rq, D) and ``q_b_proj`` (H head_dim, rq).

Where DeepSeek-V2 differs: its kv_lora_rank is one int and its RoPE is
decoupled (a few rotated dimensions outside the latent, qk_rope_head_dim);
here RoPE stays on the whole head (keys are rebuilt from the latent and then
rotated), ranks are per layer (``kv_lora_rank``, ``k_lora_rank``,
``v_lora_rank``, ``q_lora_rank``: lists, 0 where a layer has none), a PCA's
mean is one more latent value (folded into the factors), kv_b_proj is [K of
all heads; V of all heads] rather than interleaved per head, and biases stay
dense (``k_proj.bias``). ``config.json`` keeps the model's own architecture
and adds ``pcasurgery_factored``: transformers does not load these folders;
:meth:`pcasurgery.LlamaModel.from_pretrained` does. Today's dense ``--save``
stays the export that transformers loads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .config import LlamaConfig
    from .model import LlamaModel

KEY = "pcasurgery_factored"
FORMAT = 1
RANK_KEYS = ("q_lora_rank", "kv_lora_rank", "k_lora_rank", "v_lora_rank")


def _attn(layer: int, what: str) -> str:
    return f"model.layers.{layer}.self_attn.{what}.weight"


def layout(d: dict, config: LlamaConfig, where: str = "config.json") -> list[dict[str, int]] | None:
    """Per layer the ranks a factored config.json declares ({"q", "kv", "k",
    "v"} -> rank, 0 = none), or None for a dense folder. ValueError naming
    the key for anything inconsistent."""
    if KEY not in d:
        return None
    meta = d[KEY]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {KEY} must be an object with format {FORMAT}, got {meta!r}")
    L = config.num_hidden_layers
    ranks: dict[str, list[int]] = {}
    for k in RANK_KEYS:
        v = d.get(k, [0] * L)
        if (not isinstance(v, list) or len(v) != L
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v)):
            raise ValueError(f"{where}: {k} must be a list of {L} ints >= 0 (one per layer), "
                             f"got {v!r}")
        ranks[k] = v
    out = []
    D = config.hidden_size
    kv_most = max(2 * config.kv_dim + 2, D + 1)
    for layer in range(L):
        r = {k.split("_")[0]: ranks[k][layer] for k in RANK_KEYS}
        if r["kv"] and (r["k"] or r["v"]):
            raise ValueError(f"{where}: layer {layer} has both kv_lora_rank and k/v_lora_rank; "
                             "a layer's latent is shared or separate")
        if r["q"] > D + 1 or r["kv"] + r["k"] + r["v"] > kv_most:
            raise ValueError(f"{where}: layer {layer}'s ranks {r} exceed what a latent can "
                             f"hold (q at most {D + 1}, k and v together {kv_most})")
        out.append(r)
    return out


def expected_shapes(config: LlamaConfig, lay: list[dict[str, int]]) -> dict[str, tuple]:
    """Every tensor a factored folder holds, with its shape: the dense
    model's, less each factored projection, plus its factors."""
    from .config import expected_shapes as dense_shapes

    shapes = dict(dense_shapes(config))
    D, Dkv = config.hidden_size, config.kv_dim
    Dq = config.num_attention_heads * config.head_dim
    for layer, r in enumerate(lay):
        if r["q"]:
            del shapes[_attn(layer, "q_proj")]
            shapes[_attn(layer, "q_a_proj")] = (r["q"], D)
            shapes[_attn(layer, "q_b_proj")] = (Dq, r["q"])
        if r["kv"]:
            del shapes[_attn(layer, "k_proj")], shapes[_attn(layer, "v_proj")]
            shapes[_attn(layer, "kv_a_proj")] = (r["kv"], D)
            shapes[_attn(layer, "kv_b_proj")] = (2 * Dkv, r["kv"])
        for p in ("k", "v"):
            if r[p]:
                del shapes[_attn(layer, f"{p}_proj")]
                shapes[_attn(layer, f"{p}_a_proj")] = (r[p], D)
                shapes[_attn(layer, f"{p}_b_proj")] = (Dkv, r[p])
    return shapes


def assemble(config: LlamaConfig, lay: list[dict[str, int]], weights: dict[str, np.ndarray]
             ) -> tuple[dict[str, np.ndarray], dict[int, dict[str, tuple]]]:
    """The dense weights (each factored projection rebuilt as up @ down, so
    that the model is whole; `weights` is changed in place: the factors
    leave it) and, per factored layer, the factors to run (as
    :func:`apply_factors` takes them)."""
    from .dtypes import from_bf16_bits

    def take(n: str) -> np.ndarray:
        a = weights.pop(n)
        return from_bf16_bits(a) if a.dtype == np.uint16 else np.ascontiguousarray(a, np.float32)

    factors: dict[int, dict[str, tuple]] = {}
    Dkv = config.kv_dim
    for layer, r in enumerate(lay):
        f: dict[str, tuple] = {}
        if r["q"]:
            f["q"] = (take(_attn(layer, "q_a_proj")), take(_attn(layer, "q_b_proj")))
            weights[_attn(layer, "q_proj")] = f["q"][1] @ f["q"][0]
        if r["kv"]:
            down, up = take(_attn(layer, "kv_a_proj")), take(_attn(layer, "kv_b_proj"))
            f["kv"] = (down, np.ascontiguousarray(up[:Dkv]), np.ascontiguousarray(up[Dkv:]))
            weights[_attn(layer, "k_proj")] = f["kv"][1] @ down
            weights[_attn(layer, "v_proj")] = f["kv"][2] @ down
        for p in ("k", "v"):
            if r[p]:
                f[p] = (take(_attn(layer, f"{p}_a_proj")), take(_attn(layer, f"{p}_b_proj")))
                weights[_attn(layer, f"{p}_proj")] = f[p][1] @ f[p][0]
        if f:
            factors[layer] = f
    return weights, factors


def apply_factors(model: LlamaModel, factors: dict[int, dict[str, tuple]]) -> None:
    """Run each layer from its factors (the latent path): per layer "q"
    (down, up), "kv" (down, up_k, up_v) for one latent shared by K and V,
    or "k" / "v" (down, up) each."""
    for layer, f in sorted(factors.items()):
        if "q" in f:
            model.set_factored_q(layer, *f["q"])
        if "kv" in f:
            down, up_k, up_v = f["kv"]
            model.set_latent(layer, down, up_k, None, up_v)
        elif "k" in f or "v" in f:
            model.set_latent(layer, *f.get("k", (None, None)), *f.get("v", (None, None)))


def save_factored(model: LlamaModel, folder: str | os.PathLike) -> Path:
    """Write `model` as a factored folder: its factored layers' factors (as
    :meth:`LlamaModel.latent_layers` reports them) and every other weight
    dense, all in float32. `folder` must be new or empty."""
    from .export import hf_config, write_hf_folder

    c = model.config
    L = c.num_hidden_layers
    ranks = {k: [0] * L for k in RANK_KEYS}
    tensors: dict[str, Any] = {n: model.stored_weight(n) for n in model.weights
                               if not (n == "lm_head.weight" and c.tie_word_embeddings)}
    for layer in range(L):
        kd, ku, vd, vu, qd, qu = model._rt.factors(layer)
        if qu is not None:
            del tensors[_attn(layer, "q_proj")]
            tensors[_attn(layer, "q_a_proj")], tensors[_attn(layer, "q_b_proj")] = qd, qu
            ranks["q_lora_rank"][layer] = int(qd.shape[0])
        if vu is not None and vd is None:  # one latent for K and V
            del tensors[_attn(layer, "k_proj")], tensors[_attn(layer, "v_proj")]
            tensors[_attn(layer, "kv_a_proj")] = kd
            tensors[_attn(layer, "kv_b_proj")] = np.vstack([ku, vu])
            ranks["kv_lora_rank"][layer] = int(kd.shape[0])
            continue
        for p, down, up in (("k", kd, ku), ("v", vd, vu)):
            if up is not None:
                del tensors[_attn(layer, f"{p}_proj")]
                tensors[_attn(layer, f"{p}_a_proj")], tensors[_attn(layer, f"{p}_b_proj")] = down, up
                ranks[f"{p}_lora_rank"][layer] = int(down.shape[0])
    cfg = hf_config(model, "F32")
    cfg.update(ranks)
    cfg[KEY] = {"format": FORMAT, "note": "pcasurgery's factored layout (pcasurgery/factored.py); "
                "load with pcasurgery.LlamaModel.from_pretrained"}
    return write_hf_folder(model, folder, cfg, tensors, "F32")
