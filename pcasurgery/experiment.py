"""One surgery experiment: modes × settings on one model and eval text.

Used by the CLI and the notebook alike; returns plain dict rows (the rows of
results.json / results.csv).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .evaluate import Evaluator
from .model import LlamaModel
from .surgery import Surgery


def components_by_kind(s: Surgery, ks: dict[str, int]) -> dict[str, list[int]]:
    """kind -> components kept per layer (a group spanning layers repeats its k)."""
    L = s.model.config.num_hidden_layers
    out: dict[str, list[int]] = {}
    for g in s.groups:
        per = out.setdefault(g.kind, [0] * L)
        for layer in g.layers:
            per[layer] = ks[g.label]
    return out


def spectra(s: Surgery) -> dict[str, list[list[float]]]:
    """kind -> cumulative explained-variance ratio of each group."""
    out: dict[str, list[list[float]]] = {}
    for g in s.groups:
        out.setdefault(g.kind, []).append(np.cumsum(g.pca.all_explained_variance_ratio_).tolist())
    return out


def run(model: LlamaModel, evaluator: Evaluator, modes: Iterable[str],
        settings: list[tuple[str, float]], *, proj: str = "q,k,v", center: bool = True,
        layers_per_group: int = 0, prompt: str | None = None, max_new_tokens: int = 0,
        chat: bool = False, seed: int = 0, temperature: float = 0.0,
        progress: Callable[..., Any] | None = None,
        fits: dict | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Apply every (kind, value) setting ("var", 0.3) / ("rank", 16) of every
    mode, evaluate each, restore the model in between. Returns (rows, curves):
    a dict row per mode × setting and each mode's spectra by kind.

    fits: a dict that keeps the decompositions (see :class:`Surgery`), for a
    caller that applies a setting again afterwards (the CLI's --save)."""
    rows: list[dict] = []
    curves: dict[str, Any] = {}
    base = evaluator.base_quality
    fits = {} if fits is None else fits  # groups common to several modes are decomposed once
    for mode in modes:
        s = Surgery(model, mode, proj=proj, center=center, layers_per_group=layers_per_group,
                    fits=fits)
        kinds = {k for k, _ in settings}
        keep = (max(v for _, v in settings) if len(kinds) == 1 else None)  # components needed
        s.fit(progress=(lambda it: progress(it, desc=f"fit {mode}", unit="group"))
              if progress else None, keep=keep)
        for kind, per_group in spectra(s).items():
            curves.setdefault(kind, per_group)
        it = progress(settings, desc=f"evaluate {mode}", unit="setting") if progress else settings
        for kind, value in it:
            st = s.apply(**{kind: value})
            q = evaluator.evaluate()
            t0 = time.perf_counter()
            sample = (model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                     seed=seed, chat=chat) if max_new_tokens else "")
            t_sample = time.perf_counter() - t0
            comps = components_by_kind(s, st.ks)
            flat = [k for per in comps.values() for k in per]
            rows.append({
                "mode": mode, "var": value if kind == "var" else None,
                "rank": value if kind == "rank" else None,
                "components": comps, "components_mean": float(np.mean(flat)),
                "components_min": int(min(flat)), "components_max": int(max(flat)),
                **st.budget,
                "perplexity": q.perplexity, "kl": q.kl, "top1": q.top1, "eval_tokens": q.tokens,
                "base_perplexity": base.perplexity,
                "seconds": {"fit": s.fit_seconds, "apply": st.seconds, "evaluate": q.seconds,
                            "sample": t_sample},
                "sample": sample,
            })
            s.restore()
    return rows, curves


def compare_at_equal_budget(rows: list[dict], key: str = "kv_ratio") -> list[str]:
    """Sentences saying which mode has the lower KL at equal budget (`key`),
    comparing each pair of modes wherever their budget ranges overlap (KL
    interpolated log-linearly between a mode's own settings)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["mode"], []).append(r)
    modes = sorted(by)
    out = []
    what = "KV-cache size" if key == "kv_ratio" else "parameter budget"
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            ra = sorted(by[a], key=lambda r: r[key])
            rb = sorted(by[b], key=lambda r: r[key])
            xb = np.array([r[key] for r in rb])
            lb = np.log(np.maximum([r["kl"] for r in rb], 1e-12))
            wins_a = wins_b = 0
            for r in ra:
                x = r[key]
                if len(xb) < 2 or not xb[0] <= x <= xb[-1]:
                    continue
                kb = float(np.exp(np.interp(x, xb, lb)))
                if r["kl"] < kb:
                    wins_a += 1
                elif kb < r["kl"]:
                    wins_b += 1
            n = wins_a + wins_b
            if n == 0:
                out.append(f"{a} and {b}: their {what} ranges do not overlap; no comparison "
                           "at equal budget")
            else:
                w, l, nw = (a, b, wins_a) if wins_a >= wins_b else (b, a, wins_b)
                out.append(f"at equal {what}, {w} has lower KL than {l} at {nw} of {n} "
                           "comparable settings")
    return out
