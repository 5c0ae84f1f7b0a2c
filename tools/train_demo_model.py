"""Train pcasurgery's embedded demo model: TinyLlama in miniature.

A Llama with TinyLlama's proportions (query:KV heads 8:1, intermediate about
2.75 x hidden, untied lm_head, RMSNorm eps 1e-5, RoPE theta 10000) and a
SentencePiece BPE tokenizer with byte fallback, trained from scratch on
Jane Austen's novels minus Persuasion (held out entirely for evaluation).
It writes a Hugging Face folder with TinyLlama's layout and names
(config.json for LlamaForCausalLM, model.safetensors in bf16,
tokenizer.model, tokenizer_config.json), a training log and a loss curve.

Seeded and deterministic on the CPU (2 threads by default); it uses a GPU
when one is present (--device auto) but never needs one. The defaults are
the shipped model's recipe (chosen by the sweep in tools/demo_model/), which
this command reproduces (about 50 minutes on 2 cores):
  python tools/train_demo_model.py --out pcasurgery/models/demo --device cpu

Options:
  [--data ../shared/data/austen] [--hidden 128 --layers 8 --heads 8 --kv-heads 1]
  [--vocab 4096] [--steps 900] [--seq 512 --batch 32] [--lr 3e-3] [--seed 0]
Needs the dev extras: torch==2.13.0, transformers, sentencepiece, matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

HELD_OUT = "persuasion.txt"


def parse() -> argparse.Namespace:
    shared = Path(os.environ.get("PCASURGERY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=shared / "data" / "austen",
                    help="folder of .txt novels (persuasion.txt is held out)")
    ap.add_argument("--out", type=Path, required=True, help="Hugging Face folder to write")
    ap.add_argument("--log-dir", type=Path, default=Path(__file__).resolve().parent / "demo_model",
                    help="where the training log and loss curve go (not the package)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=0, help="0: 2.75 x hidden, multiple of 8")
    ap.add_argument("--seq", type=int, default=512,
                    help="training context; the held-out protocol uses n_ctx 512, and RoPE "
                         "positions beyond the trained context are never learnt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--val-frac", type=float, default=0.05,
                    help="the last fraction of each training novel, held back for validation")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    ap.add_argument("--summary", type=Path, default=None,
                    help="also write the run's numbers as JSON here (for sweeps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto",
                    help="auto (a GPU when present, else the CPU), cpu or cuda; the shipped "
                         "model was trained with --device cpu, which reproduces it exactly")
    return ap.parse_args()


def train_tokenizer(files: list[Path], vocab: int, work: Path) -> Path:
    """SentencePiece BPE with byte fallback on the training novels' lines.
    The text goes in through an iterator and the model comes out through a
    writer, so the model file records no file paths: the same text gives the
    same bytes on any machine (BPE training itself is deterministic)."""
    import io

    import sentencepiece as spm

    def lines():
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    yield line.rstrip("\n")

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=out, model_type="bpe",
        vocab_size=vocab, byte_fallback=True, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2,
    )
    path = work / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def write_tinyllama_json(folder: Path, cfg) -> None:
    """config.json, generation_config.json and tokenizer_config.json with the
    keys of TinyLlama-1.1B-Chat-v1.0's own files (rope_theta and torch_dtype
    at the top level, as every transformers version reads them), our values,
    and no transformers version stamp, so the folder does not depend on which
    transformers wrote it."""
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "model_type": "llama",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    generation = {"bos_token_id": 1, "eos_token_id": 2,
                  "max_length": cfg.max_position_embeddings, "pad_token_id": 0}
    tokenizer = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": cfg.max_position_embeddings, "pad_token": None,
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    }
    for name, obj in (("config.json", config), ("generation_config.json", generation),
                      ("tokenizer_config.json", tokenizer)):
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n")


def heldout_windows(ids: list[int], n_ctx: int) -> list[list[int]]:
    """pcasurgery's perplexity protocol: windows of n_ctx - 1 tokens, each run
    with a BOS in front; every token is scored (the first from BOS alone)."""
    return [[1] + ids[i:i + n_ctx - 1] for i in range(0, len(ids), n_ctx - 1)]


def mean_nll(model, windows, device) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of every window's tokens after BOS."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w], device=device)
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            total -= float(logp.gather(1, x[0, 1:, None]).sum())
            count += len(w) - 1
    return total, count


def main() -> None:
    args = parse()
    import numpy as np
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    files = sorted(p for p in args.data.glob("*.txt") if p.name != HELD_OUT)
    if not files or not (args.data / HELD_OUT).is_file():
        raise SystemExit(f"need training .txt novels and {HELD_OUT} in {args.data}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
    else:  # full float32 products, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    work = Path(tempfile.mkdtemp(prefix="demo-train-"))
    try:
        t0 = time.perf_counter()
        tok_path = train_tokenizer(files, args.vocab, work)
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
        train_ids: list[int] = []
        val_ids: list[int] = []
        for f in files:  # each novel is one document, BOS + text; its tail goes to validation
            ids = [1] + sp.encode(f.read_text(encoding="utf-8"))
            cut = len(ids) - int(len(ids) * args.val_frac)
            train_ids += ids[:cut]
            val_ids += ids[cut:]
        data = torch.tensor(train_ids, dtype=torch.long)
        val_windows = [val_ids[i:i + args.seq] for i in range(0, len(val_ids) - args.seq + 1, args.seq)]
        held_text = (args.data / HELD_OUT).read_text(encoding="utf-8")
        held = sp.encode(held_text)[:20000]
        held_bytes = len(sp.decode(held).encode("utf-8"))
        log(f"tokenizer: BPE {args.vocab} with byte fallback ({time.perf_counter() - t0:.0f} s); "
            f"{len(data)} training + {len(val_ids)} validation tokens from {len(files)} novels; "
            f"held out: {HELD_OUT}")

        inter = args.intermediate or int(round(2.75 * args.hidden / 8)) * 8
        cfg = LlamaConfig(
            hidden_size=args.hidden, intermediate_size=inter, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab, max_position_embeddings=args.seq, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            hidden_act="silu", initializer_range=0.02,
        )
        model = LlamaForCausalLM(cfg).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}:{args.kv_heads} heads, "
            f"intermediate {inter}, vocab {args.vocab}: {n_params / 1e6:.2f} M parameters, "
            f"{2 * n_params / 1e6:.2f} MB in bf16")
        log(f"training: {args.steps} steps x {args.batch} x {args.seq} tokens, lr {args.lr:g}, "
            f"weight decay {args.weight_decay:g}, seed {args.seed}, device {device}, "
            f"{args.threads} threads")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                weight_decay=args.weight_decay)
        gen = torch.Generator().manual_seed(args.seed)
        losses: list[float] = []
        val_curve: list[tuple[int, float]] = []

        def validate(step: int) -> None:
            model.eval()
            nll, n = 0.0, 0
            with torch.no_grad():
                for i in range(0, len(val_windows), 16):
                    x = torch.tensor(val_windows[i:i + 16], device=device)
                    out = model(input_ids=x, labels=x)
                    nll += out.loss.item() * x.numel()  # per-window token counts are equal
                    n += x.numel()
            model.train()
            val_curve.append((step, nll / n))

        t0 = time.perf_counter()
        for step in range(args.steps):
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (
                1 + math.cos(math.pi * step / args.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
            x = torch.stack([data[s:s + args.seq] for s in starts.tolist()]).to(device)
            out = model(input_ids=x, labels=x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(out.loss.item())
            last = step == args.steps - 1
            if (step + 1) % args.eval_every == 0 or last:
                validate(step + 1)
            if step % 100 == 0 or last:
                val = f"  validation {val_curve[-1][1]:.4f}" if val_curve else ""
                log(f"step {step:5d}  loss {losses[-1]:.4f}{val}  lr {lr:.2e}  "
                    f"{time.perf_counter() - t0:.0f} s")
        train_s = time.perf_counter() - t0
        final = float(np.mean(losses[-50:]))
        log(f"final training loss (mean of the last 50 steps): {final:.4f}; "
            f"validation loss {val_curve[-1][1]:.4f}; training took {train_s / 60:.1f} min")

        model.eval()
        # what ships are bf16 weights; the held-out numbers are theirs, computed
        # in float32 as pcasurgery and transformers (dtype=float32) compute them
        model.to(torch.bfloat16).to(torch.float32)
        nll, n = mean_nll(model, heldout_windows(held, 512), device)
        counts = np.bincount(train_ids + val_ids, minlength=args.vocab) + 1.0
        uni = float(np.exp(-np.mean(np.log(counts[held] / counts.sum()))))
        log(f"held-out {HELD_OUT}, first {n} tokens, n_ctx 512, bf16 weights: perplexity "
            f"{math.exp(nll / n):.2f} ({nll / held_bytes / math.log(2):.3f} bits per byte); "
            f"add-one unigram of the training tokens: {uni:.2f}")

        stage = work / "out"
        model.to(torch.bfloat16).save_pretrained(stage, safe_serialization=True)
        write_tinyllama_json(stage, cfg)
        shutil.copyfile(tok_path, stage / "tokenizer.model")
        for f in stage.iterdir():  # readable by all, as package data must be
            f.chmod(0o644)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), args.out)
        log(f"wrote {args.out}")
        (args.log_dir / "train_log.txt").write_text("\n".join(log_lines) + "\n")
        if args.summary is not None:
            args.summary.write_text(json.dumps({
                "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                "intermediate": inter, "params": n_params, "steps": args.steps,
                "batch": args.batch, "seq": args.seq, "lr": args.lr,
                "weight_decay": args.weight_decay, "final_train_loss": final,
                "val_curve": val_curve, "heldout_ppl": math.exp(nll / n),
                "heldout_bpb": nll / held_bytes / math.log(2), "unigram_ppl": uni,
                "train_s": train_s, "device": device,
            }, indent=1) + "\n")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, label="training, per step")
        k = 50
        if len(losses) > k:
            ax.plot(range(k, len(losses) + 1), np.convolve(losses, np.ones(k) / k, "valid"),
                    label=f"training, mean of {k}")
        ax.plot(*zip(*val_curve), "o-", ms=3, label="validation (novel tails)")
        ax.set(xlabel="step", ylabel="loss (nats/token)",
               title=f"demo model: {n_params / 1e6:.2f} M params, seed {args.seed}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.log_dir / "loss_curve.png", dpi=110)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
