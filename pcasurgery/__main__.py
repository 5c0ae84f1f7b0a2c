"""python -m pcasurgery: PCA surgery on a Llama model's attention, measured.

Examples:
  python -m pcasurgery --var 0.3
  python -m pcasurgery --model path/to/TinyLlama-1.1B-Chat-v1.0 --mode separate,shared-kv --sweep
  python -m pcasurgery --model stories260K.bin --sweep 0.99,0.9,0.5 --out results/
  python -m pcasurgery --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --rank 64 --save surgered/
  python -m pcasurgery --model stories260K.bin --kv-budget 0.25 --eval-text tinystories.txt
  python -m pcasurgery --kv-budget-sweep --alloc uniform,greedy --out results/
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_PROMPT = "It is a truth universally acknowledged"
DEFAULT_SWEEP = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
DEFAULT_BUDGETS = "0.75,0.5,0.375,0.25,0.125"
DEFAULT_BUDGET_MODES = "separate,shared-kv,kv-int8,kv-int4"


class UserError(Exception):
    """A mistake in the command line or its inputs: one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(message)


def fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (variance kept), got {s}")
    return v


def int_at_least(lo: int):
    """argparse type: an int >= lo."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
        return v

    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def fraction_list(s: str) -> list[float]:
    return [fraction(x) for x in s.split(",") if x.strip()]


def build_parser() -> Parser:
    from .lookup import DEFAULT_MODEL_ID
    from .surgery import MODES

    p = Parser(prog="python -m pcasurgery", description=__doc__.split("\n")[0],
               epilog="\n".join(__doc__.split("\n")[2:]),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- defaults, each with its reason
    p.add_argument("--model", default="auto",
                   help="a Hugging Face folder, a model id in the local HF cache, a llama2.c "
                        f".bin file, or 'demo' (the embedded demo model); 'auto' (default): "
                        f"{DEFAULT_MODEL_ID} from the HF cache, else the demo model")
    p.add_argument("--mode", default=None,
                   help=f"comma-separated modes among {', '.join(MODES)}; default shared-kv "
                        "(the original experiment's proposal), or separate,shared-kv with "
                        "--sweep (the comparison it made)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--var", type=fraction, default=None,
                     help="fraction of variance KEPT, in (0, 1]: --var 0.3 keeps 30%% "
                          "(default 0.3 when neither --rank nor --sweep is given)")
    sel.add_argument("--rank", type=positive_int, default=None,
                     help="keep this many components in every group instead")
    sel.add_argument("--sweep", type=fraction_list, nargs="?", const=DEFAULT_SWEEP, default=None,
                     help="several thresholds, e.g. 0.99,0.9,0.5; alone: "
                          + ",".join(map(str, DEFAULT_SWEEP)))
    sel.add_argument("--kv-budget", default=None, metavar="F",
                     help="compare K/V compressions at exactly this size of the KV cache: a "
                          "fraction in (0, 1] of the model's dense 16-bit cache, in bytes per "
                          "token over all layers (K and V only; q_proj untouched unless --proj "
                          "names q)")
    sel.add_argument("--kv-budget-sweep", nargs="?", const=DEFAULT_BUDGETS, default=None,
                     metavar="LIST", help="several KV budgets; alone: " + DEFAULT_BUDGETS +
                     ". The byte sizes of the quantised modes are added, so that rank reduction "
                     "and quantisation meet at equal bytes")
    p.add_argument("--proj", default=None,
                   help="projections to touch (default q,k,v; with a KV budget k,v, and q,k,v "
                        "compresses q_proj too, at --q-var)")
    kv = p.add_argument_group("KV budgets (with --kv-budget or --kv-budget-sweep)")
    kv.add_argument("--alloc", default="greedy",
                    help="rank allocators, comma-separated among uniform (the same latent size "
                         "in every layer), variance (one global variance threshold, the "
                         "original experiment's rule), greedy (water-filling on each "
                         "component's reconstruction error, default) and sensitivity (greedy "
                         "weighted by each group's measured KL on the calibration text: one "
                         "extra evaluation per group)")
    kv.add_argument("--basis", default="weights,activations",
                    help="K/V bases, comma-separated: weights (PCA of the weight rows) and/or "
                         "activations (calibrated: PCA of the K/V outputs on calibration text); "
                         "default both, so the calibrated basis is shown against the weight-only one")
    kv.add_argument("--kv-balance", default="auto",
                    help="K's row scale in a shared K/V fit, comma-separated for several: auto "
                         "(default: equal K and V energy, as TransMLA), off, a positive number, "
                         "or attn (activations basis: K weighted by the query energy it meets, V "
                         "by o_proj, then equal energy)")
    kv.add_argument("--latent-bits", default="16,8",
                    help="widths of the latent cache, comma-separated among 16 (float16), 8, 4, "
                         "3, 2 (default 16,8: a quantised latent is a point on the same bytes axis)")
    kv.add_argument("--quantizer", default="per-token,per-channel-k",
                    help="quantisers of the kv-int modes: per-token (groups of 32 values) and/or "
                         "per-channel-k (K per channel over 32 tokens, as KIVI; V per token); "
                         "default both, the better one is the baseline")
    kv.add_argument("--q-var", type=fraction, default=0.9,
                    help="with a KV budget and q in --proj: variance kept in q_proj (default 0.9)")
    kv.add_argument("--calib-text", type=Path, default=None,
                    help="text for the activation basis (documents may be separated by "
                         "<|endoftext|>); default: text sampled from the unmodified model with "
                         "seeds of its own, never the eval text")
    kv.add_argument("--calib-tokens", type=positive_int, default=None,
                    help="calibration tokens (default 2048, at least the hidden size; the "
                         "first so many of --calib-text)")
    kv.add_argument("--calib-cache", default=None,
                    help="folder for calibrations (default $PCASURGERY_CACHE or "
                         "~/.cache/pcasurgery), or 'off'")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="how the weight matrices are held: bfloat16 (kept bf16 in memory, "
                        "memory-mapped; the kernels compute in float32; a surgery's "
                        "reconstructions are rounded to bf16) or float32 (default: the "
                        "checkpoint's own when it is bf16, else float32)")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 weights memory-mapped from the checkpoint (default), or with "
                        "--no-mmap copied into memory (a slower load, in huge pages; a mapping "
                        "gets 2 MiB pages where the page cache holds the file so, as it does a "
                        "file read afresh)")
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                   help="centered PCA with the mean restored (default) or plain SVD")
    p.add_argument("--layers-per-group", type=nonneg_int, default=0,
                   help="shared-kv-xlayer: layers sharing one K/V basis (0 = all; default 0)")
    p.add_argument("--eval-text", type=Path, default=None,
                   help="text file for perplexity and KL (default: text sampled from the "
                        "unmodified model with --seed, so no data is needed)")
    p.add_argument("--eval-tokens", type=positive_int, default=511,
                   help="cap on eval tokens (default 511: one 512-token window with its BOS, "
                        "about 4 s per setting for TinyLlama on 2 cores)")
    p.add_argument("--prompt", default=None,
                   help="prompt of the before/after sample (default: 'What is machine "
                        "learning?' in the chat template for chat models, '" + DEMO_PROMPT + "' for the "
                        "demo model, else 'Once upon a time')")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=48,
                   help="sample length (default 48; 0 skips the sample)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0: greedy, reproducible)")
    p.add_argument("--seed", type=int, default=0, help="seed for eval text and sampling")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="BLAS threads (default: OpenBLAS's own choice, all cores; at most its "
                        "build's MAX_THREADS)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json, results.csv and PNG plots to this folder")
    p.add_argument("--save", type=Path, default=None,
                   help="write the surgered model (one mode, one setting) as a Hugging Face "
                        "folder; it must be new or empty (a non-empty folder is refused, so "
                        "no stale file can shadow the new weights)")
    p.add_argument("--latent", action="store_true",
                   help="run each setting through the latent path: K and V from each layer's "
                        "latent, which the KV cache holds instead of K and V (a compressed q_proj "
                        "runs as two products); the KV column then reports the bytes the cache "
                        "really allocated. Needs k or v in the plan (not mode seed)")
    p.add_argument("--factored", action="store_true",
                   help="with --save: write the factors (DeepSeek-V2-style kv_a_proj/kv_b_proj, "
                        "per-layer ranks in config.json) instead of dense weights; "
                        "LlamaModel.from_pretrained loads it back, transformers does not")
    p.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    return p


def is_chat_model(model) -> bool:
    """A chat template in the folder's tokenizer_config.json, or "chat" in
    its name (TinyLlama-1.1B-Chat)."""
    from .checkpoints import read_json_object

    src = Path(model.source) if model.source else None
    if src is not None and src.is_dir() and (src / "tokenizer_config.json").exists():
        cfg = read_json_object(src / "tokenizer_config.json", "tokenizer config")
        if "chat_template" in cfg:
            return True
    return "chat" in str(model.source).lower()


def fmt_table(rows: list[dict]) -> str:
    latent = any(r.get("latent") for r in rows)
    kv_head = f"{'KV alloc':>18}" if latent else f"{'KV cache':>10}"
    head = (f"{'mode':18}{'setting':>10}{'comps mean [min-max]':>22}{kv_head}"
            f"{'params':>8}{'ppl':>9}{'KL':>9}{'top-1':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        setting = f"var {r['var']:g}" if r["var"] is not None else f"rank {r['rank']}"
        comps = f"{r['components_mean']:.1f} [{r['components_min']}-{r['components_max']}]"
        if latent:  # bytes the cache allocated, and their share of the dense cache's
            b, d = r["kv_cache_bytes"], r["kv_cache_dense_bytes"]
            kv = f"{b / 2**20:9.1f} MiB {b / d:5.1%}"
        else:
            kv = f"{r['kv_ratio']:>10.1%}"
        lines.append(f"{r['mode']:18}{setting:>10}{comps:>22}{kv:>{len(kv_head)}}"
                     f"{r['params_ratio']:>8.0%}{r['perplexity']:>9.3f}{r['kl']:>9.4f}"
                     f"{r['top1']:>7.1%}")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    cols = ["mode", "var", "rank", "components_mean", "components_min", "components_max",
            "kv_latent_per_token", "kv_dense_per_token", "kv_ratio", "params_factored",
            "params_dense", "params_ratio", "perplexity", "base_perplexity", "kl", "top1",
            "eval_tokens", "latent", "kv_cache_bytes", "kv_cache_dense_bytes"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + ["seconds_evaluate"])
    for r in rows:
        w.writerow([r[c] for c in cols] + [r["seconds"]["evaluate"]])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success; a mistake in the arguments or inputs prints one
    line and returns 2; Ctrl-C prints one line and returns 130 (outputs are
    written atomically, so an interrupted run leaves none behind)."""
    try:
        return _main(argv)
    except UserError as e:
        print(f"pcasurgery: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pcasurgery: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as e:
        if isinstance(e, KeyError) and e.args:
            msg = e.args[0]
        elif isinstance(e, OSError) and e.filename is not None and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = e
        print(f"pcasurgery: error: {msg}", file=sys.stderr)
        return 2


def csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_budget_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The KV-budget run's choices, checked (the budget values themselves
    are checked once the model is known: see check_budgets)."""
    from .budget import ALLOCS, BASES, BUDGET_MODES, QUANTIZERS

    def choose(value: str, allowed: tuple, what: str) -> list[str]:
        got = csv_list(value)
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            raise UserError(f"{what} must be among {', '.join(allowed)}; got {value!r}")
        return list(dict.fromkeys(got))

    modes = choose(args.mode or DEFAULT_BUDGET_MODES, BUDGET_MODES, "--mode (with a KV budget)")
    plan: dict[str, Any] = {
        "modes": modes,
        "alloc": choose(args.alloc, ALLOCS, "--alloc"),
        "basis": choose(args.basis, BASES, "--basis"),
        "quantizers": choose(args.quantizer, QUANTIZERS, "--quantizer"),
    }
    bits = []
    for x in csv_list(args.latent_bits):
        if x not in ("16", "8", "4", "3", "2"):
            raise UserError(f"--latent-bits must be among 16, 8, 4, 3, 2; got {args.latent_bits!r}")
        bits.append(int(x))
    if not bits:
        raise UserError("--latent-bits needs at least one width among 16, 8, 4, 3, 2")
    plan["latent_bits"] = list(dict.fromkeys(bits))
    balance: list[Any] = []
    for x in csv_list(args.kv_balance):
        if x in ("auto", "off", "attn"):
            balance.append(x)
            continue
        try:
            v = float(x)
        except ValueError:
            v = float("nan")
        if not (v > 0 and v < float("inf")):
            raise UserError(f"--kv-balance must be 'auto', 'off', 'attn' or a positive number; "
                            f"got {x!r}")
        balance.append(v)
    if not balance:
        raise UserError("--kv-balance needs a value: auto, off or a positive number")
    plan["balance"] = list(dict.fromkeys(balance))
    proj = csv_list(args.proj or "k,v")
    if sorted(set(proj)) not in (["k", "v"], ["k", "q", "v"]):
        raise UserError(f"--proj with a KV budget must be k,v or q,k,v (K and V are what the "
                        f"budget compresses); got {args.proj!r}")
    plan["q_var"] = args.q_var if "q" in proj else None
    plan["raw_budgets"] = csv_list(args.kv_budget if args.kv_budget is not None
                                   else args.kv_budget_sweep)
    if not plan["raw_budgets"]:
        raise UserError("--kv-budget-sweep needs at least one budget in (0, 1]")
    if args.save:
        raise UserError("--save writes one --var or --rank setting; KV-budget rows are not saved")
    latent = any(m in ("separate", "shared-kv") for m in modes)
    plan["needs_calibration"] = latent and ("activations" in plan["basis"]
                                            or "sensitivity" in plan["alloc"])
    return plan


def check_budgets(plan: dict[str, Any], model) -> list[float]:
    """The budget fractions, each in (0, 1] and no smaller than what the
    most frugal setting of the run can meet (one component per group and
    layer); settings that need more skip that budget, and say so."""
    from .budget import QUANT_MODES, dense_kv_bytes, latent_bytes

    c = model.config
    smallest = float("inf")
    for mode in plan["modes"]:
        if mode in QUANT_MODES:
            continue
        groups = 1 if mode == "shared-kv" else 2  # latents per layer
        for basis in plan["basis"]:
            mean_terms = 1 if basis == "weights" and plan["center"] else 0
            for bits in plan["latent_bits"]:
                b = groups * latent_bytes(1 + mean_terms, bits) * c.num_hidden_layers
                smallest = min(smallest, b / dense_kv_bytes(c))
    if smallest == float("inf"):  # quantised modes only: their own sizes
        smallest = 0.0
    out = []
    for raw in plan["raw_budgets"]:
        try:
            f = float(raw)
        except ValueError:
            f = float("nan")
        if not (smallest <= f <= 1.0) or f <= 0.0:
            raise UserError(f"KV budget {raw!r} is impossible for this model and these modes; "
                            f"expected a fraction in [{smallest:.4g}, 1] (the smallest possible, "
                            f"{smallest:.4g}, keeps one component per group and layer)")
        out.append(f)
    return out


def parse_plan(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, Any]]]:
    """The modes and the (kind, value) settings of a run, checked."""
    from .surgery import MODES

    modes = ([m.strip() for m in args.mode.split(",") if m.strip()] if args.mode
             else (["separate", "shared-kv"] if args.sweep else ["shared-kv"]))
    args.proj = args.proj or "q,k,v"
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--mode must be among {', '.join(MODES)}; got {args.mode!r}")
    if args.sweep is not None and not args.sweep:
        raise UserError("--sweep needs at least one threshold in (0, 1]")
    settings: list[tuple[str, Any]] = (
        [("rank", args.rank)] if args.rank else
        [("var", v) for v in args.sweep] if args.sweep else [("var", args.var or 0.3)])
    if args.save and (len(modes) > 1 or len(settings) > 1):
        raise UserError("--save needs one mode and one setting (--var or --rank)")
    return modes, settings


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads."""
    from .export import check_empty_or_new, check_writable
    from .threads import max_threads

    for path, what in ((args.eval_text, "--eval-text"), (args.calib_text, "--calib-text")):
        if path is not None:
            from .checkpoints import check_regular_file

            try:
                check_regular_file(path, what)
            except (ValueError, FileNotFoundError) as e:
                raise UserError(str(e)) from None
    if (args.eval_text is not None and args.calib_text is not None
            and args.eval_text.resolve() == args.calib_text.resolve()):
        raise UserError("--calib-text and --eval-text are the same file; calibration text must be "
                        "separate from the eval text")
    if args.threads is not None and args.threads > max_threads():
        raise UserError(f"--threads {args.threads}: at most {max_threads()} (the MAX_THREADS "
                        "of pcasurgery's OpenBLAS build)")
    if args.prompt is not None:
        from .tokenizers import check_text

        try:
            check_text(args.prompt, "--prompt")
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.factored and args.save is None:
        raise UserError("--factored writes the factors of --save; give --save DIR")
    for folder, what in ((args.out, "--out"), (args.save, "--save")):
        if folder is not None:
            try:
                check_writable(folder, what)
                if what == "--save":
                    check_empty_or_new(folder, what)
            except ValueError as e:
                raise UserError(str(e)) from None


