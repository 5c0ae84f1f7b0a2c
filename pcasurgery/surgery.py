"""Surgery plans: which attention matrices share a PCA, and applying them.

A plan is a list of groups; each group's matrices are stacked by rows and
get one PCA basis (fitted once, whatever the number of settings tried).

Modes:
- ``separate``: q_proj, k_proj and v_proj of every layer each get their own.
- ``shared-kv`` (default): per layer, k_proj and v_proj are stacked into one
  PCA, each rebuilt from the shared components; q_proj has its own.
- ``shared-kv-xlayer``: one K/V basis for each run of ``layers_per_group``
  consecutive layers (0 = all layers); q_proj per layer.
- ``seed``: what the original experiment's code actually did. It grouped
  parameters by ``name.rsplit('.', 1)[0]`` (``...self_attn.k_proj``), so no
  group ever held both k and v and only q_proj was compressed; and it rebuilt
  with ``transform(W)[:, :k] @ components_[:k]``, dropping the mean.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _C
from .model import LlamaModel
from .pca import StackedPCA

MODES = ("separate", "shared-kv", "shared-kv-xlayer", "seed")
PROJS = ("q", "k", "v")


def proj_name(layer: int, p: str) -> str:
    return f"model.layers.{layer}.self_attn.{p}_proj.weight"


@dataclass
class Group:
    """Matrices that share one PCA basis."""

    label: str                 # e.g. "L3 k|v", "L0-21 k|v", "L5 q"
    kind: str                  # "q", "k", "v" or "k|v"
    layers: list[int]
    names: list[str]           # weight names, stacked in this order
    pca: StackedPCA | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> scores, on first use


def plan(config: Any, mode: str = "shared-kv", proj: str | Iterable[str] = PROJS,
         layers_per_group: int = 0) -> list[Group]:
    """The groups of a surgery plan for a model with `config`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if isinstance(proj, str):
        proj = [p.strip() for p in proj.split(",") if p.strip()]
    proj = list(dict.fromkeys(proj))
    bad = [p for p in proj if p not in PROJS]
    if bad or not proj:
        raise ValueError(f"proj must be a non-empty subset of q,k,v; got {','.join(proj) or '(empty)'}")
    if isinstance(layers_per_group, bool) or not isinstance(layers_per_group, int) or layers_per_group < 0:
        raise ValueError(f"layers_per_group must be an int >= 0 (0 = all layers), got {layers_per_group!r}")
    L = config.num_hidden_layers
    groups: list[Group] = []
    if mode == "seed":
        # name.rsplit('.', 1)[0] groups: one module each; only the q_proj
        # groups were ever decomposed by the original code.
        return [Group(f"L{i} q", "q", [i], [proj_name(i, "q")]) for i in range(L)]
    for i in range(L):
        if "q" in proj:
            groups.append(Group(f"L{i} q", "q", [i], [proj_name(i, "q")]))
    kv = [p for p in ("k", "v") if p in proj]
    if mode == "separate" or len(kv) < 2:
        for i in range(L):
            for p in kv:
                groups.append(Group(f"L{i} {p}", p, [i], [proj_name(i, p)]))
        return groups
    g = 1 if mode == "shared-kv" else (layers_per_group or L)
    for start in range(0, L, g):
        layers = list(range(start, min(start + g, L)))
        label = f"L{layers[0]} k|v" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]} k|v"
        names = [proj_name(i, p) for i in layers for p in ("k", "v")]
        groups.append(Group(label, "k|v", layers, names))
    return groups


def max_components(config: Any, mode: str = "shared-kv", proj: str | Iterable[str] = PROJS,
                   layers_per_group: int = 0) -> int:
    """The most components any group of the plan has: min(rows stacked,
    hidden_size). A rank beyond it runs nowhere."""
    from .config import expected_shapes

    shapes = expected_shapes(config)
    return max(min(sum(shapes[n][0] for n in g.names), config.hidden_size)
               for g in plan(config, mode, proj, layers_per_group))


@dataclass
class Setting:
    """What one application of a plan did."""

    mode: str
    var: float | None
    rank: int | None
    ks: dict[str, int]                       # group label -> components kept
    seconds: float = 0.0
    budget: dict[str, float] = field(default_factory=dict)


