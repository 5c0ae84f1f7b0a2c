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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
                   help="BLAS threads (default: OpenBLAS's own choice, all cores; at most its "
                        "build's MAX_THREADS)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json, results.csv and PNG plots to this folder")
    p.add_argument("--save", type=Path, default=None,
                   help="write the surgered model (one mode, one setting) as a Hugging Face "
                        "folder; it must be new or empty (a non-empty folder is refused, so "
                        "no stale file can shadow the new weights)")
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


def parse_plan(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, Any]]]:
    """The modes and the (kind, value) settings of a run, checked."""
    from .surgery import MODES

    modes = ([m.strip() for m in args.mode.split(",") if m.strip()] if args.mode
             else (["separate", "shared-kv"] if args.sweep else ["shared-kv"]))
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

    if args.eval_text is not None:
        from .checkpoints import check_regular_file

        try:
            check_regular_file(args.eval_text, "--eval-text")
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
    if args.threads is not None and args.threads > max_threads():
        raise UserError(f"--threads {args.threads}: at most {max_threads()} (the MAX_THREADS "
                        "of pcasurgery's OpenBLAS build)")
    if args.prompt is not None:
        from .tokenizers import check_text

        try:
            check_text(args.prompt, "--prompt")
        except ValueError as e:
            raise UserError(str(e)) from None
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
    model = LlamaModel.from_pretrained(path)
    if model.tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.model, tokenizer.json or a llama2.c "
                        "tokenizer .bin beside it)")
    c = model.config
    say(f"loaded {model.source} in {time.perf_counter() - t0:.1f} s: {c.num_hidden_layers} "
        f"layers, hidden {c.hidden_size}, {c.num_attention_heads} query / "
        f"{c.num_key_value_heads} KV heads, vocabulary {c.vocab_size}")
    return model


def eval_tokens(args: argparse.Namespace, model) -> tuple[Any, str]:
    """The eval token ids (without BOS) and a description of them."""
    import numpy as np

    from .checkpoints import read_text_file
    from .evaluate import default_eval_tokens

    if args.eval_text:
        ids = model.tokenizer.encode(read_text_file(args.eval_text, "--eval-text"), bos=False)
        if not ids:
            raise UserError(f"--eval-text {args.eval_text} is empty")
        tokens = np.asarray(ids[: args.eval_tokens])
        return tokens, f"{args.eval_text} (first {len(tokens)} tokens)"
    tokens = default_eval_tokens(model, args.eval_tokens, seed=args.seed)
    return tokens, f"{len(tokens)} tokens sampled from the unmodified model (seed {args.seed})"


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
    s.apply(**{kind: value})
    try:
        save_hf_folder(model, args.save)
    finally:
        s.restore()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    modes, settings = parse_plan(args)
    check_inputs(args)

    from tqdm import tqdm

    from . import set_num_threads
    from .evaluate import Evaluator
    from .experiment import compare_at_equal_budget, run
    from .lookup import DEMO_MODEL_DIR

    def progress(it, **kw):
        return tqdm(it, file=sys.stderr, delay=1.0, leave=False, **kw)

    if args.threads:
        set_num_threads(args.threads)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    model = load_model(args, say)
    check_rank(args, model, modes)
    n_ctx = min(512, model.n_ctx)
    tokens, text_desc = eval_tokens(args, model)
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

    fits: dict = {}  # shared by every mode, and by --save
    rows, curves = run(model, ev, modes, settings, proj=args.proj, center=args.center,
                       layers_per_group=args.layers_per_group, prompt=prompt,
                       max_new_tokens=args.max_new_tokens, chat=chat, seed=args.seed,
                       temperature=args.temperature, progress=progress, fits=fits)
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
        print_report(result, rows, summary, args)
    if args.out:
        write_out(args.out, result, rows, curves,
                  f"{Path(model.source).name} — eval: {text_desc}")
        say(f"wrote {args.out}/results.json, results.csv and plots")
    if args.save:
        save_setting(model, args, modes[0], settings[0], fits)
        say(f"wrote the surgered model to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
