"""Train pcasurgery's embedded demo model: TinyLlama in miniature.

A Llama with TinyLlama's proportions (query:KV heads 8:1, intermediate about
2.75 x hidden, untied lm_head, RMSNorm eps 1e-5, RoPE theta 10000) and a
SentencePiece BPE tokenizer with byte fallback, trained from scratch on
Jane Austen's novels minus Persuasion (held out entirely for evaluation).
It writes a Hugging Face folder with TinyLlama's layout and names
(config.json for LlamaForCausalLM, model.safetensors in bf16,
tokenizer.model, tokenizer_config.json), a training log and a loss curve.

Seeded and deterministic on the CPU (2 threads by default); it uses a GPU
when one is present (--device auto) but never needs one.

Usage:
  python tools/train_demo_model.py --out pcasurgery/models/demo \
      [--data ../shared/data/austen] [--hidden 128 --layers 6 --heads 8 --kv-heads 1]
      [--vocab 4096] [--steps 3000] [--seq 256 --batch 32] [--seed 0]
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
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=0, help="0: 2.75 x hidden, multiple of 8")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    return ap.parse_args()


def train_tokenizer(files: list[Path], vocab: int, seed: int, work: Path) -> Path:
    import sentencepiece as spm

    prefix = work / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files), model_prefix=str(prefix), model_type="bpe",
        vocab_size=vocab, byte_fallback=True, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,  # BPE training is deterministic
        max_sentence_length=1 << 16, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def main() -> None:
    args = parse()
    import numpy as np
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    files = sorted(p for p in args.data.glob("*.txt") if p.name != HELD_OUT)
    if not files:
        raise SystemExit(f"no training .txt files in {args.data}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    work = Path(tempfile.mkdtemp(prefix="demo-train-"))
    try:
        t0 = time.perf_counter()
        tok_path = train_tokenizer(files, args.vocab, args.seed, work)
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
        ids: list[int] = []
        for f in files:  # each novel as one document: BOS + text
            ids += [1] + sp.encode(f.read_text(encoding="utf-8"))
        data = torch.tensor(ids, dtype=torch.long)
        log(f"tokenizer: BPE {args.vocab} with byte fallback, {len(data)} training tokens from "
            f"{len(files)} novels ({time.perf_counter() - t0:.0f} s); held out: {HELD_OUT}")

        inter = args.intermediate or int(round(2.75 * args.hidden / 8)) * 8
        cfg = LlamaConfig(
            hidden_size=args.hidden, intermediate_size=inter, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            hidden_act="silu", initializer_range=0.02,
        )
        model = LlamaForCausalLM(cfg).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}:{args.kv_heads} heads, "
            f"intermediate {inter}, vocab {args.vocab}: {n_params / 1e6:.2f} M parameters, "
            f"{2 * n_params / 1e6:.2f} MB in bf16")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                weight_decay=0.1)
        gen = torch.Generator().manual_seed(args.seed)
        losses = []
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
            losses.append(float(out.loss))
            if step % 100 == 0 or step == args.steps - 1:
                log(f"step {step:5d}  loss {losses[-1]:.4f}  lr {lr:.2e}  "
                    f"{time.perf_counter() - t0:.0f} s")
        final = float(np.mean(losses[-50:]))
        log(f"final training loss (mean of the last 50 steps): {final:.4f}")

        stage = work / "out"
        model.to(torch.bfloat16).save_pretrained(stage, safe_serialization=True)
        shutil.copyfile(tok_path, stage / "tokenizer.model")
        (stage / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "legacy": False, "model_max_length": 2048,
        }, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), args.out)
        log(f"wrote {args.out}")
        (args.log_dir / "train_log.txt").write_text("\n".join(log_lines) + "\n")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(losses, lw=0.6, alpha=0.5, label="per step")
        k = 50
        if len(losses) > k:
            ax.plot(range(k - 1, len(losses)), np.convolve(losses, np.ones(k) / k, "valid"),
                    label=f"mean of {k}")
        ax.set(xlabel="step", ylabel="training loss (nats/token)",
               title=f"demo model: {n_params / 1e6:.2f} M params, seed {args.seed}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.log_dir / "loss_curve.png", dpi=110)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
