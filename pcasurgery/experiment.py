"""One surgery experiment: modes × settings on one model and eval text.

Used by the CLI and the notebook alike; returns plain dict rows (the rows of
results.json / results.csv).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .evaluate import Evaluator
from .model import LlamaModel
from .surgery import Surgery, proj_name


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
        if g.spectrum is not None:
            out.setdefault(g.kind, []).append(np.cumsum(g.spectrum).tolist())
    return out


def run(model: LlamaModel, evaluator: Evaluator, modes: Iterable[str],
        settings: list[tuple[str, float]], *, proj: str = "q,k,v", center: bool = True,
        layers_per_group: int = 0, prompt: str | None = None, max_new_tokens: int = 0,
        chat: bool = False, seed: int = 0, temperature: float = 0.0,
        progress: Callable[..., Any] | None = None,
        fits: dict | None = None, latent: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Apply every (kind, value) setting ("var", 0.3) / ("rank", 16) of every
    mode, evaluate each, restore the model in between. Returns (rows, curves):
    a dict row per mode × setting and each mode's spectra by kind.

    fits: a dict that keeps the decompositions (see :class:`Surgery`), for a
    caller that applies a setting again afterwards (the CLI's --save).
    latent: apply each setting factored (the model runs its latent path and
    caches latents); the rows then carry the cache bytes really allocated."""
    rows: list[dict] = []
    curves: dict[str, Any] = {}
    base = evaluator.base_quality
    fits = {} if fits is None else fits  # groups common to several modes are decomposed once
    dense_bytes = model.kv_cache_bytes()  # the unmodified model's allocated cache
    for mode in modes:
        s = Surgery(model, mode, proj=proj, center=center, layers_per_group=layers_per_group,
                    fits=fits)
        if latent and not s.latent_kv:
            raise ValueError(f"mode {mode!r} with proj {proj!r} leaves K and V dense"
                             + (" (it compresses q_proj only)" if mode == "seed" else "")
                             + ": a latent cache needs k or v in the plan")
        kinds = {k for k, _ in settings}
        keep = (max(v for _, v in settings) if len(kinds) == 1 else None)  # components needed
        s.fit(progress=(lambda it: progress(it, desc=f"fit {mode}", unit="group"))
              if progress else None, keep=keep)
        it = progress(settings, desc=f"evaluate {mode}", unit="setting") if progress else settings
        for kind, value in it:
            st = s.apply(**{kind: value}, factored=latent)
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
                "sample": sample, "latent": bool(latent),
                "kv_cache_bytes": st.kv_cache_bytes if latent else None,
                "kv_cache_dense_bytes": dense_bytes,
            })
            s.restore()
        for kind, per_group in spectra(s).items():  # streaming: known once applied
            curves.setdefault(kind, per_group)
    return rows, curves


