"""KV-cache budgets: bases for K and V, rank allocation that hits a budget,
and applying a latent or quantised cache to a model.

The unit is the byte. The reference is the model's own 16-bit cache: per
token and layer, 2 x num_key_value_heads x head_dim values of 2 bytes. A
latent cache holds, per layer, the coefficients of the layer's input in a
K/V basis: one latent shared by K and V (``shared-kv``, DeepSeek's MLA
cache) or one each (``separate``, Palu's). Its values cost 2 bytes at 16
bits, or b/8 bytes plus a float16 scale and minimum (4 bytes) per group of
QUANT_GROUP values when quantised to b bits. The quantised-cache baselines
(``kv-int8`` ...) round K and V themselves, in the same groups.

Bases, per group of stacked matrices W (k_proj and v_proj of a layer, or
one of them):
- ``weights``: PCA of W's rows (centered, with its mean as one more latent
  value, or not), the original experiment's basis;
- ``activations``: the leading eigenvectors U of W Σ Wᵀ, Σ = E[h hᵀ] over
  calibration inputs: Ŵ = U_r U_rᵀ W minimises E‖(W − Ŵ)h‖² (a PCA of the
  K/V outputs; SVD-LLM's whitening gives the same subspace), and the error
  is the sum of the dropped eigenvalues.
K/V balancing (TransMLA's balance_kv_ratio): K's rows are scaled by α before
a shared fit and back after; α = "auto" equalises K's and V's energy in the
basis's own metric (‖W‖² for weights, E‖W h‖² for activations). "attn"
(activations only) goes further: K's error is weighted by the query energy
that meets each channel (its effect on the attention scores) and V's by
o_proj (its effect on the layer output), then both are equalised.

Allocators, all exact to one component per layer:
- ``uniform``: the same budget in every layer; for separate bases the
  layer's split between K and V follows their spectra (the components with
  the largest relative error weight win);
- ``variance``: one global threshold on each group's cumulative explained
  fraction (the original experiment's rule), placed exactly at the budget;
- ``greedy``: water-filling over all layers: keep the components whose
  removal would cost the most, by Eckart–Young's error (each eigenvalue, in
  the basis's metric: calibration-weighted for ``activations``), normalised
  by its group's total so that layers compare;
- ``sensitivity``: greedy with each group's normalised error weighted by a
  measured sensitivity (Fisher-style, one probe per group): the KL on the
  calibration text when that group alone is cut to half its components,
  per unit of its normalised error. Costs one evaluation of the probe text
  per group, once per basis.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _C
from .pca import StackedPCA
from .surgery import proj_name

if TYPE_CHECKING:
    from .calibrate import Calibration
    from .model import LlamaModel

LATENT_MODES = ("separate", "shared-kv")
QUANT_MODES = {"kv-int8": 8, "kv-int4": 4, "kv-int3": 3, "kv-int2": 2}
BUDGET_MODES = LATENT_MODES + tuple(QUANT_MODES)
BASES = ("weights", "activations")
ALLOCS = ("uniform", "variance", "greedy", "sensitivity")
QUANTIZERS = ("per-token", "per-channel-k")
QUANT_GROUP = 32    # values per quantisation group (tokens per group for per-channel K)
DENSE_BYTES = 2     # the reference cache holds 16-bit values
GROUP_BYTES = 4     # a float16 scale and a float16 minimum per group


def latent_bytes(n: int, bits: int, group: int = QUANT_GROUP) -> float:
    """Bytes per token of a latent of n values at `bits` (16: float16)."""
    if n <= 0:
        return 0.0
    if bits >= 16:
        return DENSE_BYTES * n
    return n * bits / 8 + GROUP_BYTES * math.ceil(n / group)


def dense_kv_bytes(config: Any) -> float:
    """Bytes per token of the model's own 16-bit K/V cache, all layers."""
    return DENSE_BYTES * 2 * config.kv_dim * config.num_hidden_layers


