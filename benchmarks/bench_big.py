"""A 7-8B model on a 24 GB machine: Llama-3.1-8B's exact config and tensor
names with random bf16 weights, then in one run: load time, peak RSS against
the bf16 weights, decode tokens/s against the read-bandwidth bound, and one
surgery evaluation on 512 tokens.

Setup: the checkpoint is written tensor by tensor (4 shards and
model.safetensors.index.json, as the real one is laid out), so writing it
never holds more than one tensor; it is kept in --workdir (16 GB) for reruns.
Weights are random bf16 values of magnitude 2^-7 to 2^-6 with random signs
(norms 1): a speed and memory benchmark; the quality numbers of a random
model mean nothing and are printed only to show the path ran.

The measured side runs in its own subprocess (peak RSS is its own):
  load: LlamaModel.from_pretrained (bf16, memory-mapped, NaN/Inf scan);
  decode: a 16-token prompt, then --decode greedy steps;
  surgery: Evaluator on --tokens random token ids (the base logits), then
  shared-kv on k_proj and v_proj at --var, one group at a time (fit, write
  back in bf16, free), evaluated on the same tokens, and restored (the
  model then holds its original arrays again).
The read bandwidth is measured in the same run (bench_forward's sgemv
stream); decode's bound is that bandwidth / the bf16 bytes read per token.

Usage: python benchmarks/bench_big.py [--config 8b|small] [--workdir DIR]
         [--decode 8] [--tokens 512] [--var 0.3] [--streaming auto|on|off]
         [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMA31_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
    attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    torch_dtype="bfloat16",
)
# the same path at a size CI runs (tests/test_big.py): GQA 4:1, llama3 RoPE, 2 shards
SMALL = dict(LLAMA31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1000,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
             rope_scaling=dict(LLAMA31_8B["rope_scaling"], original_max_position_embeddings=256))
CONFIGS = {"8b": (LLAMA31_8B, 4), "small": (SMALL, 2)}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in the order the real one stores them."""
    D, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, H, KV = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], D)}
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
            p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F)})
    out["model.norm.weight"] = (D,)
    out["lm_head.weight"] = (cfg["vocab_size"], D)
    return out


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """bf16 bits: sign and 7 mantissa bits random, exponent 2^-7 (no NaN/Inf)."""
    if len(shape) == 1:
        return np.full(shape, 0x3F80, dtype=np.uint16)  # norms: 1.0
    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    r &= 0x807F
    r |= 0x3C00
    return r


