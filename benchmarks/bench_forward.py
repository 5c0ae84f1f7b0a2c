"""The Llama forward pass on a TinyLlama-1.1B-shaped checkpoint: pcasurgery
against Hugging Face transformers (PyTorch CPU), each with float32 and with
bf16 weights, in one run.

Setup: a checkpoint with TinyLlama's exact config and tensor names, random
bf16 weights, one model.safetensors, written by transformers (cached in
--workdir). Each side then runs in its own subprocess (so that peak RSS and
thread pools are its own) with the same number of threads:
  load time, prefill tokens/s on a 512-token prompt, decode tokens/s, peak RSS.
The machine's limits are measured in the same run: sgemm GFLOP/s (NumPy's
OpenBLAS, 2048^3) and read bandwidth (the best multi-threaded sgemv of our
OpenBLAS streaming a 2-4 GiB matrix, as each decode step streams the weights).

Bounds: prefill <= sgemm peak / 2.07 GFLOP per token; decode <= bandwidth /
the bytes of weights read per token (4.4 GB in float32, 2.2 GB in bf16).
Our bf16 runs keep the weights bf16 and compute in float32: memory-mapped
(the default) and copied into memory (mmap=False, `--no-mmap`);
transformers' bf16 run computes in bf16 (its CPU kernels).

Our three sides run --rounds times, in turn, each round in fresh processes
and in a rotated order (f32, bf16, bf16 copied; then bf16, bf16 copied,
f32; ...), and every side's process starts --settle seconds after the one
before it ended. A process that exits frees its memory, which a virtual
machine may hand back to its host (Linux's free page reporting; the test
machine's Firecracker VM does): for the next ~15 s, a model's first
512-token prefills there ran 8-12% slower (RESULTS.md). Without the pause,
the side that loads fastest (bf16 memory-mapped, 0.1 s) paid for the one
before it. This machine's read bandwidth moves by
up to 30% between minutes, so one sample per side compares two different
machines. Each of our columns is the median over the rounds, and each ratio
of ours is the median of the rounds' ratios (sides run next to each other),
with every round's value printed. Transformers' sides run once.

Then, as this machine's bandwidth moves even between minutes, our three
models are loaded into one process (8.8 GB) and take turns, --alternate
rounds of a prefill and --decode steps each, and the ratios of each round's
adjacent turns are reported as medians, with every round's value. Where the
CPU has AVX-512F (bf16 prefill by csrc/gemm.c's product), a fourth turn runs
the mapped model with the other path (W widened for OpenBLAS's sgemm).

The page cache: a file just written stays cached in the pieces its writes
made (4 KiB here), and a memory-mapped model then reads its weights through
4 KiB page-table entries. A file read afresh is cached in 2 MiB folios where
Linux can (6.x with large folios for the file system: ext4, xfs), which the
kernel maps with 2 MiB entries. What that changes depends on the CPU (see
RESULTS.md), so that every run starts from the same state the checkpoint is
dropped from the page cache and read back once before the sides run, as a
user's model is after a reboot (--page-cache keep: as it is cached), and
the table says how much of the mapped weights sits in 2 MiB pages.

Usage: python benchmarks/bench_forward.py [--threads 2] [--workdir DIR] [--decode 32] [--rounds 3]
                                          [--alternate 5] [--page-cache reread|keep]
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
PARAMS = 1.1e9  # weights read per decode step (all matrices; the embedding row aside)
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


def reread(path: Path) -> None:
    """Drop a file from the page cache (written back first: dirty pages
    stay) and read it once, so that the kernel caches it as it caches a file
    read afresh."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(64 << 20)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    finally:
        os.close(fd)


