"""K/V compression at exactly equal KV-cache bytes: bases, allocators, K/V
balancing, latent widths and the quantised caches, on two trained models, in
one run; then how the calibrated basis depends on the amount of calibration
text, and what calibration costs against a prefill.

Protocol (issue #10):
- stories260K, eval = ../shared/data/tinystories_sample.txt scored per
  document (a BOS each); the demo model, eval = the first 2044 tokens of its
  held-out novel (persuasion.txt, in ../shared/data/austen), windows of 511
  tokens after a BOS;
- calibration = text sampled from the unmodified model (seeds 1,000,000+),
  never the eval text; 2048 tokens unless said otherwise;
- K and V only (q_proj untouched); budgets 75, 50, 37.5, 25, 12.5% of the
  model's own 16-bit K/V cache in bytes per token, plus the exact byte sizes
  of the quantised caches (int8/4/3/2, groups of 32 with float16 scale and
  minimum), so that rank reduction and quantisation meet at equal bytes;
- every combination: separate / shared-kv × weights / activations ×
  uniform / variance / greedy × balance off / auto / attn (shared) × 16-, 8-
  and 4-bit latents; quantised caches per token and with KIVI's per-channel K.
The peer is the field's strongest simple baseline, the quantised cache,
measured in the same run; the ratios are KLs at equal bytes.

Cost: on the TinyLlama-1.1B-shaped random checkpoint of bench_forward.py,
calibration over N tokens against one prefill of the same N tokens with our
forward pass (only the last row's logits, as generation's prefill), best of 3.

Usage: python benchmarks/bench_kv_budget.py [--threads 2] [--out DIR] [--part quality,calib,cost]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("PCASURGERY_SHARED", HERE.parent.parent / "shared"))
BUDGETS = [0.75, 0.5, 0.375, 0.25, 0.125]
MODES = ["separate", "shared-kv", "kv-int8", "kv-int4", "kv-int3", "kv-int2"]


def load(name: str):
    import pcasurgery as ps
    from pcasurgery.calibrate import split_documents

    if name == "stories260K":
        m = ps.LlamaModel.from_pretrained(SHARED / "models" / "stories260K.bin",
                                          tokenizer=SHARED / "models" / "tok512.bin")
        text = (SHARED / "data" / "tinystories_sample.txt").read_text()
        docs = [np.asarray(m.tokenizer.encode(d, bos=False)) for d in split_documents(text)]
        return m, {"docs": docs}, f"tinystories_sample.txt, {len(docs)} documents, per document"
    m = ps.LlamaModel.from_pretrained("demo")
    ids = m.tokenizer.encode((SHARED / "data" / "austen" / "persuasion.txt").read_text(), bos=False)
    return m, {"tokens": np.asarray(ids[:2044])}, "persuasion.txt (held out), first 2044 tokens"


def fmt(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.2e}"


def best(rows, **match):
    rs = [r for r in rows if all((r[k] in v) if isinstance(v, (list, tuple, set)) else r[k] == v
                                 for k, v in match.items())]
    return min(rs, key=lambda r: r["kl"]) if rs else None


def quality(name: str, calib_tokens: int, out: Path | None) -> dict:
    from pcasurgery import budget as B
    from pcasurgery.calibrate import calibrate, first_tokens, sampled_documents
    from pcasurgery.evaluate import Evaluator
    from pcasurgery.experiment import budget_summary, run_budget

    model, ev_in, ev_desc = load(name)
    c = model.config
    ev = Evaluator(model, n_ctx=512, **ev_in)
    docs = sampled_documents(model, calib_tokens)
    cal = calibrate(model, docs, source="sampled")
    # the sensitivity allocator's probe: the first 1024 calibration tokens (as the CLI)
    bases = B.Bases(model, cal, probe=Evaluator(model, n_ctx=512, docs=first_tokens(docs, 1024)))
    t0 = time.perf_counter()
    skipped: list[str] = []
    rows = run_budget(model, ev, bases, modes=MODES, budgets=BUDGETS, basis=list(B.BASES),
                      alloc=list(B.ALLOCS), balance=["off", "auto", "attn"], latent_bits=[16, 8, 4],
                      skipped=skipped)
    secs = time.perf_counter() - t0
    print(f"\n## {name}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads}/{c.num_key_value_heads} heads, head_dim {c.head_dim}; "
          f"dense cache {B.dense_kv_bytes(c):.0f} bytes/token")
    print(f"eval: {ev_desc} ({ev.base_quality.tokens} tokens, perplexity "
          f"{ev.base_quality.perplexity:.3f}); calibration: {cal.tokens} positions sampled from the "
          f"model; {len(rows)} settings from {bases.fit_count} fits in {secs:.0f} s")

    budgets = sorted({round(r["budget"], 6) for r in rows}, reverse=True)
    print("\nBest KL per family at each budget (KL per token vs the unmodified model):\n")
    cols = [
        ("weight-only shared, uniform (the original protocol)",
         dict(mode="shared-kv", basis="weights", alloc="uniform", balance="off", latent_bits=16)),
        ("weight-only, best", dict(basis="weights", latent_bits=16)),
        ("calibrated separate, best", dict(mode="separate", basis="activations", latent_bits=16)),
        ("calibrated shared, best", dict(mode="shared-kv", basis="activations", latent_bits=16)),
        ("latent int8/int4, best", dict(latent_bits=[8, 4])),
        ("quantised K/V, best", dict(quantizer=["per-token", "per-channel-k"])),
    ]
    print("| budget | " + " | ".join(n for n, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for f in budgets:
        at = [r for r in rows if round(r["budget"], 6) == f]
        cells = []
        for _, m in cols:
            b = best(at, **m)
            cells.append("-" if b is None else fmt(b["kl"]))
        print(f"| {f:.1%} | " + " | ".join(cells) + " |")

    at25 = [r for r in rows if round(r["budget"], 6) == 0.25]
    base = best(at25, mode="shared-kv", basis="weights", alloc="uniform", balance="off", latent_bits=16)
    cal_best = best(at25, mode="shared-kv", basis="activations")
    cal16 = best(at25, mode="shared-kv", basis="activations", latent_bits=16)
    g = best(at25, mode="shared-kv", basis="activations", latent_bits=cal_best["latent_bits"],
             balance=cal_best["balance"], alloc="greedy")
    u = best(at25, mode="shared-kv", basis="activations", latent_bits=cal_best["latent_bits"],
             balance=cal_best["balance"], alloc="uniform")
    print(f"\nAt 25%: weight-only shared at uniform ranks KL {fmt(base['kl'])}; best calibrated "
          f"shared {cal_best['label']} KL {fmt(cal_best['kl'])}: {cal_best['kl'] / base['kl']:.3f}x "
          f"(16-bit latent: {cal16['label']} {fmt(cal16['kl'])}, {cal16['kl'] / base['kl']:.3f}x); "
          f"in that setting greedy {fmt(g['kl'])} vs uniform {fmt(u['kl'])} "
          f"({g['kl'] / u['kl']:.3f}x)")

    for mode in ("shared-kv", "separate"):
        bal = "auto" if mode == "shared-kv" else "off"
        print(f"\nAllocators ({mode}, calibrated, 16-bit latent"
              + (", balance auto" if mode == "shared-kv" else "") + "):\n")
        print("| budget | " + " | ".join(B.ALLOCS) + " |")
        print("|---" * (len(B.ALLOCS) + 1) + "|")
        for f in budgets:
            at = [r for r in rows if round(r["budget"], 6) == f]
            cells = [best(at, mode=mode, basis="activations", balance=bal, latent_bits=16, alloc=a)
                     for a in B.ALLOCS]
            if all(cells):
                print(f"| {f:.1%} | " + " | ".join(fmt(x["kl"]) for x in cells) + " |")
    print("\nK/V balance (calibrated shared, greedy, 16-bit latent; weight-only: off / auto):\n")
    print("| budget | act. off | act. auto | act. attn | weights off | weights auto |")
    print("|---|---|---|---|---|---|")
    for f in budgets:
        at = [r for r in rows if round(r["budget"], 6) == f]
        cells = [best(at, mode="shared-kv", basis=b, balance=bal, latent_bits=16, alloc="greedy")
                 for b, bal in (("activations", "off"), ("activations", "auto"), ("activations", "attn"),
                                ("weights", "off"), ("weights", "auto"))]
        if all(cells):
            print(f"| {f:.1%} | " + " | ".join(fmt(x["kl"]) for x in cells) + " |")
    print("\nQuantisation against rank reduction at equal bytes (ratio: KL over the better "
          "quantised cache's):\n")
    print("| bytes | quantised K/V: per token / per-channel K | best 16-bit latent | ratio "
          "| best int8/int4 latent | ratio |")
    print("|---|---|---|---|---|---|")
    for f in budgets:
        at = [r for r in rows if round(r["budget"], 6) == f]
        qs = {r["quantizer"]: r for r in at if r["quantizer"]}
        l16 = best(at, quantizer=None, latent_bits=16)
        lq = best(at, quantizer=None, latent_bits=[8, 4])
        if qs:
            qb = min(qs.values(), key=lambda r: r["kl"])
            # per-channel K has other byte sizes than per-token groups when
            # kv_dim < the group: a budget can have only one of them
            cells = [f"{f:.1%} ({qb['mode']})",
                     " / ".join(fmt(qs[q]["kl"]) if q in qs else "-"
                                for q in ("per-token", "per-channel-k"))]
            for lat in (l16, lq):
                cells += (["-", "-"] if lat is None else
                          [f"{lat['label']}: {fmt(lat['kl'])}", f"{lat['kl'] / qb['kl']:.2f}x"])
            print("| " + " | ".join(cells) + " |")
    print("\nSummary (pcasurgery's own):")
    for line in budget_summary(rows):
        print("  " + line)
    for line in skipped:
        print("  skipped: " + line)
    if out is not None:
        from pcasurgery.plots import save_budget_plots

        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        sub = [r for r in rows if r["quantizer"] or (r["balance"] in ("auto", "off") and
                                                      r["latent_bits"] in (16, 8) and
                                                      r["alloc"] in ("uniform", "greedy"))]
        d = out / name
        d.mkdir(exist_ok=True)
        save_budget_plots(d, sub, f"{name} — eval: {ev_desc}")
    return {"rows": rows}


def calib_sweep(name: str) -> None:
    """KL at 25% against the number of calibration tokens."""
    from pcasurgery import budget as B
    from pcasurgery.calibrate import calibrate, sampled_documents
    from pcasurgery.evaluate import Evaluator

    model, ev_in, _ = load(name)
    ev = Evaluator(model, n_ctx=512, **ev_in)
    D = model.config.hidden_size
    ns = sorted({D, 256, 512, 1024, 2048, 4096, 8192})
    all_docs = sampled_documents(model, max(ns))
    flat = np.concatenate(all_docs)
    ends = np.cumsum([len(d) for d in all_docs])
    originals = dict(model.weights)
    print(f"\n{name}: KL at 25% of the KV cache against calibration tokens (greedy, balance auto, "
          f"16-bit latent; the same sampled text, cut at N):\n")
    print("| tokens | calibrated shared | calibrated separate | weight-only shared (no calibration) |")
    print("|---|---|---|---|")
    wb = B.Bases(model, None)
    for n in ns:
        docs = [d for d in np.split(flat[:n], ends[ends < n]) if len(d)]
        cal = calibrate(model, docs)
        bases = B.Bases(model, cal)
        cells = []
        for mode, bs, basis in (("shared-kv", bases, "activations"), ("separate", bases, "activations"),
                                ("shared-kv", wb, "weights")):
            groups = bs.groups(mode, basis, "auto")
            al = B.allocate(groups, model.config, 0.25, "greedy")
            B.apply_latent(model, groups, al.ks, 16)
            cells.append(ev.evaluate().kl)
            B.restore(model, originals)
        print(f"| {n} | " + " | ".join(fmt(x) for x in cells) + " |")


def cost(threads: int, workdir: Path) -> None:
    """Calibration over N tokens against one prefill of N tokens."""
    sys.path.insert(0, str(HERE))
    from bench_forward import prepare

    import pcasurgery as ps
    from pcasurgery.calibrate import calibrate

    prepare(workdir)
    ps.set_num_threads(threads)
    m = ps.LlamaModel.from_pretrained(workdir)
    c = m.config
    print(f"\ncost on the TinyLlama-shaped checkpoint ({c.num_hidden_layers} layers, hidden "
          f"{c.hidden_size}), {threads} threads, best of 3:\n")
    print("| N tokens | prefill (s) | calibration (s) | ratio |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in (512, 2048):
        toks = rng.integers(3, c.vocab_size, n - 1)
        win = np.concatenate([[c.bos_token_id], toks])
        pre, calt = [], []
        for _ in range(3):
            with m.lock:
                m._rt.reset()
                t0 = time.perf_counter()
                m._rt.forward(win, 0, False)
                pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            calibrate(m, [toks], n_ctx=n)
            calt.append(time.perf_counter() - t0)
        print(f"| {n} | {min(pre):.2f} | {min(calt):.2f} | {min(calt) / min(pre):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="rows (JSON) and plots go here")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--part", default="quality,calib,cost",
                    help="which parts to run (the cost part times a prefill: run it alone on a "
                         "quiet machine)")
    ap.add_argument("--workdir", type=Path,
                    default=Path(os.environ.get("TMPDIR", "/tmp")) / "pcasurgery-bench" / "tinyllama-random")
    args = ap.parse_args()
    import pcasurgery as ps

    ps.set_num_threads(args.threads)
    t0 = time.perf_counter()
    parts = set(args.part.split(","))
    if "quality" in parts:
        for name in ("stories260K", "demo"):
            quality(name, args.calib_tokens, args.out)
    if "calib" in parts:
        for name in ("stories260K", "demo"):
            calib_sweep(name)
    if "cost" in parts:
        cost(args.threads, args.workdir)
    print(f"\n(one run, {time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