def load_model(args: argparse.Namespace, say: Callable[..., None]):
    from .lookup import DEMO_DESCRIPTION, resolve_auto
    from .model import LlamaModel

    t0 = time.perf_counter()
    if args.model == "auto":
        path, which = resolve_auto()
    else:
        path = args.model
        which = DEMO_DESCRIPTION if args.model == "demo" else str(args.model)
    # the first line: which model runs, and how to choose another
    say(f"model: {which}; choose another with --model (a Hugging Face folder, a cached model "
        "id, a llama2.c .bin, or 'demo')")
    model = LlamaModel.from_pretrained(path, dtype=args.dtype, mmap=args.mmap)
    if model.tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.model, tokenizer.json or a llama2.c "
                        "tokenizer .bin beside it)")
    c = model.config
    say(f"loaded {model.source} in {time.perf_counter() - t0:.1f} s: {c.num_hidden_layers} "
        f"layers, hidden {c.hidden_size}, {c.num_attention_heads} query / "
        f"{c.num_key_value_heads} KV heads, vocabulary {c.vocab_size}; weights in "
        f"{model.dtype}" + (f", {held(model)} (surgery writes its reconstructions back "
                            "rounded to bf16)" if model.dtype == "bfloat16" else ""))
    return model


def held(model) -> str:
    """How a bf16 model's matrices are held: mapped from the file or copied."""
    from .checkpoints import mapped_page_sizes, mapping_of
    from .config import is_matrix

    mats = [model.stored_weight(k) for k in model.weights if is_matrix(k)]
    n = sum(mapping_of(a) is not None for a in mats)
    if n == 0:
        return "copied into memory"
    how = "memory-mapped" if n == len(mats) else f"{n} of {len(mats)} matrices memory-mapped"
    huge, rss = mapped_page_sizes(mats)
    if rss == 0:  # no /proc/self/smaps to tell
        return how
    return how + f", {huge / 1e9:.2f} of {rss / 1e9:.2f} GB in 2 MiB pages"  # see the README


