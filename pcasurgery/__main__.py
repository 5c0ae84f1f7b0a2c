"""python -m pcasurgery: PCA surgery on a Llama model's attention, measured.

Examples:
  python -m pcasurgery --var 0.3
  python -m pcasurgery --model path/to/TinyLlama-1.1B-Chat-v1.0 --mode separate,shared-kv --sweep
  python -m pcasurgery --model stories260K.bin --sweep 0.99,0.9,0.5 --out results/
  python -m pcasurgery --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --rank 64 --save surgered/
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

DEMO_PROMPT = "It is a truth universally acknowledged"
DEFAULT_SWEEP = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


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
    p.add_argument("--proj", default="q,k,v", help="projections to touch (default q,k,v)")
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
                   help="BLAS threads (default: OpenBLAS's own choice, all cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json, results.csv and PNG plots to this folder")
    p.add_argument("--save", type=Path, default=None,
                   help="write the surgered model (one mode, one setting) as a Hugging Face folder")
    p.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    return p


def is_chat_model(model) -> bool:
    src = Path(model.source) if model.source else None
    if src is not None and src.is_dir() and (src / "tokenizer_config.json").is_file():
        try:
            if "chat_template" in json.loads((src / "tokenizer_config.json").read_text()):
                return True
        except (OSError, ValueError):
            pass
    return "chat" in str(model.source).lower()


def fmt_table(rows: list[dict]) -> str:
    head = (f"{'mode':18}{'setting':>10}{'comps mean [min-max]':>22}{'KV cache':>10}"
            f"{'params':>8}{'ppl':>9}{'KL':>9}{'top-1':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        setting = f"var {r['var']:g}" if r["var"] is not None else f"rank {r['rank']}"
        comps = f"{r['components_mean']:.1f} [{r['components_min']}-{r['components_max']}]"
        lines.append(f"{r['mode']:18}{setting:>10}{comps:>22}{r['kv_ratio']:>10.1%}"
                     f"{r['params_ratio']:>8.0%}{r['perplexity']:>9.3f}{r['kl']:>9.4f}"
                     f"{r['top1']:>7.1%}")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    cols = ["mode", "var", "rank", "components_mean", "components_min", "components_max",
            "kv_latent_per_token", "kv_dense_per_token", "kv_ratio", "params_factored",
            "params_dense", "params_ratio", "perplexity", "base_perplexity", "kl", "top1",
            "eval_tokens"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + ["seconds_evaluate"])
    for r in rows:
        w.writerow([r[c] for c in cols] + [r["seconds"]["evaluate"]])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UserError as e:
        print(f"pcasurgery: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"pcasurgery: error: {msg}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from .export import check_writable
    from .surgery import MODES

    modes = ([m.strip() for m in args.mode.split(",") if m.strip()] if args.mode
             else (["separate", "shared-kv"] if args.sweep else ["shared-kv"]))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--mode must be among {', '.join(MODES)}; got {args.mode!r}")
    if args.sweep is not None and not args.sweep:
        raise UserError("--sweep needs at least one threshold in (0, 1]")
    settings = ([("rank", args.rank)] if args.rank else
                [("var", v) for v in args.sweep] if args.sweep else [("var", args.var or 0.3)])
    if args.save and (len(modes) > 1 or len(settings) > 1):
        raise UserError("--save needs one mode and one setting (--var or --rank)")
    if args.eval_text is not None and not args.eval_text.is_file():
        raise UserError(f"--eval-text {args.eval_text} does not exist")
    for folder, what in ((args.out, "--out"), (args.save, "--save")):
        if folder is not None:
            try:
                check_writable(folder, what)
            except ValueError as e:
                raise UserError(str(e)) from None

    import numpy as np
    from tqdm import tqdm

    from . import set_num_threads
    from .lookup import DEMO_DESCRIPTION, DEMO_MODEL_DIR, resolve_auto
    from .evaluate import Evaluator, default_eval_tokens
    from .experiment import compare_at_equal_budget, run
    from .model import LlamaModel

    def progress(it, **kw):
        return tqdm(it, file=sys.stderr, delay=1.0, leave=False, **kw)

    if args.threads:
        set_num_threads(args.threads)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    t0 = time.perf_counter()
    if args.model == "auto":
        path, which = resolve_auto()
    else:
        path = args.model
        which = DEMO_DESCRIPTION if args.model == "demo" else str(args.model)
    # the first line: which model runs, and how to choose another
    say(f"model: {which}; choose another with --model (a Hugging Face folder, a cached model "
        "id, a llama2.c .bin, or 'demo')")
    model = LlamaModel.from_pretrained(path)
    if model.tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.model, tokenizer.json or a llama2.c "
                        "tokenizer .bin beside it)")
    c = model.config
    say(f"loaded {model.source} in {time.perf_counter() - t0:.1f} s: {c.num_hidden_layers} "
        f"layers, hidden {c.hidden_size}, {c.num_attention_heads} query / "
        f"{c.num_key_value_heads} KV heads, vocabulary {c.vocab_size}")
    n_ctx = min(512, model.n_ctx)
    if args.eval_text:
        ids = model.tokenizer.encode(args.eval_text.read_text(encoding="utf-8"), bos=False)
        if not ids:
            raise UserError(f"--eval-text {args.eval_text} is empty")
        tokens = np.asarray(ids[: args.eval_tokens])
        text_desc = f"{args.eval_text} (first {len(tokens)} tokens)"
    else:
        tokens = default_eval_tokens(model, args.eval_tokens, seed=args.seed)
        text_desc = f"{len(tokens)} tokens sampled from the unmodified model (seed {args.seed})"
    say(f"eval text: {text_desc}, windows of {n_ctx}")
    t0 = time.perf_counter()
    ev = Evaluator(model, tokens, n_ctx=n_ctx)
    say(f"unmodified: perplexity {ev.base_quality.perplexity:.3f} "
        f"({time.perf_counter() - t0:.1f} s per evaluation)")
    chat = is_chat_model(model) and args.prompt is None
    prompt = args.prompt or ("What is machine learning?" if chat else DEMO_PROMPT
                             if Path(model.source) == DEMO_MODEL_DIR else "Once upon a time")
    before = (model.generate(prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed, chat=chat)
              if args.max_new_tokens else "")

    rows, curves = run(model, ev, modes, settings, proj=args.proj, center=args.center,
                       layers_per_group=args.layers_per_group, prompt=prompt,
                       max_new_tokens=args.max_new_tokens, chat=chat, seed=args.seed,
                       temperature=args.temperature, progress=progress)
    summary = []
    if len(modes) > 1:
        summary = compare_at_equal_budget(rows, "kv_ratio") + compare_at_equal_budget(rows, "params_ratio")
    result = {"model": model.source, "eval_text": text_desc, "modes": modes,
              "settings": [{"kind": k, "value": v} for k, v in settings], "proj": args.proj,
              "center": args.center, "base_perplexity": ev.base_quality.perplexity,
              "prompt": prompt, "chat": chat, "sample_before": before, "rows": rows,
              "summary": summary}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        print(fmt_table(rows))
        print("(KV cache: latent floats per token / dense cache; params: factored / dense "
              "q,k,v of all layers; KL: nats per token vs the unmodified model)")
        for line in summary:
            print("summary:", line)
        if args.max_new_tokens:
            print(f"\nprompt: {prompt!r}")
            print(f"before: {before!r}")
            for r in rows:
                setting = f"var {r['var']:g}" if r["var"] is not None else f"rank {r['rank']}"
                print(f"after ({r['mode']}, {setting}): {r['sample']!r}")
    if args.out:
        from .export import staging_dir, write_json
        from .plots import save_all

        title = f"{Path(model.source).name} — eval: {text_desc}"
        with staging_dir(args.out) as tmp:
            write_json(tmp / "results.json", result)
            (tmp / "results.csv").write_text(csv_text(rows))
            save_all(tmp, rows, curves, title)
        say(f"wrote {args.out}/results.json, results.csv and plots")
    if args.save:
        from .export import save_hf_folder
        from .surgery import Surgery

        s = Surgery(model, modes[0], proj=args.proj, center=args.center,
                    layers_per_group=args.layers_per_group).fit()
        kind, value = settings[0]
        s.apply(**{kind: value})
        save_hf_folder(model, args.save)
        s.restore()
        say(f"wrote the surgered model to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