class Surgery:
    """A plan bound to a model: fit every group once, then apply any number of
    settings (variance thresholds or ranks) in place and restore.

    Parameters
    ----------
    model : LlamaModel
    mode : one of MODES
    proj : which projections to touch, e.g. "q,k,v" or ("k", "v")
    center : centered PCA with the mean restored (True), or uncentered SVD
    layers_per_group : for shared-kv-xlayer (0 = all layers)
    fits : optional dict shared between Surgery objects on the same model: a
        group that another plan already decomposed (e.g. every layer's
        q_proj, alone in both separate and shared-kv) is not fitted again
    """

    def __init__(self, model: LlamaModel, mode: str = "shared-kv", proj: str | Iterable[str] = PROJS,
                 center: bool = True, layers_per_group: int = 0,
                 fits: dict | None = None) -> None:
        self.model = model
        self.mode = mode
        self.center = True if mode == "seed" else bool(center)  # sklearn PCA centers
        self.groups = plan(model.config, mode, proj, layers_per_group)
        self.fit_count = 0
        self._originals = {n: model.weights[n] for g in self.groups for n in g.names}
        self._fits = {} if fits is None else fits  # (names, center, keep) -> (pca, scores)
        self.fit_seconds = 0.0

    # ------------------------------------------------------------------ fit
    def fit(self, progress: Callable[[Iterable], Iterable] | None = None,
            keep: float | int | None = None) -> Surgery:
        """Fit one PCA per group on the original weights (each group once).

        keep: the largest setting that will be applied, a variance fraction
        or a rank; only that many components are computed (the spectrum
        always is whole). None: all of them."""
        t0 = time.perf_counter()
        it = progress(self.groups) if progress else self.groups
        for g in it:
            if g.pca is None:
                n = keep
                if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
                    rows = sum(self._originals[x].shape[0] for x in g.names)
                    n = min(int(keep), rows, self.model.config.hidden_size)
                key = (tuple(g.names), self.center, n)
                if key not in self._fits:  # the scores dict is shared with the fit too
                    self._fits[key] = (StackedPCA(n, center=self.center).fit(
                        [self._originals[x] for x in g.names]), {})
                    self.fit_count += 1
                g.pca, g.scores = self._fits[key]
        self.fit_seconds += time.perf_counter() - t0
        return self

    # ---------------------------------------------------------------- apply
    def ks_for(self, var: float | None = None, rank: int | None = None) -> dict[str, int]:
        """Components each group keeps at a variance threshold or a rank."""
        if (var is None) == (rank is None):
            raise ValueError("give exactly one of var (fraction of variance kept) and rank")
        self._check_fitted()
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
                raise ValueError(f"rank must be a positive int, got {rank!r}")
            most = max(g.pca.max_components_ for g in self.groups)
            if rank > most:
                raise ValueError(f"rank {rank} exceeds the {most} components of the "
                                 "largest group; expected at most that")
        ks = {}
        for g in self.groups:
            if var is not None:
                ks[g.label] = g.pca.n_components_for(var)
            else:
                ks[g.label] = min(int(rank), g.pca.max_components_)
            if ks[g.label] > g.pca.n_components_:
                raise ValueError(
                    f"{g.label} needs {ks[g.label]} components at this setting but the fit kept "
                    f"{g.pca.n_components_}; fit with a larger keep"
                )
        return ks

    def apply(self, var: float | None = None, rank: int | None = None) -> Setting:
        """Replace every planned matrix by its reconstruction (in place; the
        originals are kept and :meth:`restore` puts them back)."""
        t0 = time.perf_counter()
        ks = self.ks_for(var, rank)
        with self.model.lock:  # other threads see the model before or after, never halfway
            for g in self.groups:
                k = ks[g.label]
                # the reconstruction mean: dropped by the original code ("seed"), which
                # rebuilt W as transform(W)[:, :k] @ components_[:k]
                mean = np.zeros_like(g.pca.mean_) if self.mode == "seed" else g.pca.mean_
                for n in g.names:
                    Z = g.scores.get(n)
                    if Z is None:  # scores at every kept rank, once: a setting is one product
                        Z = g.scores[n] = g.pca.transform(self._originals[n])
                    R = _C.pca_reconstruct(Z[:, :k], g.pca.components_, mean)
                    self.model.set_weight(n, R, check_finite=False)
        s = Setting(self.mode, var, rank, ks, time.perf_counter() - t0)
        s.budget = self.budget(ks)
        return s

    def restore(self) -> None:
        """Put the original arrays back (bit-identical: the same arrays)."""
        with self.model.lock:
            for n, W in self._originals.items():
                self.model.set_weight(n, W, check_finite=False)

    # --------------------------------------------------------------- budget
    def budget(self, ks: dict[str, int]) -> dict[str, float]:
        """Storage a factored model would need at these ranks.

        params: over the q, k and v projections of every layer, touched or
        not: each group's basis (k x d) + every member's coefficients
        (rows x k) + the mean (d, when centered), plus the untouched matrices
        at full size, against all of them dense. (So modes that touch
        different matrices compare on the same denominator.)
        kv_latent: floats a latent KV cache holds per token: per layer the
        coefficients of the hidden state in the K/V basis, k for a shared
        K/V basis (+1 for the mean term when centered) or k_K + k_V (+2) for
        separate bases; untouched K or V count their full width. Against
        the dense cache's 2 x num_key_value_heads x head_dim per layer.
        """
        c = self.model.config
        d = c.hidden_size
        touched = {n for g in self.groups for n in g.names}
        dense = factored = 0
        for layer in range(c.num_hidden_layers):
            for p in PROJS:
                size = self.model.weights[proj_name(layer, p)].size
                dense += size
                if proj_name(layer, p) not in touched:
                    factored += size
        for g in self.groups:
            k = ks[g.label]
            rows = sum(self._originals[n].shape[0] for n in g.names)
            factored += k * d + rows * k + (d if self.center else 0)
        kv_dense = 2 * c.kv_dim * c.num_hidden_layers
        kv = 0
        mean_terms = 1 if self.center and self.mode != "seed" else 0
        for layer in range(c.num_hidden_layers):
            for p in ("k", "v"):
                name = proj_name(layer, p)
                owner = next((g for g in self.groups if name in g.names), None)
                if owner is None:
                    kv += c.kv_dim
                elif owner.kind == "k|v":
                    if p == "k":  # one latent serves both K and V
                        kv += ks[owner.label] + mean_terms
                else:
                    kv += ks[owner.label] + mean_terms
        return {"params_factored": float(factored), "params_dense": float(dense),
                "params_ratio": factored / dense if dense else 1.0,
                "kv_latent_per_token": float(kv), "kv_dense_per_token": float(kv_dense),
                "kv_ratio": kv / kv_dense}

    def _check_fitted(self) -> None:
        if any(g.pca is None for g in self.groups):
            raise RuntimeError("call fit() before apply()")