def text_documents(model, path: Path, what: str, cap: int) -> list[Any]:
    """The documents of a text file (separated by <|endoftext|>; a plain
    text is one), encoded without BOS, the first `cap` tokens in all."""
    import numpy as np

    from .calibrate import split_documents
    from .checkpoints import read_text_file

    docs, have = [], 0
    for d in split_documents(read_text_file(path, what)):
        if have >= cap:
            break
        ids = model.tokenizer.encode(d, bos=False)[: cap - have]
        if ids:
            docs.append(np.asarray(ids, dtype=np.int64))
            have += len(ids)
    if not docs:
        raise UserError(f"{what} {path} is empty")
    return docs


def eval_tokens(args: argparse.Namespace, model) -> tuple[dict[str, Any], str]:
    """The Evaluator's input (tokens=..., or docs=... for a text whose
    documents are separated by <|endoftext|>) and a description of it."""
    from .calibrate import DOC_SEPARATOR
    from .checkpoints import read_text_file
    from .evaluate import default_eval_tokens

    if args.eval_text:
        docs = text_documents(model, args.eval_text, "--eval-text", args.eval_tokens)
        n = sum(len(d) for d in docs)
        if DOC_SEPARATOR in read_text_file(args.eval_text, "--eval-text"):
            return {"docs": docs}, (f"{args.eval_text} ({len(docs)} documents, {n} tokens, each "
                                    "document scored from a BOS of its own)")
        return {"tokens": docs[0]}, f"{args.eval_text} (first {n} tokens)"
    tokens = default_eval_tokens(model, args.eval_tokens, seed=args.seed)
    return {"tokens": tokens}, (f"{len(tokens)} tokens sampled from the unmodified model "
                                f"(seed {args.seed})")


