"""Plots of a surgery run, readable at a glance and written atomically.

Each function takes the run's result rows (dicts, as in results.json) and
returns a matplotlib Figure (shown when it is a notebook cell's value);
:func:`save_all` writes the PNGs.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

MODE_STYLE = {"separate": ("tab:blue", "o"), "shared-kv": ("tab:red", "s"),
              "shared-kv-xlayer": ("tab:purple", "^"), "seed": ("tab:gray", "x")}


def _by_mode(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["mode"], []).append(r)
    return out


def _style(mode: str) -> dict:
    color, marker = MODE_STYLE.get(mode, ("black", "."))
    return dict(color=color, marker=marker, label=mode)


def quality_vs_threshold(rows: list[dict], title: str) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    a, b = fig.subplots(1, 2)
    for mode, rs in _by_mode(rows).items():
        rs = sorted((r for r in rs if r["var"] is not None), key=lambda r: r["var"])
        if not rs:
            continue
        x = [100 * r["var"] for r in rs]
        a.plot(x, [max(r["kl"], 1e-6) for r in rs], **_style(mode))
        b.plot(x, [r["perplexity"] for r in rs], **_style(mode))
    base = rows[0]["base_perplexity"] if rows else None
    if base:
        b.axhline(base, color="black", ls=":", lw=1, label="unmodified")
    a.set(xlabel="variance kept (%)", ylabel="KL(base ‖ surgered) per token (nats)", yscale="log",
          title="divergence from the unmodified model")
    b.set(xlabel="variance kept (%)", ylabel="perplexity on the eval text", yscale="log",
          title="perplexity")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def quality_vs_budget(rows: list[dict], title: str) -> Figure:
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in (
        (axes[0], "kv_ratio", "KV-cache size per token (fraction of the dense cache)"),
        (axes[1], "params_ratio", "q, k, v parameters (fraction of dense)"),
    ):
        for mode, rs in _by_mode(rows).items():
            rs = sorted(rs, key=lambda r: r[key])
            ax.plot([r[key] for r in rs], [max(r["kl"], 1e-6) for r in rs], **_style(mode))
        ax.set(xlabel=xlabel, ylabel="KL(base ‖ surgered) per token (nats)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("quality at equal KV-cache bytes")
    axes[1].set_title("quality at equal parameter budget")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def components_per_layer(rows: list[dict], title: str) -> Figure:
    """Components kept per layer and matrix, for the strictest setting of each mode."""
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    for mode, rs in _by_mode(rows).items():
        r = min(rs, key=lambda r: r["kv_ratio"])
        color, marker = MODE_STYLE.get(mode, ("black", "."))
        for kind, ls in (("q", "-"), ("k", "--"), ("v", ":"), ("k|v", "-.")):
            per = r["components"].get(kind)
            if per:
                ax.plot(range(len(per)), per, ls=ls, color=color, marker=marker,
                        label=f"{mode}: {kind} ({_setting(r)})")
    ax.set(xlabel="layer", ylabel="components kept", title="components per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def spectra(curves: dict[str, list[list[float]]], title: str) -> Figure:
    """Cumulative explained variance of every group, one panel per kind."""
    kinds = [k for k in ("q", "k", "v", "k|v") if curves.get(k)]
    fig = Figure(figsize=(3.6 * max(len(kinds), 1), 3.8))
    axes = fig.subplots(1, max(len(kinds), 1), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cs = curves[kind]
        for i, c in enumerate(cs):
            ax.plot(range(1, len(c) + 1), [100 * v for v in c],
                    color=colormaps["viridis"](i / max(len(cs) - 1, 1)), lw=1)
        ax.set(xlabel="components", ylabel="cumulative variance (%)", title=f"{kind} (per layer)",
               ylim=(0, 101))
        ax.grid(alpha=0.3)
    fig.suptitle(title + " — colour: layer 0 (dark) to last (light)")
    fig.tight_layout()
    return fig


def quality_vs_kv_budget(rows: list[dict], title: str) -> Figure:
    """KL and perplexity against the achieved KV-cache fraction (bytes per
    token / the dense 16-bit cache): one line per mode × basis × allocator
    (× balance × latent width), the quantised caches as points."""
    from .experiment import row_label

    fig = Figure(figsize=(13, 5.2))
    a, b = fig.subplots(1, 2)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r.get("label") or row_label(r), []).append(r)
    cmap = colormaps["tab20"]
    for i, (label, rs) in enumerate(sorted(lines.items())):
        rs = sorted(rs, key=lambda r: r["kv_fraction"])
        x = [100 * r["kv_fraction"] for r in rs]
        quant = bool(rs[0]["quantizer"])
        style = dict(color="black" if quant else cmap(i % 20), lw=1.2,
                     ls="none" if quant else ("-" if rs[0]["mode"] == "shared-kv" else "--"),
                     marker=("*" if rs[0]["quantizer"] == "per-channel-k" else "P") if quant
                     else ("s" if rs[0]["mode"] == "shared-kv" else "o"),
                     ms=9 if quant else 4, label=label)
        a.plot(x, [max(r["kl"], 1e-6) for r in rs], **style)
        b.plot(x, [r["perplexity"] for r in rs], **style)
    if rows:
        b.axhline(rows[0]["base_perplexity"], color="black", ls=":", lw=1, label="unmodified")
    a.set(xlabel="KV cache (% of the dense 16-bit cache, bytes per token)",
          ylabel="KL(base ‖ compressed) per token (nats)", yscale="log",
          title="divergence from the unmodified model")
    b.set(xlabel="KV cache (% of the dense 16-bit cache, bytes per token)",
          ylabel="perplexity on the eval text", yscale="log", title="perplexity")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    b.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_budget_plots(folder: Path, rows: list[dict], title: str) -> list[str]:
    save_figure(quality_vs_kv_budget(rows, title), folder / "quality_vs_kv_budget.png")
    return ["quality_vs_kv_budget.png"]


def _setting(r: dict) -> str:
    return f"var {r['var']:g}" if r["var"] is not None else f"rank {r['rank']}"


def save_figure(fig: Figure, path: Path) -> None:
    """PNG written to a temporary file and renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; the plot is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_all(folder: Path, rows: list[dict], curves: dict[str, Any], title: str) -> list[str]:
    figs = {
        "quality_vs_threshold.png": quality_vs_threshold(rows, title),
        "quality_vs_budget.png": quality_vs_budget(rows, title),
        "components_per_layer.png": components_per_layer(rows, title),
        "spectra.png": spectra(curves, title),
    }
    for name, fig in figs.items():
        save_figure(fig, folder / name)
    return list(figs)