def quant_kv_bytes(config: Any, bits: int, quantizer: str = "per-token",
                   group: int = QUANT_GROUP) -> float:
    """Bytes per token of a K/V cache quantised to `bits`: per token, each
    row of kv_dim values in groups of `group` (the last one shorter) with a
    float16 scale and minimum per group; with "per-channel-k", K's scale and
    minimum are per channel and per `group` tokens (kv_dim x 4 / group bytes
    per token, amortised) and V stays per token."""
    D = config.kv_dim
    per_token = D * bits / 8 + GROUP_BYTES * math.ceil(D / group)
    k = D * bits / 8 + GROUP_BYTES * D / group if quantizer == "per-channel-k" else per_token
    return (k + per_token) * config.num_hidden_layers


# -------------------------------------------------------------------- bases

@dataclass
class Basis:
    """One group's basis: Ŵ_n = Z_n[:, :k] @ C[:k] (+ mean_n) for each member n.

    values : (r,) error weight of each component, descending (eigenvalues
        in the basis's metric); total : their sum (the error at rank 0).
    mean_terms : latent values beyond the components (1 for a centered
        weight PCA: the mean's coefficient mᵀh; else 0).
    """

    label: str
    layer: int
    names: list[str]
    basis: str
    alpha: float
    values: np.ndarray
    total: float
    C: np.ndarray                        # (r, D) float32
    Z: list[np.ndarray]                  # per member (rows_n, r) float32
    mean: np.ndarray | None = None       # (D,) float32: member n adds mean * scales[n]
    scales: list[float] = field(default_factory=list)

    @property
    def mean_terms(self) -> int:
        return 0 if self.mean is None else 1

    @property
    def max_k(self) -> int:
        return int(self.C.shape[0])

    def reconstruct(self, k: int) -> list[np.ndarray]:
        """Every member rebuilt from the first k components."""
        D = self.C.shape[1]
        return [_C.pca_reconstruct(Z[:, :k], self.C,
                                   self.mean * np.float32(sc) if self.mean is not None
                                   else np.zeros(D, np.float32))
                for Z, sc in zip(self.Z, self.scales)]

    def factors(self, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """down (k + mean_terms, D) and, per member, up (rows_n, k + mean_terms):
        the latent is down @ h, member n's output up_n @ latent."""
        down = self.C[:k]
        ups = [Z[:, :k] for Z in self.Z]
        if self.mean is not None:  # one more latent value, meanᵀh
            down = np.vstack([down, self.mean[None, :]])
            ups = [np.hstack([u, np.full((u.shape[0], 1), sc, np.float32)])
                   for u, sc in zip(ups, self.scales)]
        return np.ascontiguousarray(down, np.float32), [np.ascontiguousarray(u, np.float32)
                                                        for u in ups]

    def error(self, k: int) -> float:
        """The error at rank k in the basis's own metric: the sum of the
        dropped eigenvalues."""
        return float(self.values[k:].sum())


def _label(layer: int, names: list[str]) -> str:
    """A group's label, e.g. "L3 k|v" for layer 3's stacked k_proj and v_proj."""
    return f"L{layer} " + "|".join(n.split(".")[-2][0] for n in names)


class Bases:
    """Builds and keeps the bases of a model's K/V groups: each (group,
    basis, balance) is fitted once, whatever the budgets and allocators that
    use it. ``fit_count`` counts the decompositions."""

    def __init__(self, model: LlamaModel, calibration: Calibration | None = None,
                 center: bool = True, probe: Any = None) -> None:
        self.model = model
        self.calibration = calibration
        self.center = bool(center)
        self.probe = probe  # an Evaluator on calibration text, for alloc "sensitivity"
        self.fit_count = 0
        self.gram_count = 0
        self.probe_count = 0
        self._sens: dict[tuple, list[list[float]]] = {}
        self._grams: dict[tuple, np.ndarray] = {}
        self._cache: dict[tuple, Basis] = {}

    def groups(self, mode: str, basis: str, balance: str | float = "auto") -> list[list[Basis]]:
        """Per layer, the bases of `mode`: [k|v] for shared-kv, [k, v] for separate."""
        if mode not in LATENT_MODES:
            raise ValueError(f"mode must be one of {', '.join(LATENT_MODES)}; got {mode!r}")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {', '.join(BASES)}; got {basis!r}")
        if basis == "activations" and self.calibration is None:
            raise ValueError("basis 'activations' needs a calibration")
        out = []
        for layer in range(self.model.config.num_hidden_layers):
            k, v = proj_name(layer, "k"), proj_name(layer, "v")
            if mode == "shared-kv":
                out.append([self.get(layer, [k, v], basis, balance)])
            else:
                out.append([self.get(layer, [k], basis, 1.0), self.get(layer, [v], basis, 1.0)])
        return out

    def sensitivity(self, mode: str, basis: str, balance: str | float = "auto",
                    ks: list[list[int]] | None = None) -> list[list[float]]:
        """Per layer and group: the KL on the probe (calibration) text when
        that group alone keeps ks[layer][group] components (default half of
        them), divided by its normalised error there; measured once per
        (mode, basis, balance, ks)."""
        key = (mode, basis, balance, None if ks is None else tuple(map(tuple, ks)))
        if key in self._sens:
            return self._sens[key]
        if self.probe is None:
            raise ValueError("alloc 'sensitivity' needs a probe evaluator on calibration text")
        groups = self.groups(mode, basis, balance)
        out = []
        m = self.model
        for li, layer in enumerate(groups):
            row = []
            for gi, g in enumerate(layer):
                k = max(1, g.max_k // 2) if ks is None else ks[li][gi]
                # a group that keeps (nearly) everything has no error to measure
                # against: probe it where it loses something
                k = min(k, max(1, g.max_k - 1))
                rel = g.error(k) / g.total if g.total > 0 else 0.0
                if rel <= 1e-9:
                    row.append(float("nan"))
                    continue
                originals = {n: m.stored_weight(n) for n in g.names}
                with m.lock:
                    try:
                        for n, R in zip(g.names, g.reconstruct(k)):
                            m.set_weight(n, R, check_finite=False)
                        kl = self.probe.evaluate().kl
                    finally:
                        for n, W in originals.items():
                            m.set_weight(n, W, check_finite=False)
                self.probe_count += 1
                row.append(max(kl, 0.0) / rel)
            out.append(row)
        # a group with nothing to measure (an exact low-rank one) weighs as the median
        med = float(np.nanmedian([x for r in out for x in r])) if any(
            not math.isnan(x) for r in out for x in r) else 1.0
        out = [[med if math.isnan(x) else x for x in r] for r in out]
        self._sens[key] = out
        return out

    def alpha(self, layer: int, names: list[str], basis: str, balance: str | float) -> float:
        """K's row scale for a stacked [k; v] group."""
        if len(names) == 1 or balance in ("off", None):
            return 1.0
        if balance != "auto":
            a = float(balance)
            if not (a > 0 and math.isfinite(a)):
                raise ValueError(f"balance must be 'auto', 'off' or a positive number, got {balance!r}")
            return a
        W = [self.model.weights[n] for n in names]
        if basis == "weights":
            ek, ev = (float(np.sum(np.square(w, dtype=np.float64))) for w in W)
        else:
            M = self._gram(layer, names)
            rk = W[0].shape[0]
            ek, ev = float(np.trace(M[:rk, :rk])), float(np.trace(M[rk:, rk:]))
        return math.sqrt(ev / ek) if ek > 0 and ev > 0 else 1.0

    def _gram(self, layer: int, names: list[str]) -> np.ndarray:
        key = tuple(names)
        if key not in self._grams:
            assert self.calibration is not None
            W = np.concatenate([self.model.weights[n] for n in names], axis=0)
            self._grams[key] = _C.weighted_gram(W, self.calibration.sigma[layer], "|".join(names))
            self.gram_count += 1
        return self._grams[key]

    def _activation_basis(self, label: str, layer: int, names: list[str], a: float,
                          W: list[np.ndarray], M: np.ndarray, Lm: np.ndarray) -> Basis:
        """min E‖Lm (W − Ŵ) h‖² over rank r: P_r = the top eigenvectors of
        Lm M Lmᵀ (M = W Σ Wᵀ), Ŵ = Lm⁻¹ P_r P_rᵀ Lm W."""
        D = W[0].shape[1]
        ML = Lm @ M @ Lm.T
        vals, P = _C.sym_eig(ML)
        r = min(len(vals), D)
        vals, P = np.maximum(vals[:r], 0.0), P[:, :r]
        Wst = np.concatenate(W, axis=0)
        C = _C.pca_reconstruct((Lm.T @ P).T.astype(np.float32), Wst, np.zeros(D, np.float32))
        U = np.linalg.solve(Lm, P).astype(np.float32)
        Z, row = [], 0
        for w in W:
            Z.append(np.ascontiguousarray(U[row:row + w.shape[0]]))
            row += w.shape[0]
        return Basis(label, layer, list(names), "activations", a, vals, float(np.trace(ML)), C, Z,
                     None, [1.0] * len(W))

    def attn_metric(self, layer: int, names: list[str], M: np.ndarray) -> np.ndarray:
        """The row metric of the "attn" balance, for a stacked [k; v] group:
        K's error weighted by its effect on the attention scores (each RoPE
        pair (i, i + hd/2) by the mean energy of the two query channels
        that meet it, E[q²] = diag(W_q Σ W_qᵀ), over the query heads of
        its KV head, / hd), V's by what o_proj makes of it (Σ_h W_o,hᵀ W_o,h
        over those query heads, as a matrix square root); then K scaled so
        that both carry equal energy, as "auto" does."""
        assert self.calibration is not None
        c = self.model.config
        hd, H, KV = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        G, half = H // KV, hd // 2
        Wq = self.model.weights[proj_name(layer, "q")]
        Wo = self.model.weights[f"model.layers.{layer}.self_attn.o_proj.weight"].astype(np.float64)
        S = self.calibration.sigma[layer]
        eq = np.einsum("ij,jk,ik->i", Wq, S, Wq).reshape(KV, G, hd).sum(1)  # (KV, hd)
        eq = (eq + np.roll(eq, half, axis=1)) / 2 / hd
        lk = np.sqrt(np.maximum(eq.ravel(), 1e-30))
        Lv = np.zeros((KV * hd, KV * hd))
        for g in range(KV):
            blk = Wo[:, g * G * hd:(g + 1) * G * hd].reshape(-1, G, hd)
            Mg = np.einsum("dgi,dgj->ij", blk, blk)
            ev, V = np.linalg.eigh(Mg)
            ev = np.maximum(ev, ev.max() * 1e-8)
            Lv[g * hd:(g + 1) * hd, g * hd:(g + 1) * hd] = (V * np.sqrt(ev)) @ V.T
        n = KV * hd
        ek = float(np.sum(lk[:, None] * M[:n, :n] * lk[None, :]))
        ev_ = float(np.trace(Lv @ M[n:, n:] @ Lv.T))
        a = np.sqrt(ev_ / ek) if ek > 0 and ev_ > 0 else 1.0
        Lm = np.zeros((2 * n, 2 * n))
        Lm[:n, :n] = np.diag(a * lk)
        Lm[n:, n:] = Lv
        return Lm

    def get(self, layer: int, names: list[str], basis: str, balance: str | float) -> Basis:
        if balance == "attn":
            if basis != "activations" or len(names) != 2:
                raise ValueError("balance 'attn' needs the activations basis of a stacked k|v group")
            a = float("nan")  # a full row metric, not one scale
            key = (tuple(names), basis, False, "attn")
            if key not in self._cache:
                W = [self.model.weights[n] for n in names]
                M = self._gram(layer, names)
                self._cache[key] = self._activation_basis(_label(layer, names), layer, names, a, W,
                                                          M, self.attn_metric(layer, names, M))
                self.fit_count += 1
            return self._cache[key]
        a = self.alpha(layer, names, basis, balance)
        key = (tuple(names), basis, self.center if basis == "weights" else False, a)
        if key in self._cache:
            return self._cache[key]
        W = [self.model.weights[n] for n in names]
        scale = [a] + [1.0] * (len(W) - 1) if len(W) > 1 else [1.0]
        label = _label(layer, names)
        if basis == "weights":
            mats = [w * np.float32(s) if s != 1.0 else w for w, s in zip(W, scale)]
            pca = StackedPCA(None, center=self.center).fit(mats)
            Z = [pca.transform(m) / np.float32(s) for m, s in zip(mats, scale)]
            vals = pca.all_explained_variance_ * max(pca.n_samples_ - 1, 1)
            b = Basis(label, layer, list(names), basis, a, vals[:pca.n_components_],
                      float(vals.sum()), pca.components_, Z,
                      pca.mean_ if self.center else None, [1.0 / s for s in scale])
        else:
            Lm = np.diag(np.concatenate([np.full(w.shape[0], sc) for w, sc in zip(W, scale)]))
            b = self._activation_basis(label, layer, names, a, W, self._gram(layer, names), Lm)
        self.fit_count += 1
        self._cache[key] = b
        return b


# --------------------------------------------------------------- allocation

@dataclass
class Allocation:
    """Components kept per layer and group, and what the cache then costs."""

    ks: list[list[int]]            # per layer, per group
    values: int                    # latent values per token, all layers
    bytes: float                   # bytes per token
    fraction: float                # of the dense 16-bit cache
    target_bytes: float


class BudgetError(ValueError):
    """A budget no setting can meet; .smallest is the smallest possible fraction."""

    def __init__(self, message: str, smallest: float) -> None:
        super().__init__(message)
        self.smallest = smallest


def smallest_fraction(groups: Sequence[Sequence[Basis]], config: Any, bits: int = 16) -> float:
    """The smallest budget a latent mode can meet: one component per group."""
    b = sum(latent_bytes(1 + g.mean_terms, bits) for layer in groups for g in layer)
    return b / dense_kv_bytes(config)


def allocate(groups: Sequence[Sequence[Basis]], config: Any, fraction: float, alloc: str,
             bits: int = 16, sensitivity: Sequence[Sequence[float]] | None = None) -> Allocation:
    """Components per group such that the latent cache takes at most
    `fraction` of the dense 16-bit cache (bytes per token), within one
    component of it per layer; at least one component per group.
    sensitivity: per layer and group, the weights of alloc "sensitivity"
    (:meth:`Bases.sensitivity`)."""
    if alloc not in ALLOCS:
        raise ValueError(f"alloc must be one of {', '.join(ALLOCS)}; got {alloc!r}")
    if alloc == "sensitivity" and sensitivity is None:
        raise ValueError("alloc 'sensitivity' needs the measured sensitivities")
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    dense = dense_kv_bytes(config)
    target = fraction * dense
    smallest = smallest_fraction(groups, config, bits)
    if smallest > fraction * (1 + 1e-12):
        raise BudgetError(f"a KV budget of {fraction:g} is below the smallest possible, "
                          f"{smallest:.4g} (one component per group and layer)", smallest)
    ks = [[1] * len(layer) for layer in groups]

    def size(li: int, gi: int, k: int) -> float:
        return latent_bytes(k + groups[li][gi].mean_terms, bits)

    used = sum(size(li, gi, 1) for li, layer in enumerate(groups) for gi in range(len(layer)))

    def order_key(li: int, gi: int, j: int) -> float:
        g = groups[li][gi]
        rel = g.values / g.total if g.total > 0 else np.zeros_like(g.values)
        if alloc == "variance":  # kept iff the cumulative fraction before j is <= t
            return float(rel[:j].sum())
        if alloc == "sensitivity":
            assert sensitivity is not None
            return -float(sensitivity[li][gi] * rel[j])
        return -float(rel[j])    # greedy / uniform: the largest error weight first

    def take(items: Iterable[tuple[float, int, int, int]], budget: float, spent: float) -> float:
        for _, li, gi, j in sorted(items):
            if j != ks[li][gi]:  # components of a group come in order
                continue
            extra = size(li, gi, j + 1) - size(li, gi, j)
            if spent + extra > budget + 1e-9:
                break
            ks[li][gi] = j + 1
            spent += extra
        return spent

    def items_of(layers: Iterable[int]) -> list[tuple[float, int, int, int]]:
        out = []
        for li in layers:
            for gi, g in enumerate(groups[li]):
                for j in range(1, g.max_k):
                    out.append((order_key(li, gi, j), li, gi, j))
        return out

    if alloc == "uniform":
        per_layer = target / len(groups)
        for li, layer in enumerate(groups):
            spent = sum(size(li, gi, 1) for gi in range(len(layer)))
            take(items_of([li]), per_layer, spent)
    else:
        # the order within a group is by j for both keys (values descend, the
        # cumulative sum ascends), so a walk in key order keeps groups whole
        take(items_of(range(len(groups))), target, used)
    total_bytes = sum(size(li, gi, k) for li, layer in enumerate(ks) for gi, k in enumerate(layer))
    values = sum(k + groups[li][gi].mean_terms for li, layer in enumerate(ks)
                 for gi, k in enumerate(layer))
    return Allocation(ks, values, total_bytes, total_bytes / dense, target)


# ----------------------------------------------------------------- applying

def apply_latent(model: LlamaModel, groups: Sequence[Sequence[Basis]], ks: list[list[int]],
                 bits: int = 16, factored: bool = False) -> None:
    """Put a latent K/V cache of these ranks into the model. 16 bits and not
    factored: the dense weights are replaced by their rank-k
    reconstructions (the same outputs a latent cache gives). factored, or
    fewer bits: the model runs the latent path (K and V from each layer's
    latent, which the cache holds; see LlamaModel.set_latent), the latent
    rounded as a `bits` cache would hold it when bits < 16."""
    with model.lock:
        for li, layer in enumerate(groups):
            if bits >= 16 and not factored:
                for g, k in zip(layer, ks[li]):
                    for n, R in zip(g.names, g.reconstruct(k)):
                        model.set_weight(n, R, check_finite=False)
                continue
            if len(layer) == 1:  # shared: one latent, K and V from it
                down, (up_k, up_v) = layer[0].factors(ks[li][0])
                model.set_latent(li, down, up_k, None, up_v)
            else:
                kd, (ku,) = layer[0].factors(ks[li][0])
                vd, (vu,) = layer[1].factors(ks[li][1])
                model.set_latent(li, kd, ku, vd, vu)
        if bits < 16:
            model.set_kv_quant(latent_bits=bits, latent_group=QUANT_GROUP)


def apply_quant(model: LlamaModel, bits: int, quantizer: str) -> None:
    """Quantise the K/V cache: per token in groups of QUANT_GROUP values, or
    K per channel over QUANT_GROUP tokens (KIVI) and V per token."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}; got {quantizer!r}")
    model.set_kv_quant(k_bits=bits, v_bits=bits, group=QUANT_GROUP,
                       k_per_channel=quantizer == "per-channel-k")


def restore(model: LlamaModel, originals: dict[str, np.ndarray]) -> None:
    """Undo apply_latent / apply_quant: original weights, no latents, exact cache."""
    with model.lock:
        for n, W in originals.items():
            if model.stored_weight(n) is not W:
                model.set_weight(n, W, check_finite=False)
        for li in range(model.config.num_hidden_layers):
            model.set_latent(li, None, None)
        model.set_kv_quant()