def calibration(args: argparse.Namespace, model, say: Callable[..., None]):
    """The calibration of the activation basis and its documents: --calib-text
    or text sampled from the unmodified model, at most --calib-tokens tokens,
    cached."""
    from .calibrate import (
        CALIB_SEED_BASE,
        DEFAULT_CALIB_TOKENS,
        cache_dir,
        cached_calibrate,
        cached_sampled_documents,
        calibrate,
        model_fingerprint,
        sampled_documents,
    )

    D = model.config.hidden_size
    n = args.calib_tokens or max(DEFAULT_CALIB_TOKENS, D)
    if n < D:
        raise UserError(f"--calib-tokens {n} is below this model's hidden size {D}; expected at "
                        f"least {D} (for a full-rank second moment of the attention input)")
    cache = None if args.calib_cache == "off" else (
        Path(args.calib_cache) if args.calib_cache else cache_dir())
    key = model_fingerprint(model) if cache is not None else None
    if args.calib_text:
        docs = text_documents(model, args.calib_text, "--calib-text", n)
        have = sum(len(d) for d in docs)
        if have < D:
            raise UserError(f"--calib-text {args.calib_text} has {have} tokens; calibrating this "
                            f"model needs at least {D} (its hidden size)")
        source = f"{args.calib_text} (first {have} tokens, {len(docs)} documents)"
    else:
        t0 = time.perf_counter()
        if cache is not None:
            docs, cached = cached_sampled_documents(model, n, args.seed, cache, key)
        else:
            docs, cached = sampled_documents(model, n, seed=args.seed), False
        how = "from the cache" if cached else f"{time.perf_counter() - t0:.1f} s to sample"
        source = (f"{n} tokens sampled from the unmodified model (seeds {CALIB_SEED_BASE + args.seed}"
                  f"..., never the eval text's; {how})")
    if cache is None:
        return calibrate(model, docs, source=source), docs
    return cached_calibrate(model, docs, source, folder=cache, model_key=key), docs