def huge_share(m) -> float:
    """The share of a model's memory-mapped, resident weights in 2 MiB pages
    (NaN where none is mapped)."""
    from pcasurgery.checkpoints import mapped_page_sizes

    huge, rss = mapped_page_sizes(m.stored_weight(k) for k in m.weights)
    return huge / rss if rss else float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_ours(folder: Path, threads: int, n_decode: int, dtype: str) -> dict:
    import numpy as np

    import pcasurgery

    pcasurgery.set_num_threads(threads)
    dtype, _, held = dtype.partition("-")  # "bfloat16-copied": mmap=False
    t0 = time.perf_counter()
    m = pcasurgery.LlamaModel.from_pretrained(folder, dtype=dtype, mmap=held != "copied")
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
    return dict(load_s=load, prefill_tps=prefill, decode_tps=decode, peak_rss_gb=peak_rss_gb(),
                huge=huge_share(m))


def run_alternated(folder: Path, threads: int, n_decode: int, rounds: int) -> dict:
    """Our three models in one process (float32, bf16 mapped, bf16 copied:
    8.8 GB), taking turns: each round, each model (in a rotated order) runs
    the 512-token prefill and then n_decode decode steps after it. Ratios of
    adjacent turns see the same machine, where separate processes minutes
    apart may not."""
    import numpy as np

    import pcasurgery

    pcasurgery.set_num_threads(threads)
    sides = {"float32": ("float32", True), "bfloat16": ("bfloat16", True),
             "bfloat16-copied": ("bfloat16", False)}
    models = {k: pcasurgery.LlamaModel.from_pretrained(folder, dtype=d, mmap=mm)
              for k, (d, mm) in sides.items()}
    prompt = np.random.default_rng(0).integers(3, 32000, PROMPT)
    for m in models.values():  # warm-up
        m._rt.reset()
        m._rt.forward(prompt[:16], 0, False)
    names = list(models)
    # bf16 prefill's other path (W widened for OpenBLAS's sgemm) on the mapped
    # model, where gemm.c's product is the default: a turn of its own
    if pcasurgery._C.bf16_prefill("auto") != "sgemm":
        names.append("bfloat16-sgemm")
        models["bfloat16-sgemm"] = models["bfloat16"]
    out: dict = {k: {"prefill_tps": [], "decode_tps": []} for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            m = models[k]
            pcasurgery._C.bf16_prefill("sgemm" if k == "bfloat16-sgemm" else "auto")
            m._rt.reset()
            t0 = time.perf_counter()
            logits = m._rt.forward(prompt, 0, False)
            out[k]["prefill_tps"].append(PROMPT / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for pos in range(PROMPT, PROMPT + n_decode):
                logits = m._rt.forward(np.array([int(np.argmax(logits))]), pos, False)
            out[k]["decode_tps"].append(n_decode / (time.perf_counter() - t0))
    out["huge"] = huge_share(models["bfloat16"])
    return out


def run_transformers(folder: Path, threads: int, n_decode: int, dtype: str) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
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
    ap.add_argument("--rounds", type=int, default=3, help="rounds of our three sides")
    ap.add_argument("--alternate", type=int, default=5,
                    help="rounds of our three models taking turns in one process (0: none)")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds between one side's process and the next (default 20)")
    ap.add_argument("--page-cache", choices=("reread", "keep"), default="reread",
                    help="drop the checkpoint from the page cache and read it back once before "
                         "the sides run (default), or keep it cached as it is")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # "ours:float32", ...
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds: expected a positive number, got {args.rounds}")
    if args.alternate < 0:
        ap.error(f"--alternate: expected 0 or a positive number, got {args.alternate}")
    if not args.settle >= 0:
        ap.error(f"--settle: expected seconds >= 0, got {args.settle}")
    folder = Path(args.workdir)
    if args.side == "prepare":
        prepare(folder)
        return
    if args.side:
        if args.side == "alternated":
            print(json.dumps(run_alternated(folder, args.threads, args.decode, args.alternate)))
            return
        who, dtype = args.side.split(":")
        fn = run_ours if who == "ours" else run_transformers
        print(json.dumps(fn(folder, args.threads, args.decode, dtype)))
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"threads per side: {args.threads}")
    t0 = time.perf_counter()
    # in a child: the parent's peak RSS would count in every side spawned after it
    subprocess.run([sys.executable, __file__, "--side", "prepare", "--workdir", str(folder)],
                   check=True)
    print(f"checkpoint: {folder} ({(folder / 'model.safetensors').stat().st_size / 1e9:.2f} GB bf16, "
          f"ready in {time.perf_counter() - t0:.0f} s)")
    if args.page_cache == "reread":
        t0 = time.perf_counter()
        reread(folder / "model.safetensors")
        print(f"page cache: the checkpoint dropped and read back once ({time.perf_counter() - t0:.1f} "
              "s), as after a reboot")
    else:
        print("page cache: the checkpoint as it is cached (--page-cache keep)")
    import pcasurgery

    print(f"our bf16 kernel on this CPU: decode {pcasurgery._C.bf16_kernel()}, prefill "
          f"{pcasurgery._C.bf16_prefill()}")
    ours = ["ours:float32", "ours:bfloat16", "ours:bfloat16-copied"]
    rounds: list[dict] = []
    res = {}
    for r in range(args.rounds):
        order = ours[r % len(ours):] + ours[:r % len(ours)]
        rounds.append({side: run_side(side, folder, args, settle=True) for side in order})
    for side in ["transformers:float32", "transformers:bfloat16"]:
        res[side] = run_side(side, folder, args, settle=True)
    alt = run_side("alternated", folder, args, settle=True) if args.alternate else None
    import numpy as np

    for side in ours:  # each number the median over the rounds
        res[side] = {k: float(np.median([rd[side][k] for rd in rounds])) for k in rounds[0][side]}
    # after the sides: a child's peak RSS (ru_maxrss) includes its parent's peak
    # when it is spawned, and the bandwidth probe's 2-4 GiB would count in every side
    lim = machine_limits(args.threads)
    pre_bound = lim["sgemm_gflops"] / GFLOP_PER_TOKEN
    dec_bound = {"float32": lim["read_gbps"] / (PARAMS * 4 / 1e9),
                 "bfloat16": lim["read_gbps"] / (PARAMS * 2 / 1e9)}
    print(f"limits: sgemm {lim['sgemm_gflops']:.0f} GFLOP/s -> prefill <= {pre_bound:.1f} tok/s; "
          f"read {lim['read_gbps']:.1f} GB/s -> decode <= {dec_bound['float32']:.2f} tok/s "
          f"(float32 weights), {dec_bound['bfloat16']:.2f} (bf16)")
    o, b, bc = res["ours:float32"], res["ours:bfloat16"], res["ours:bfloat16-copied"]
    t, tb = res["transformers:float32"], res["transformers:bfloat16"]
    cols = (o, b, bc, t, tb)
    bounds = ("float32", "bfloat16", "bfloat16", "float32", "bfloat16")
    print(f"\nours: medians of {args.rounds} rounds; bf16 mmap = memory-mapped (the default), "
          "bf16 copy = mmap=False")
    print(f"{'':22}{'ours f32':>10}{'bf16 mmap':>11}{'bf16 copy':>11}{'hf f32':>9}{'hf bf16':>9}")
    rows = (("load_s", "load (s)", "{:.2f}"), ("prefill_tps", "prefill (tok/s)", "{:.1f}"),
            ("decode_tps", "decode (tok/s)", "{:.2f}"), ("peak_rss_gb", "peak RSS (GB)", "{:.2f}"))
    widths = (10, 11, 11, 9, 9)
    for key, label, fmt in rows:
        print(f"{label:22}" + "".join(f"{fmt.format(r[key]):>{w}}" for r, w in zip(cols, widths)))
    print(f"{'decode, of its bound':22}" + "".join(
        f"{r['decode_tps'] / dec_bound[d]:{w}.0%}" for r, d, w in zip(cols, bounds, widths)))
    print(f"{'prefill, of sgemm bound':22}" + "".join(
        f"{r['prefill_tps'] / pre_bound:{w}.0%}" for r, w in zip(cols, widths)))
    huge = [r.get("huge", float("nan")) for r in cols]  # NaN: not memory-mapped
    print(f"{'mapped, in 2 MiB pages':22}" + "".join(
        f"{h:{w}.0%}" if h == h else f"{'-':>{w}}" for h, w in zip(huge, widths)))

    def ratio(side: str, key: str) -> str:
        """median over the rounds of side / ours f32, and each round's value"""
        per = [rd[side][key] / rd["ours:float32"][key] for rd in rounds]
        return f"{np.median(per):.2f}x (rounds: {', '.join(f'{v:.2f}' for v in per)})"

    print("\nratios (target):")
    print(f"  ours f32 vs transformers f32: load {t['load_s'] / o['load_s']:.2f}x faster, prefill "
          f"{o['prefill_tps'] / t['prefill_tps']:.2f}x (>= 1.5x), decode "
          f"{o['decode_tps'] / t['decode_tps']:.2f}x (>= 1.5x), RSS {o['peak_rss_gb']:.2f} GB "
          f"(<= {1.25 * PARAMS * 4 / 1e9:.2f})")
    for side, name in (("ours:bfloat16", "bf16 mmap"), ("ours:bfloat16-copied", "bf16 copy")):
        print(f"  ours {name} vs ours f32: decode {ratio(side, 'decode_tps')} (>= 1.8x)")
        print(f"  {'':{len(name) + 17}}prefill {ratio(side, 'prefill_tps')} (>= 1x)")
        print(f"  {'':{len(name) + 17}}peak RSS {ratio(side, 'peak_rss_gb')} (<= 0.6x)")
    if alt:
        print(f"\ntaking turns in one process ({args.alternate} rounds; each turn a "
              f"{PROMPT}-token prefill, then {args.decode} decode steps), median over the rounds "
              "of bf16 / f32 in the same round:")
        for side, name in (("bfloat16", "bf16 mmap"), ("bfloat16-copied", "bf16 copy")):
            for key, what, target in (("decode_tps", "decode", ">= 1.8x"),
                                      ("prefill_tps", "prefill", ">= 1x")):
                per = [v / f for v, f in zip(alt[side][key], alt["float32"][key])]
                print(f"  ours {name} vs ours f32: {what} {np.median(per):.2f}x "
                      f"(rounds: {', '.join(f'{v:.2f}' for v in per)}) ({target})")
        if "bfloat16-sgemm" in alt:
            per = [v / f for v, f in zip(alt["bfloat16"]["prefill_tps"],
                                         alt["bfloat16-sgemm"]["prefill_tps"])]
            print(f"  bf16 mmap prefill, gemm.c's product vs W widened for sgemm (the other "
                  f"path): {np.median(per):.2f}x (rounds: {', '.join(f'{v:.2f}' for v in per)})")
            per = [v / f for v, f in zip(alt["bfloat16-sgemm"]["prefill_tps"],
                                         alt["float32"]["prefill_tps"])]
            print(f"  bf16 mmap prefill by the sgemm path vs ours f32: {np.median(per):.2f}x "
                  f"(rounds: {', '.join(f'{v:.2f}' for v in per)})")
        print("  tok/s, medians: " + ", ".join(
            f"{k} prefill {np.median(v['prefill_tps']):.1f} decode {np.median(v['decode_tps']):.2f}"
            for k, v in alt.items() if k != "huge"))
        print(f"  the mapped model's weights in 2 MiB pages: {alt['huge']:.0%}")
    for r, name in ((b, "bf16 mmap"), (bc, "bf16 copy")):
        print(f"  ours {name} vs transformers bf16: prefill "
              f"{r['prefill_tps'] / tb['prefill_tps']:.2f}x, decode "
              f"{r['decode_tps'] / tb['decode_tps']:.2f}x, load {tb['load_s'] / r['load_s']:.2f}x "
              "faster")


def run_side(side: str, folder: Path, args: argparse.Namespace, settle: bool = False) -> dict:
    """One side in its own process (after --settle seconds, if settle); its
    measurements."""
    if settle:
        time.sleep(args.settle)
    out = subprocess.run([sys.executable, __file__, "--side", side, "--threads",
                          str(args.threads), "--workdir", str(folder), "--decode",
                          str(args.decode), "--alternate", str(args.alternate)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