def compare_at_equal_budget(rows: list[dict], key: str = "kv_ratio") -> list[str]:
    """Sentences saying which mode has the lower KL where two modes have
    settings of exactly equal budget (`key`: kv_ratio or params_ratio).
    Nothing is interpolated: variance thresholds give each mode its own
    sizes, so they rarely meet, and the sentence then says so and points at
    --kv-budget, which compares modes at exactly equal KV-cache bytes."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["mode"], []).append(r)
    modes = sorted(by)
    out = []
    what = "KV-cache size" if key == "kv_ratio" else "parameter budget"
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            wins_a = wins_b = 0
            for ra in by[a]:
                for rb in by[b]:
                    if not math.isclose(ra[key], rb[key], rel_tol=1e-9, abs_tol=1e-12):
                        continue
                    if ra["kl"] < rb["kl"]:
                        wins_a += 1
                    elif rb["kl"] < ra["kl"]:
                        wins_b += 1
            n = wins_a + wins_b
            if n == 0:
                hint = " (--kv-budget compares them at exactly equal size)" if key == "kv_ratio" else ""
                out.append(f"{a} and {b}: no settings at exactly equal {what}, so no comparison; "
                           f"nothing is interpolated{hint}")
            else:
                w, lo, nw = (a, b, wins_a) if wins_a >= wins_b else (b, a, wins_b)
                out.append(f"at exactly equal {what}, {w} has lower KL than {lo} at {nw} of {n} "
                           "pairs of settings")
    return out


# ------------------------------------------------------------- KV budgets

def row_label(r: dict) -> str:
    """A row's combination, e.g. "shared-kv activations greedy α=auto" or
    "kv-int4 per-channel-k"."""
    if r["quantizer"]:
        return f"{r['mode']} {r['quantizer']}"
    bits = "" if r["latent_bits"] >= 16 else f" int{r['latent_bits']} latent"
    bal = f" balance={r['balance']}" if r["mode"] == "shared-kv" else ""
    return f"{r['mode']} {r['basis']} {r['alloc']}{bal}{bits}"


def budget_points(config: Any, budgets: Iterable[float], modes: Iterable[str],
                  quantizers: Iterable[str] = ("per-token", "per-channel-k")) -> list[float]:
    """The budgets latent modes are evaluated at: the given ones plus the
    exact byte fraction of every quantised mode in `modes` (so that rank
    reduction and quantisation meet at equal bytes), descending."""
    from .budget import QUANT_MODES, dense_kv_bytes, quant_kv_bytes

    pts = {round(float(b), 12) for b in budgets}
    for m in modes:
        if m in QUANT_MODES:
            for q in quantizers:
                pts.add(round(quant_kv_bytes(config, QUANT_MODES[m], q) / dense_kv_bytes(config), 12))
    return sorted((p for p in pts if p <= 1.0), reverse=True)


def run_budget(model: LlamaModel, evaluator: Evaluator, bases: Any, *, modes: Iterable[str],
               budgets: Iterable[float], basis: Iterable[str] = ("weights",),
               alloc: Iterable[str] = ("greedy",), balance: Iterable[Any] = ("auto",),
               latent_bits: Iterable[int] = (16,), quantizers: Iterable[str] = ("per-token",
                                                                                "per-channel-k"),
               q_var: float | None = None,
               progress: Callable[..., Any] | None = None,
               skipped: list[str] | None = None, latent: bool = False) -> list[dict]:
    """Every latent mode × basis × allocator × balance × latent width at
    every budget (plus the quantised modes' own byte fractions), and every
    quantised mode × quantiser, each evaluated against the unmodified model.
    K and V only; q_proj too at variance threshold q_var when given (its own
    axis, the same in every row). Returns one dict row per setting.

    bases: a :class:`pcasurgery.budget.Bases` (its fits serve every row).
    skipped: a list that receives a sentence for every combination that
    cannot meet a budget (fewer bytes than one component per group and
    layer); it gets no row there.
    latent: 16-bit latents run the latent path too (below 16 bits they
    always do), and every row carries the KV-cache bytes the model
    allocated (float32; a quantised mode's simulated cache is dense)."""
    from .budget import (
        LATENT_MODES,
        QUANT_MODES,
        BudgetError,
        allocate,
        apply_latent,
        apply_quant,
        dense_kv_bytes,
        quant_kv_bytes,
        restore,
    )

    c = model.config
    modes, basis, alloc = list(modes), list(basis), list(alloc)
    balance, latent_bits, quantizers = list(balance), list(latent_bits), list(quantizers)
    points = budget_points(c, budgets, modes, quantizers)
    originals = {n: model.stored_weight(n) for layer in range(c.num_hidden_layers)
                 for n in (proj_name(layer, "k"), proj_name(layer, "v"))}
    dense = dense_kv_bytes(c)
    base = evaluator.base_quality
    jobs: list[tuple] = []
    for mode in modes:
        if mode in QUANT_MODES:
            jobs += [(mode, None, None, None, QUANT_MODES[mode], q, None) for q in quantizers]
            continue
        if mode not in LATENT_MODES:
            raise ValueError(f"mode {mode!r} has no KV budget; expected one of "
                             f"{', '.join(LATENT_MODES + tuple(QUANT_MODES))}")
        for b in basis:
            for bal in (balance if mode == "shared-kv" else ["off"]):
                if bal == "attn" and b != "activations":
                    continue  # the attention metric needs the calibration
                for bits in latent_bits:
                    for a in alloc:
                        for f in points:
                            jobs.append((mode, b, a, bal, bits, None, f))
    q_surgery = None
    if q_var is not None:
        q_surgery = Surgery(model, "separate", proj="q").fit(keep=q_var)
    rows: list[dict] = []
    it = progress(jobs, desc="evaluate", unit="setting") if progress else jobs
    for mode, b, a, bal, bits, quantizer, f in it:
        t0 = time.perf_counter()
        if q_surgery is not None:
            q_surgery.apply(var=q_var)
        try:
            if quantizer:
                apply_quant(model, bits, quantizer)
                ranks: list = []
                alphas: list = []
                kv_bytes = quant_kv_bytes(c, bits, quantizer)
                target = kv_bytes / dense
            else:
                groups = bases.groups(mode, b, bal)
                try:
                    sens = None
                    if a == "sensitivity":  # measured where the uniform split would be
                        u = allocate(groups, c, f, "uniform", bits)
                        sens = bases.sensitivity(mode, b, bal, u.ks)
                    al = allocate(groups, c, f, a, bits, sens)
                except BudgetError as e:
                    if skipped is not None:
                        label = row_label({"mode": mode, "basis": b, "alloc": a, "balance": bal,
                                           "latent_bits": bits, "quantizer": None})
                        skipped.append(f"{label} at {f:.1%}: needs at least {e.smallest:.1%}")
                    continue
                apply_latent(model, groups, al.ks, bits, factored=latent)
                ranks = [ks[0] if len(ks) == 1 else list(ks) for ks in al.ks]
                alphas = ([None if math.isnan(layer[0].alpha) else layer[0].alpha for layer in groups]
                          if mode == "shared-kv" else [])
                kv_bytes, target = al.bytes, f
            t_apply = time.perf_counter() - t0
            allocated = model.kv_cache_bytes() if latent else None
            q = evaluator.evaluate()
        finally:
            restore(model, originals)
            if q_surgery is not None:
                q_surgery.restore()
        rows.append({
            "mode": mode, "basis": b, "alloc": a, "balance": None if bal is None else str(bal),
            "latent_bits": bits if not quantizer else None, "quant_bits": bits if quantizer else None,
            "quantizer": quantizer, "budget": target, "kv_fraction": kv_bytes / dense,
            "kv_bytes_per_token": kv_bytes, "kv_dense_bytes_per_token": dense,
            "ranks": ranks, "alpha": alphas, "q_var": q_var, "kv_cache_bytes": allocated,
            "perplexity": q.perplexity, "kl": q.kl, "top1": q.top1, "eval_tokens": q.tokens,
            "base_perplexity": base.perplexity,
            "seconds": {"apply": t_apply, "evaluate": q.seconds},
        })
        rows[-1]["label"] = row_label(rows[-1])
    return rows


def budget_summary(rows: list[dict]) -> list[str]:
    """Sentences: at each budget the best combination and its margin over the
    runner-up; shared vs separate latents at their best; at the quantised
    caches' own sizes, quantisation against rank reduction at equal bytes;
    and, plainly, whether rank reduction (16-bit latents) or a quantised
    latent beats quantising K and V anywhere on the curve."""
    out = []
    by: dict[float, list[dict]] = {}
    for r in rows:
        by.setdefault(round(r["budget"], 6), []).append(r)
    rank_wins: list[str] = []
    qlat_wins: list[str] = []
    points = 0
    for f in sorted(by, reverse=True):
        rs = sorted(by[f], key=lambda r: r["kl"])
        best = rs[0]
        line = f"at {f:.1%} of the KV cache: best {best['label']} (KL {best['kl']:.4g}"
        if len(rs) > 1:
            second = rs[1]
            ratio = second["kl"] / best["kl"] if best["kl"] > 0 else float("inf")
            line += f"), {ratio:.2f}x lower than the runner-up {second['label']} ({second['kl']:.4g})"
        else:
            line += ")"
        out.append(line)
        sh = [r for r in rs if r["mode"] == "shared-kv"]
        se = [r for r in rs if r["mode"] == "separate"]
        if sh and se:
            w, lo = (sh[0], se[0]) if sh[0]["kl"] <= se[0]["kl"] else (se[0], sh[0])
            out.append(f"  {w['mode']} beats {lo['mode']} at their best: KL {w['kl']:.4g} vs "
                       f"{lo['kl']:.4g} ({lo['kl'] / max(w['kl'], 1e-300):.2f}x)")
        qs = [r for r in rs if r["quantizer"]]
        r16 = [r for r in rs if not r["quantizer"] and r["latent_bits"] >= 16]
        rq = [r for r in rs if not r["quantizer"] and r["latent_bits"] < 16]
        if qs and (r16 or rq):
            points += 1
            parts = [f"quantised K/V {qs[0]['label']} KL {qs[0]['kl']:.4g}"]
            if r16:
                parts.append(f"rank reduction {r16[0]['label']} KL {r16[0]['kl']:.4g}")
                if r16[0]["kl"] < qs[0]["kl"]:
                    rank_wins.append(f"{f:.1%}")
            if rq:
                parts.append(f"quantised latent {rq[0]['label']} KL {rq[0]['kl']:.4g}")
                if rq[0]["kl"] < qs[0]["kl"]:
                    qlat_wins.append(f"{f:.1%}")
            out.append("  at equal bytes: " + "; ".join(parts))
    if points:
        out.append("rank reduction alone (16-bit latents) beats quantising K and V at equal bytes: "
                   + (", ".join(rank_wins) if rank_wins else f"nowhere (0 of {points} points)"))
        if any(not r["quantizer"] and r["latent_bits"] < 16 for r in rows):
            out.append("a quantised latent (rank reduction + quantisation) beats quantising K and V "
                       "at equal bytes: " + (", ".join(qlat_wins) if qlat_wins
                                             else f"nowhere (0 of {points} points)"))
    return out