def check_rank(args: argparse.Namespace, model, modes: list[str]) -> None:
    """--rank beyond every group's component count would be reported as a
    rank that never ran: refuse it before any work."""
    from .surgery import max_components

    if args.rank:
        most = max(max_components(model.config, m, args.proj, args.layers_per_group)
                   for m in modes)
        if args.rank > most:
            raise UserError(f"--rank {args.rank} exceeds the {most} components of the largest "
                            "group of this model; expected at most that")


def print_report(result: dict, rows: list[dict], summary: list[str], args) -> None:
    print()
    print(fmt_table(rows))
    if args.latent:
        print(f"(KV alloc: the float32 cache the latent path allocated for "
              f"{result['n_ctx']} tokens, and its share of the dense cache's; params: factored "
              "/ dense q,k,v of all layers; KL: nats per token vs the unmodified model)")
    else:
        print("(KV cache: latent floats per token / dense cache; params: factored / dense "
              "q,k,v of all layers; KL: nats per token vs the unmodified model)")
    for line in summary:
        print("summary:", line)
    if args.max_new_tokens:
        print(f"\nprompt: {result['prompt']!r}")
        print(f"before: {result['sample_before']!r}")
        for r in rows:
            setting = f"var {r['var']:g}" if r["var"] is not None else f"rank {r['rank']}"
            print(f"after ({r['mode']}, {setting}): {r['sample']!r}")


