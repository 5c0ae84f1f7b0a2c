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
# Fits of a whole plan above this many bytes: Surgery goes one group at a
# time (a 7-8B model's q_proj fits alone take ~4 GB)
STREAMING_BYTES = 1 << 30
PROJS = ("q", "k", "v")


def proj_name(layer: int, p: str) -> str:
    return f"model.layers.{layer}.self_attn.{p}_proj.weight"


def _layer_proj(name: str) -> tuple[int, str]:
    """(layer, "q"|"k"|"v") of a proj_name."""
    parts = name.split(".")
    return int(parts[2]), parts[4][0]


@dataclass
class Group:
    """Matrices that share one PCA basis."""

    label: str                 # e.g. "L3 k|v", "L0-21 k|v", "L5 q"
    kind: str                  # "q", "k", "v" or "k|v"
    layers: list[int]
    names: list[str]           # weight names, stacked in this order
    pca: StackedPCA | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> scores, on first use
    spectrum: np.ndarray | None = None  # explained-variance ratio of every component, once fitted


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
    factored: bool = False                   # run from factors (latent cache) or rebuilt dense
    kv_cache_bytes: int | None = None        # allocated by the model, when factored


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
    streaming : one group at a time (True), keeping no fit: each
        :meth:`apply` fits a group, writes its reconstruction and frees the
        fit before the next, so memory holds one group's float32 copies and
        fit, not all of them (a 7-8B model); every setting then fits again.
        False keeps every fit for any number of settings. None (default):
        streaming when the kept fits would exceed STREAMING_BYTES.

    The originals are the arrays the model holds (not copied): a
    bf16-resident model's matrices stay bf16 and are widened to float32 one
    group at a time; the reconstructions are written back rounded to bf16
    (:attr:`written_dtype`), and :meth:`restore` puts the original bits back.
    """

    def __init__(self, model: LlamaModel, mode: str = "shared-kv", proj: str | Iterable[str] = PROJS,
                 center: bool = True, layers_per_group: int = 0,
                 fits: dict | None = None, streaming: bool | None = None) -> None:
        self.model = model
        self.mode = mode
        self.center = True if mode == "seed" else bool(center)  # sklearn PCA centers
        self.groups = plan(model.config, mode, proj, layers_per_group)
        self.fit_count = 0
        self._pending: dict | None = None   # factors recorded while a factored setting applies
        self._factored_layers: set[int] = set()
        self._originals = {n: model.stored_weight(n) for g in self.groups for n in g.names}
        self._fits = {} if fits is None else fits  # (names, center, keep) -> (pca, scores)
        self.fit_seconds = 0.0
        if streaming is None:
            streaming = self.fit_bytes() > STREAMING_BYTES
        self.streaming = bool(streaming)

    @property
    def written_dtype(self) -> str:
        """The dtype reconstructions are written back in: the model's."""
        return self.model.dtype

    def fit_bytes(self) -> int:
        """Bytes every group's kept fit takes (float32 components, mean and
        scores at full rank): what a non-streaming plan holds."""
        d = self.model.config.hidden_size
        total = 0
        for g in self.groups:
            rows = sum(self._originals[n].shape[0] for n in g.names)
            k = min(rows, d)
            total += 4 * (k * d + d + rows * k)
        return total

    def _float32(self, name: str) -> np.ndarray:
        """An original matrix in float32 (a new array for a bf16 one)."""
        from .dtypes import from_bf16_bits

        a = self._originals[name]
        return from_bf16_bits(a) if a.dtype == np.uint16 else a

    def _fit_group(self, g: Group, keep: float | int | None) -> tuple[StackedPCA, dict]:
        n = keep
        if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
            rows = sum(self._originals[x].shape[0] for x in g.names)
            n = min(int(keep), rows, self.model.config.hidden_size)
        key = (tuple(g.names), self.center, n)
        fit = self._fits.get(key)
        if fit is None:
            fit = (StackedPCA(n, center=self.center).fit([self._float32(x) for x in g.names]), {})
            self.fit_count += 1
            if not self.streaming:  # the scores dict is shared with the fit too
                self._fits[key] = fit
        g.spectrum = fit[0].all_explained_variance_ratio_
        return fit

    # ------------------------------------------------------------------ fit
    def fit(self, progress: Callable[[Iterable], Iterable] | None = None,
            keep: float | int | None = None) -> Surgery:
        """Fit one PCA per group on the original weights (each group once).

        keep: the largest setting that will be applied, a variance fraction
        or a rank; only that many components are computed (the spectrum
        always is whole). None: all of them. Streaming: nothing is fitted
        here; each :meth:`apply` fits the groups it needs, one at a time."""
        if self.streaming:
            return self
        t0 = time.perf_counter()
        it = progress(self.groups) if progress else self.groups
        for g in it:
            if g.pca is None:
                g.pca, g.scores = self._fit_group(g, keep)
        self.fit_seconds += time.perf_counter() - t0
        return self

    # ---------------------------------------------------------------- apply
    def ks_for(self, var: float | None = None, rank: int | None = None) -> dict[str, int]:
        """Components each group keeps at a variance threshold or a rank."""
        self._check_setting(var, rank)
        self._check_fitted()
        if rank is not None:
            most = max(g.pca.max_components_ for g in self.groups)
            if rank > most:
                raise ValueError(f"rank {rank} exceeds the {most} components of the "
                                 "largest group; expected at most that")
        return {g.label: self._k(g.pca, g.label, var, rank) for g in self.groups}

    @staticmethod
    def _check_setting(var: float | None, rank: int | None) -> None:
        if (var is None) == (rank is None):
            raise ValueError("give exactly one of var (fraction of variance kept) and rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                                 or rank < 1):
            raise ValueError(f"rank must be a positive int, got {rank!r}")

    @staticmethod
    def _k(pca: StackedPCA, label: str, var: float | None, rank: int | None) -> int:
        k = pca.n_components_for(var) if var is not None else min(int(rank), pca.max_components_)
        if k > pca.n_components_:
            raise ValueError(f"{label} needs {k} components at this setting but the fit kept "
                             f"{pca.n_components_}; fit with a larger keep")
        return k

    @property
    def latent_kv(self) -> bool:
        """Does the plan put K or V into a latent (so that a factored
        application caches latents)? False for ``seed`` (only q_proj) and
        for plans without k or v."""
        return self.mode != "seed" and any(g.kind != "q" for g in self.groups)

    def apply(self, var: float | None = None, rank: int | None = None,
              factored: bool = False) -> Setting:
        """Apply a setting in place; :meth:`restore` undoes it.

        factored=False: every planned matrix is replaced by its
        reconstruction (dense weights, dense cache). factored=True: the
        weights stay as they were and the model runs from the factors
        instead: per group the basis (plus the mean as one more latent
        value) is the down-projection and each member's coefficients the
        up-projection, so K and V come from a latent that the cache holds
        (one per layer for k|v groups, one each for separate k and v) and a
        compressed q_proj runs as two products. Same function as the
        reconstruction, up to float32 rounding."""
        t0 = time.perf_counter()
        with self.model.lock:  # other threads see the model before or after, never halfway
            if factored:  # factors replace the originals' use, not a reconstruction
                self.restore()
            else:
                self._clear_factors()
            self._pending = {} if factored else None
            try:
                if self.streaming:
                    ks = self._apply_streaming(var, rank)
                else:
                    ks = self.ks_for(var, rank)
                    for g in self.groups:
                        self._write(g, g.pca, g.scores, ks[g.label])
                if factored:
                    from .factored import apply_factors

                    self._factored_layers = set(self._pending)  # what restore() clears
                    apply_factors(self.model, self._pending)
            except BaseException:
                self.restore()
                raise
            finally:
                self._pending = None
        s = Setting(self.mode, var, rank, ks, time.perf_counter() - t0, factored=bool(factored))
        s.budget = self.budget(ks)
        if factored:
            s.kv_cache_bytes = int(self.model.kv_cache_bytes())
        return s

    def _write(self, g: Group, pca: StackedPCA, scores: dict, k: int) -> None:
        """Replace g's matrices by their rank-k reconstructions, or, while a
        factored setting is applied (self._pending), record its factors."""
        # the reconstruction mean: dropped by the original code ("seed"), which
        # rebuilt W as transform(W)[:, :k] @ components_[:k]
        mean = np.zeros_like(pca.mean_) if self.mode == "seed" else pca.mean_
        Zs = {}
        for n in g.names:
            Z = scores.get(n)
            if Z is None:  # scores at every kept rank, once: a setting is one product
                Z = scores[n] = pca.transform(self._float32(n))
            Zs[n] = Z
        if self._pending is not None:
            self._record_factors(g, pca, Zs, k)
            return
        for n in g.names:
            R = _C.pca_reconstruct(Zs[n][:, :k], pca.components_, mean)
            self.model.set_weight(n, R, check_finite=False)

    def _record_factors(self, g: Group, pca: StackedPCA, Zs: dict, k: int) -> None:
        """g's factors at rank k, per layer as factored.apply_factors takes
        them: down = the first k components (and the mean, one more latent
        value: its coefficient is meanᵀh), up per member = its first k
        scores (and a column of ones); a k|v group's layers get one latent
        ("kv": down, up_k, up_v)."""
        with_mean = self.mode != "seed" and self.center
        down = pca.components_[:k]
        if with_mean:
            down = np.vstack([down, pca.mean_[None, :]])
        down = np.ascontiguousarray(down, np.float32)
        ups = {}
        for n in g.names:
            up = Zs[n][:, :k]
            if with_mean:
                up = np.hstack([up, np.ones((up.shape[0], 1), np.float32)])
            ups[_layer_proj(n)] = np.ascontiguousarray(up, np.float32)
        for (layer, p), up in ups.items():
            f = self._pending.setdefault(layer, {})
            if g.kind != "k|v":
                f[p] = (down, up)
            elif p == "k":
                f["kv"] = (down, up, ups[layer, "v"])

    def _clear_factors(self) -> None:
        for layer in self._factored_layers:
            self.model.set_latent(layer, None, None)
            self.model.set_factored_q(layer, None, None)
        self._factored_layers = set()

    def _apply_streaming(self, var: float | None, rank: int | None) -> dict[str, int]:
        """Fit, write and free one group at a time (the model is locked
        throughout; an error restores the originals)."""
        self._check_setting(var, rank)
        if rank is not None:  # as ks_for: a rank beyond every group is refused before any fit
            d = self.model.config.hidden_size
            most = max(min(sum(self._originals[n].shape[0] for n in g.names), d)
                       for g in self.groups)
            if rank > most:
                raise ValueError(f"rank {rank} exceeds the {most} components of the "
                                 "largest group; expected at most that")
        keep = var if var is not None else rank  # the components this setting needs
        ks: dict[str, int] = {}
        with self.model.lock:
            try:
                for g in self.groups:
                    t0 = time.perf_counter()
                    pca, scores = self._fit_group(g, keep)
                    self.fit_seconds += time.perf_counter() - t0
                    ks[g.label] = self._k(pca, g.label, var, rank)
                    self._write(g, pca, scores, ks[g.label])
                    del pca, scores
            except BaseException:
                self.restore()
                raise
        return ks

    def restore(self) -> None:
        """Put the original arrays back (bit-identical: the same arrays) and
        the dense path where a factored setting ran."""
        with self.model.lock:
            self._clear_factors()
            for n, W in self._originals.items():
                if self.model.stored_weight(n) is not W:
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
                size = self.model.stored_weight(proj_name(layer, p)).size
                dense += size
                if proj_name(layer, p) not in touched:
                    factored += size
        for g in self.groups:
            k = ks[g.label]
            rows = sum(self._originals[n].shape[0] for n in g.names)  # shapes only
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
        if self.streaming:
            raise RuntimeError("a streaming Surgery keeps no fits: its ranks are known only "
                               "while apply() runs (see Setting.ks)")
        if any(g.pca is None for g in self.groups):
            raise RuntimeError("call fit() before apply()")