def write_checkpoint(folder: Path, cfg: dict, n_shards: int, seed: int = 0) -> float:
    """config.json, n_shards safetensors shards and their index, one tensor
    in memory at a time. Returns seconds (0 when the folder is complete)."""
    from pcasurgery.export import write_json, write_safetensors

    done = folder / "complete"
    if done.is_file() and json.loads(done.read_text()) == cfg:
        return 0.0
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    shapes = tensor_shapes(cfg)
    sizes = {n: 2 * int(np.prod(s)) for n, s in shapes.items()}
    total = sum(sizes.values())
    shards: list[list[str]] = [[]]
    acc = 0
    for n in shapes:  # consecutive tensors, shards of about equal size
        if acc >= total * len(shards) / n_shards and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(n)
        acc += sizes[n]
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, {n: (lambda n=n: random_bf16(shapes[n], rng))
                                           for n in names}, "BF16", shapes=shapes)
        weight_map.update({n: fname for n in names})
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(folder / "config.json", cfg)
    done.write_text(json.dumps(cfg))
    return time.perf_counter() - t0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_side(folder: Path, args: argparse.Namespace) -> dict:
    import pcasurgery
    from pcasurgery import LlamaModel
    from pcasurgery.evaluate import Evaluator
    from pcasurgery.surgery import Surgery

    pcasurgery.set_num_threads(args.threads)
    out: dict = {}
    t0 = time.perf_counter()
    m = LlamaModel.from_pretrained(folder, n_ctx=args.tokens + 1)
    out.update(load_s=time.perf_counter() - t0, dtype=m.dtype, rss_after_load_gb=peak_rss_gb(),
               bf16_kernel=pcasurgery._C.bf16_kernel())
    from pcasurgery.checkpoints import mapped_page_sizes

    # how much of the mapped weights the page cache holds in 2 MiB pages: a
    # shard read afresh (not cached when the load began), yes; one just
    # written, in its writes' pieces
    out["huge_gb"], out["mapped_gb"] = (v / 1e9 for v in mapped_page_sizes(
        m.stored_weight(n) for n in m.weights))
    V = m.config.vocab_size
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, V, 16)
    m._rt.reset()
    logits = m._rt.forward(prompt, 0, False)
    t0 = time.perf_counter()
    for pos in range(16, 16 + args.decode):
        logits = m._rt.forward(np.array([int(np.argmax(logits))]), pos, False)
    out["decode_tps"] = args.decode / (time.perf_counter() - t0)
    tokens = rng.integers(3, V, args.tokens)
    t0 = time.perf_counter()
    ev = Evaluator(m, tokens=tokens, n_ctx=args.tokens + 1)
    out["base_eval_s"] = time.perf_counter() - t0
    out["base_perplexity"] = ev.base_quality.perplexity
    streaming = {"auto": None, "on": True, "off": False}[args.streaming]
    held = {n: m.stored_weight(n) for n in m.weights}
    s = Surgery(m, "shared-kv", proj="k,v", streaming=streaming).fit(keep=args.var)
    st = s.apply(var=args.var)
    q = ev.evaluate()
    s.restore()
    restored = all(m.stored_weight(n) is a for n, a in held.items())
    out.update(streaming=s.streaming, fit_s=s.fit_seconds, apply_s=st.seconds, eval_s=q.seconds,
               eval_tokens=q.tokens, kl=q.kl, perplexity=q.perplexity, kv_ratio=st.budget["kv_ratio"],
               components_mean=float(np.mean(list(st.ks.values()))),
               written_dtype=s.written_dtype, restored=restored,
               peak_rss_gb=peak_rss_gb())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="8b")
    ap.add_argument("--workdir", help="where the checkpoint is written (default: $TMPDIR/"
                    "pcasurgery-bench/llama31-<config>-random)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=8, help="decode steps to time")
    ap.add_argument("--tokens", type=int, default=512, help="evaluation tokens")
    ap.add_argument("--var", type=float, default=0.3, help="variance kept by the K/V surgery")
    ap.add_argument("--streaming", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side", choices=("write", "measure"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg, n_shards = CONFIGS[args.config]
    folder = Path(args.workdir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "pcasurgery-bench",
                                               f"llama31-{args.config}-random"))
    if args.side == "write":
        print(json.dumps(write_checkpoint(folder, cfg, n_shards)))
        return
    if args.side == "measure":
        print(json.dumps(run_side(folder, args)))
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"threads: {args.threads}")
    # each step in a child: a child's peak RSS (ru_maxrss) includes its parent's
    # peak when it is spawned, and writing holds the largest tensor (1 GB)
    common = ["--config", args.config, "--workdir", str(folder)]
    p = subprocess.run([sys.executable, __file__, "--side", "write", *common],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"writing the checkpoint failed:\n{p.stderr[-3000:]}")
    wrote = json.loads(p.stdout.strip().splitlines()[-1])
    shapes = tensor_shapes(cfg)
    weights_gb = sum(2 * int(np.prod(s)) for s in shapes.values()) / 1e9
    read_gb = sum(2 * int(np.prod(s)) for n, s in shapes.items()
                  if len(s) == 2 and n != "model.embed_tokens.weight") / 1e9
    print(f"checkpoint: {folder} ({weights_gb:.2f} GB bf16 in {n_shards} shards; "
          + (f"written in {wrote:.0f} s)" if wrote else "already there)"))
    cmd = [sys.executable, __file__, "--side", "measure", *common, "--threads",
           str(args.threads), "--decode", str(args.decode), "--tokens", str(args.tokens),
           "--var", str(args.var), "--streaming", args.streaming]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"the measured side failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    # after the side: the bandwidth probe streams 2-4 GiB
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_forward import machine_limits

    lim = machine_limits(args.threads)
    bound = lim["read_gbps"] / read_gb
    print(f"limits: read {lim['read_gbps']:.1f} GB/s -> decode <= {bound:.2f} tok/s "
          f"({read_gb:.2f} GB of bf16 weights read per token)")
    over = r["peak_rss_gb"] - weights_gb
    print(f"load: {r['load_s']:.1f} s ({r['dtype']}, memory-mapped, {r['huge_gb']:.2f} of "
          f"{r['mapped_gb']:.2f} GB in 2 MiB pages; kernel {r['bf16_kernel']})")
    print(f"decode: {r['decode_tps']:.3f} tok/s = {r['decode_tps'] / bound:.0%} of the bandwidth "
          f"bound ({r['decode_tps'] * read_gb:.1f} GB/s)")
    print(f"surgery: shared-kv k,v at var {args.var} on {r['eval_tokens']} tokens: "
          f"{'one group at a time' if r['streaming'] else 'fits kept'}, fit {r['fit_s']:.1f} s, "
          f"apply {r['apply_s']:.1f} s, evaluation {r['eval_s']:.1f} s (base {r['base_eval_s']:.1f} s);"
          f" written back in {r['written_dtype']}; KV cache {r['kv_ratio']:.1%}, "
          f"{r['components_mean']:.0f} components per layer; KL {r['kl']:.4f} (random weights: "
          f"not a quality number); restored to the original arrays: {r['restored']}")
    print(f"peak RSS: {r['peak_rss_gb']:.2f} GB = bf16 weights {weights_gb:.2f} GB + {over:.2f} GB "
          f"(target: + at most 2 GB)")
    if args.json:
        from pcasurgery.export import write_json

        write_json(Path(args.json), {"config": args.config, "weights_gb": weights_gb,
                                     "read_gb_per_token": read_gb, "limits": lim,
                                     "decode_bound_tps": bound, **r})


if __name__ == "__main__":
    main()