def write_out(folder: Path, result: dict, rows: list[dict], curves: dict, title: str) -> None:
    from .export import staging_dir, write_json
    from .plots import save_all

    with staging_dir(folder) as tmp:
        write_json(tmp / "results.json", result)
        (tmp / "results.csv").write_text(csv_text(rows))
        save_all(tmp, rows, curves, title)


def save_setting(model, args, mode: str, setting: tuple[str, Any], fits: dict) -> None:
    """Write the model surgered at one setting as a Hugging Face folder,
    reusing the run's fits (nothing is decomposed again)."""
    from .export import save_hf_folder
    from .surgery import Surgery

    kind, value = setting
    s = Surgery(model, mode, proj=args.proj, center=args.center,
                layers_per_group=args.layers_per_group, fits=fits).fit(keep=value)
    factored = getattr(args, "factored", False)
    s.apply(**{kind: value}, factored=factored)
    try:
        if factored:
            from .factored import save_factored

            save_factored(model, args.save)
        else:
            save_hf_folder(model, args.save)
    finally:
        s.restore()


def start_run(args: argparse.Namespace) -> tuple[Callable[..., Any], Callable[..., None], Any]:
    """Threads, the progress bars, where messages go (stderr with --json),
    and the model: (progress, say, model)."""
    from tqdm import tqdm

    from . import set_num_threads

    def progress(it, **kw):
        return tqdm(it, file=sys.stderr, delay=1.0, leave=False, **kw)

    if args.threads:
        set_num_threads(args.threads)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    return progress, say, load_model(args, say)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.kv_budget is not None or args.kv_budget_sweep is not None:
        return budget_main(args)
    modes, settings = parse_plan(args)
    check_inputs(args)
    if args.latent:
        kv = [p for p in ("k", "v") if p in [x.strip() for x in args.proj.split(",")]]
        for mode in modes:
            if mode == "seed" or not kv:
                why = ("mode seed compresses q_proj only" if mode == "seed"
                       else f"--proj {args.proj} has neither k nor v")
                raise UserError(f"--latent: {why}, so K and V stay dense and there is no latent "
                                "cache to run; use a mode and --proj that touch k or v")

    from .evaluate import Evaluator
    from .experiment import compare_at_equal_budget, run
    from .lookup import DEMO_MODEL_DIR

    progress, say, model = start_run(args)
    check_rank(args, model, modes)
    n_ctx = min(512, model.n_ctx)
    tokens, text_desc = eval_tokens(args, model)
    say(f"eval text: {text_desc}, windows of {n_ctx}")
    t0 = time.perf_counter()
    ev = Evaluator(model, n_ctx=n_ctx, **tokens)
    say(f"unmodified: perplexity {ev.base_quality.perplexity:.3f} "
        f"({time.perf_counter() - t0:.1f} s per evaluation)")
    chat = is_chat_model(model) and args.prompt is None
    prompt = args.prompt or ("What is machine learning?" if chat else DEMO_PROMPT
                             if Path(model.source) == DEMO_MODEL_DIR else "Once upon a time")
    before = (model.generate(prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed, chat=chat)
              if args.max_new_tokens else "")

    fits: dict = {}  # shared by every mode, and by --save
    rows, curves = run(model, ev, modes, settings, proj=args.proj, center=args.center,
                       layers_per_group=args.layers_per_group, prompt=prompt,
                       max_new_tokens=args.max_new_tokens, chat=chat, seed=args.seed,
                       temperature=args.temperature, progress=progress, fits=fits,
                       latent=args.latent)
    summary = []
    if len(modes) > 1:
        summary = compare_at_equal_budget(rows, "kv_ratio") + compare_at_equal_budget(rows, "params_ratio")
    result = {"model": model.source, "eval_text": text_desc, "modes": modes,
              "settings": [{"kind": k, "value": v} for k, v in settings], "proj": args.proj,
              "center": args.center, "base_perplexity": ev.base_quality.perplexity,
              "prompt": prompt, "chat": chat, "sample_before": before, "rows": rows,
              "summary": summary, "latent": args.latent, "n_ctx": model.n_ctx}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result, rows, summary, args)
    if args.out:
        write_out(args.out, result, rows, curves,
                  f"{Path(model.source).name} — eval: {text_desc}")
        say(f"wrote {args.out}/results.json, results.csv and plots")
    if args.save:
        save_setting(model, args, modes[0], settings[0], fits)
        say(f"wrote the surgered model to {args.save}")
    return 0


