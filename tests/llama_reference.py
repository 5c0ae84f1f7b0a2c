"""A slow NumPy Llama forward pass for llama2.c's own layout (interleaved
RoPE, weights exactly as stored in the .bin), independent of pcasurgery's
loader and its rotate_half conversion: the C forward pass is checked against
it tensor by tensor at the output."""
from __future__ import annotations

import numpy as np


def read_llama2c(path):
    hdr = np.fromfile(path, dtype="<i4", count=7)
    dim, hidden, L, H, KV, V, S = (int(x) for x in hdr)
    tied = V > 0
    V = abs(V)
    hd = dim // H
    data = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    shapes = [("emb", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)),
              ("wk", (L, KV * hd, dim)), ("wv", (L, KV * hd, dim)), ("wo", (L, dim, dim)),
              ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)),
              ("w3", (L, hidden, dim)), ("rms_final", (dim,))]
    w, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = data[off:off + n].reshape(shape)
        off += n
    w["cls"] = w["emb"]
    assert tied
    return dict(dim=dim, L=L, H=H, KV=KV, V=V, hd=hd), w


def forward(cfg, w, tokens, eps=1e-5, theta=10000.0, capture=None, quant=None):
    """Logits (T, V) in float64, run.c's math over a whole sequence.

    capture: a list that receives each layer's attention input (after
    RMSNorm), (T, dim). quant: (k_bits, v_bits, group, k_per_channel,
    quantize) simulates a quantised cache: quantize(x (n, m), bits, group,
    per_column) rounds post-RoPE K and V rows (per token, groups of `group`)
    or, with k_per_channel, K per channel over complete groups of `group`
    tokens, which a query sees quantised only before its own group (KIVI)."""
    T, hd, H, KV = len(tokens), cfg["hd"], cfg["H"], cfg["KV"]
    x = w["emb"][tokens]

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    pos = np.arange(T)[:, None]
    freq = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos * freq  # (T, hd/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v, nh):  # v (T, nh*hd), interleaved pairs (2i, 2i+1)
        v = v.reshape(T, nh, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(T, nh * hd)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg["L"]):
        xb = rms(x, w["rms_att"][l])
        if capture is not None:
            capture.append(xb)
        q = rope(xb @ w["wq"][l].T, H).reshape(T, H, hd)
        k2 = rope(xb @ w["wk"][l].T, KV)
        v2 = xb @ w["wv"][l].T
        kq2 = None
        if quant is not None:
            kb, vb, grp, per_channel, qz = quant
            v2 = qz(v2, vb, grp, False)
            if per_channel:
                kq2 = k2.copy()
                for g0 in range(0, T - T % grp, grp):
                    kq2[g0:g0 + grp] = qz(k2[g0:g0 + grp], kb, grp, True)
            else:
                k2 = qz(k2, kb, grp, False)
        k, v = k2.reshape(T, KV, hd), v2.reshape(T, KV, hd)
        out = np.empty((T, H, hd))
        for h in range(H):
            g = h // (H // KV)
            s = q[:, h] @ k[:, g].T / np.sqrt(hd) + mask
            if kq2 is not None:  # columns of closed groups before each query's own
                sq = q[:, h] @ kq2.reshape(T, KV, hd)[:, g].T / np.sqrt(hd) + mask
                closed = np.arange(T)[None, :] < (np.arange(T) // quant[2] * quant[2])[:, None]
                s = np.where(closed, sq, s)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[:, h] = s @ v[:, g]
        x = x + out.reshape(T, -1) @ w["wo"][l].T
        xb = rms(x, w["rms_ffn"][l])
        g1 = xb @ w["w1"][l].T
        x = x + ((g1 / (1 + np.exp(-g1))) * (xb @ w["w3"][l].T)) @ w["w2"][l].T
    return rms(x, w["rms_final"]) @ w["cls"].T
