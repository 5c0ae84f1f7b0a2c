"""The Llama forward pass on a TinyLlama-1.1B-shaped checkpoint: pcasurgery
against Hugging Face transformers (PyTorch CPU, float32), in one run.

Setup: a checkpoint with TinyLlama's exact config and tensor names, random
bf16 weights, one model.safetensors, written by transformers (cached in
--workdir). Each side then runs in its own subprocess (so that peak RSS and
thread pools are its own) with the same number of threads:
  load time, prefill tokens/s on a 512-token prompt, decode tokens/s, peak RSS.
The machine's limits are measured in the same run: sgemm GFLOP/s (NumPy's
OpenBLAS, 2048^3) and read bandwidth (the best multi-threaded sgemv of our
OpenBLAS streaming a 2-4 GiB matrix, as each decode step streams the weights).

Bounds: prefill <= sgemm peak / 2.07 GFLOP per token; decode <= bandwidth /
4.1 GB of float32 weights per token.

Usage: python benchmarks/bench_forward.py [--threads 2] [--workdir DIR] [--decode 32]
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

TINYLLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, hidden_act="silu", architectures=["LlamaForCausalLM"],
)
GFLOP_PER_TOKEN = 2.07
WEIGHT_GB = 4.1
PROMPT = 512


def prepare(folder: Path) -> None:
    """Write the random TinyLlama-shaped bf16 checkpoint with transformers."""
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="10GB")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_ours(folder: Path, threads: int, n_decode: int) -> dict:
    import numpy as np

    import pcasurgery

    pcasurgery.set_num_threads(threads)
    t0 = time.perf_counter()
    m = pcasurgery.LlamaModel.from_pretrained(folder)
    load = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(3, 32000, PROMPT)
    m._rt.reset()
    m._rt.forward(prompt[:16], 0, False)  # warm-up
    m._rt.reset()
    t0 = time.perf_counter()
    m._rt.forward(prompt, 0, False)
    prefill = PROMPT / (time.perf_counter() - t0)
    m._rt.reset()
    logits = m._rt.forward(prompt[:1], 0, False)
    t0 = time.perf_counter()
    for pos in range(1, n_decode + 1):
        logits = m._rt.forward(np.array([int(np.argmax(logits))]), pos, False)
    decode = n_decode / (time.perf_counter() - t0)
    return dict(load_s=load, prefill_tps=prefill, decode_tps=decode, peak_rss_gb=peak_rss_gb())


def run_transformers(folder: Path, threads: int, n_decode: int) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    prompt = torch.tensor(np.random.default_rng(0).integers(3, 32000, PROMPT))[None]
    with torch.no_grad():
        m(prompt[:, :16], logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        m(prompt, logits_to_keep=1)
        prefill = PROMPT / (time.perf_counter() - t0)
        out = m(prompt[:, :1], use_cache=True, logits_to_keep=1)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = m(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = n_decode / (time.perf_counter() - t0)
    return dict(load_s=load, prefill_tps=prefill, decode_tps=decode, peak_rss_gb=peak_rss_gb())


def machine_limits(threads: int) -> dict:
    """sgemm GFLOP/s (NumPy's OpenBLAS, 2048^3) and read bandwidth: the best
    of a few multi-threaded sgemv calls of our own OpenBLAS streaming 1-2 GiB
    matrices, weight-shaped and square (each decode step is such a stream)."""
    import ctypes

    import numpy as np
    from threadpoolctl import threadpool_limits

    import pcasurgery

    with threadpool_limits(threads):
        a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
        a @ a
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        gflops = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
        del a
        pcasurgery.set_num_threads(threads)
        lib = ctypes.CDLL(pcasurgery.blas_library())
        sgemv = getattr(lib, "scipy_cblas_sgemv", None) or lib.cblas_sgemv
        P = np.ctypeslib.ndpointer(np.float32, flags="C")
        I, F = ctypes.c_int, ctypes.c_float
        sgemv.argtypes = [I, I, I, I, F, P, I, P, I, F, P, I]
        bw = 0.0
        for M, N in ((2**19, 2048), (2**15, 2**14)):
            A = np.ones((M, N), dtype=np.float32)
            x, y = np.ones(N, np.float32), np.empty(M, np.float32)
            for _ in range(4):  # first call pages the matrix in
                t = _timed(lambda A=A: sgemv(101, 111, M, N, 1.0, A, N, x, 1, 0.0, y, 1))
                bw = max(bw, A.nbytes / t / 1e9)
            del A
    return dict(sgemm_gflops=gflops, read_gbps=bw)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                      "pcasurgery-bench", "tinyllama-random"))
    ap.add_argument("--decode", type=int, default=32, help="decode steps to time")
    ap.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.workdir)
    if args.side:
        fn = run_ours if args.side == "ours" else run_transformers
        print(json.dumps(fn(folder, args.threads, args.decode)))
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"threads per side: {args.threads}")
    t0 = time.perf_counter()
    prepare(folder)
    print(f"checkpoint: {folder} ({(folder / 'model.safetensors').stat().st_size / 1e9:.2f} GB bf16, "
          f"ready in {time.perf_counter() - t0:.0f} s)")
    lim = machine_limits(args.threads)
    pre_bound = lim["sgemm_gflops"] / GFLOP_PER_TOKEN
    dec_bound = lim["read_gbps"] / WEIGHT_GB
    print(f"limits: sgemm {lim['sgemm_gflops']:.0f} GFLOP/s -> prefill <= {pre_bound:.1f} tok/s; "
          f"read {lim['read_gbps']:.1f} GB/s -> decode <= {dec_bound:.2f} tok/s")
    res = {}
    for side in ("ours", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--threads",
                              str(args.threads), "--workdir", str(folder), "--decode",
                              str(args.decode)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    o, t = res["ours"], res["transformers"]
    f32_gb = 1.1e9 * 4 / 1e9
    print(f"\n{'':22}{'pcasurgery':>12}{'transformers':>14}{'ratio':>8}   target")
    ratio = t['load_s'] / o['load_s']
    print(f"{'load (s)':22}{o['load_s']:12.2f}{t['load_s']:14.2f}{ratio:8.2f}   ours <= 10 s")
    print(f"{'prefill (tok/s)':22}{o['prefill_tps']:12.1f}{t['prefill_tps']:14.1f}"
          f"{o['prefill_tps'] / t['prefill_tps']:8.2f}   >= 1.5x")
    print(f"{'  of sgemm bound':22}{o['prefill_tps'] / pre_bound:12.0%}{t['prefill_tps'] / pre_bound:14.0%}"
          f"{'':8}   ours >= 65%")
    print(f"{'decode (tok/s)':22}{o['decode_tps']:12.2f}{t['decode_tps']:14.2f}"
          f"{o['decode_tps'] / t['decode_tps']:8.2f}   >= 1.5x")
    print(f"{'  of bandwidth bound':22}{o['decode_tps'] / dec_bound:12.0%}{t['decode_tps'] / dec_bound:14.0%}"
          f"{'':8}   ours >= 80%")
    print(f"{'peak RSS (GB)':22}{o['peak_rss_gb']:12.2f}{t['peak_rss_gb']:14.2f}"
          f"{'':8}   ours <= {1.25 * f32_gb:.2f} (1.25x f32 weights)")


if __name__ == "__main__":
    main()