def fmt_budget_table(rows: list[dict]) -> str:
    alloc = any(r.get("kv_cache_bytes") is not None for r in rows)
    head = (f"{'budget':>7}{'KV cache':>9}{'bytes/tok':>10}" + (f"{'alloc MiB':>10}" if alloc else "")
            + f"  {'setting':58}{'ranks mean [min-max]':>21}{'ppl':>9}{'KL':>9}{'top-1':>7}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (-r["budget"], r["kl"])):
        flat = [k for x in r["ranks"] for k in (x if isinstance(x, list) else [x])]
        if flat:
            per = [sum(x) if isinstance(x, list) else x for x in r["ranks"]]
            ranks = f"{sum(per) / len(per):.1f} [{min(per)}-{max(per)}]"
        else:
            ranks = "-"
        mib = f"{r['kv_cache_bytes'] / 2**20:>10.1f}" if alloc else ""
        lines.append(f"{r['budget']:>7.1%}{r['kv_fraction']:>9.1%}{r['kv_bytes_per_token']:>10.0f}"
                     f"{mib}  {r['label'][:58]:58}{ranks:>21}{r['perplexity']:>9.3f}{r['kl']:>9.4f}"
                     f"{r['top1']:>7.1%}")
    return "\n".join(lines)


def budget_csv(rows: list[dict]) -> str:
    cols = ["mode", "basis", "alloc", "balance", "latent_bits", "quantizer", "quant_bits", "budget",
            "kv_fraction", "kv_bytes_per_token", "kv_dense_bytes_per_token", "perplexity",
            "base_perplexity", "kl", "top1", "eval_tokens", "q_var", "kv_cache_bytes"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + ["ranks", "alpha", "seconds_evaluate"])
    for r in rows:
        w.writerow([r[c] for c in cols] + [json.dumps(r["ranks"]),
                                           json.dumps([a if a is None else round(a, 6)
                                                       for a in r["alpha"]]),
                                           r["seconds"]["evaluate"]])
    return buf.getvalue()


def budget_main(args: argparse.Namespace) -> int:
    """The KV-budget run: every mode × basis × allocator × balance × latent
    width at exactly equal KV-cache bytes, against the quantised caches."""
    plan = parse_budget_plan(args)
    plan["center"] = args.center
    check_inputs(args)

    from .budget import Bases
    from .evaluate import Evaluator
    from .experiment import budget_summary, run_budget

    progress, say, model = start_run(args)
    budgets = check_budgets(plan, model)
    n_ctx = min(512, model.n_ctx)
    tokens, text_desc = eval_tokens(args, model)
    say(f"eval text: {text_desc}, windows of {n_ctx}")
    ev = Evaluator(model, n_ctx=n_ctx, **tokens)
    say(f"unmodified: perplexity {ev.base_quality.perplexity:.3f}")
    cal = probe = None
    if plan["needs_calibration"]:
        cal, calib_docs = calibration(args, model, say)
        say(f"calibration: {cal.describe()}")
        if "sensitivity" in plan["alloc"]:
            from .calibrate import document_windows, first_tokens

            # the sensitivity probe: the first 1024 calibration tokens, never the eval text
            probe_docs = first_tokens(calib_docs, 1024)
            have = sum(len(d) for d in probe_docs)
            probe = Evaluator(model, n_ctx=n_ctx, docs=probe_docs)
            say(f"sensitivity probe: {have} calibration tokens in "
                f"{len(document_windows(probe_docs, model.config.bos_token_id, n_ctx))} windows")
    bases = Bases(model, cal, center=args.center, probe=probe)
    skipped: list[str] = []
    rows = run_budget(model, ev, bases, modes=plan["modes"], budgets=budgets, basis=plan["basis"],
                      alloc=plan["alloc"], balance=plan["balance"], latent_bits=plan["latent_bits"],
                      quantizers=plan["quantizers"], q_var=plan["q_var"], progress=progress,
                      skipped=skipped, latent=args.latent)
    summary = budget_summary(rows)
    result = {"model": model.source, "eval_text": text_desc,
              "calibration": cal.describe() if cal else None,
              "dense_reference": "the model's own 16-bit K/V cache (2 bytes per value)",
              "budgets": budgets, "modes": plan["modes"], "basis": plan["basis"],
              "alloc": plan["alloc"], "balance": [str(b) for b in plan["balance"]],
              "latent_bits": plan["latent_bits"], "center": args.center, "q_var": plan["q_var"],
              "fits": bases.fit_count, "sensitivity_probes": bases.probe_count,
              "base_perplexity": ev.base_quality.perplexity,
              "rows": rows, "summary": summary, "skipped": skipped, "latent": args.latent,
              "n_ctx": model.n_ctx}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        print(fmt_budget_table(rows))
        print("(KV cache: bytes per token against the model's dense 16-bit K/V cache, all layers; "
              "K and V only" + (f", q_proj at var {plan['q_var']:g} in every row" if plan["q_var"]
                                else "; q_proj untouched") +
              "; KL: nats per token vs the unmodified model)")
        if args.latent:
            print(f"(alloc MiB: the float32 cache the model allocated for {model.n_ctx} tokens, "
                  "latents run on the latent path; a quantised mode's cache is simulated, dense)")
        if model.config.qkv_bias:
            print("(biases: k_proj and v_proj biases stay dense and exact; a latent cache needs "
                  "no bytes for them, K = A c + b, so the KV column counts the latent only)")
        for line in summary:
            print("summary:", line)
        for line in skipped:
            print("skipped (below one component per group and layer):", line)
    if args.out:
        from .export import staging_dir, write_json
        from .plots import save_budget_plots

        with staging_dir(args.out) as tmp:
            write_json(tmp / "results.json", result)
            (tmp / "results.csv").write_text(budget_csv(rows))
            save_budget_plots(tmp, rows, f"{Path(model.source).name} — eval: {text_desc}")
        say(f"wrote {args.out}/results.json, results.csv and quality_vs_kv_budget.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
