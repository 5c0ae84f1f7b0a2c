"""Fuzz every loader of pcasurgery with mutated real files.

    python tools/fuzz.py                          # 2,000 cases per format, all formats
    python tools/fuzz.py --cases 100000 --jobs 2  # a long campaign
    python tools/fuzz.py --format config.json --atheris --cases 50000

Formats (each has a real seed file and the loader a user would run on it):
  safetensors-header, safetensors-data  the model.safetensors of a small Llama
                                        (mutations inside the header / the data)
  llama2c       a llama2.c legacy checkpoint (stories260K from ../shared, else a small one)
  tok512        a llama2.c tokenizer (tok512.bin, else a small one), encode + decode
  tokenizer.model  a SentencePiece model (the demo model's), encode + decode
  tokenizer.json   a Hugging Face tokenizer.json, encode + decode
  config.json   the config of a small Hugging Face folder, loaded and run (n_ctx 64)
  index.json    model.safetensors.index.json of a sharded folder, loaded

Mutations: bit flips, byte insertions and deletions, overwrites with boundary
values, truncations, splices (a chunk of the file, or of another format's
file, pasted elsewhere), and for JSON formats value-level edits (numbers made
huge, negative, fractional or strings; keys dropped; deep nesting).

Each case runs in a forked child with a timeout. Success and the project's
documented exceptions (ValueError and its subclasses, FileNotFoundError,
MemoryError) pass; any other exception, a crash (signal, sanitizer abort) or
a timeout is a failure, saved with its input under --save-failures. The exit
status is 1 when anything failed.

With --atheris (pip install atheris) one format runs coverage-guided instead,
in process, for --cases runs; without atheris the mutation loop runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PCASURGERY_SHARED", ROOT.parent / "shared"))
EXPECTED = (ValueError, FileNotFoundError, MemoryError)
FORMATS = ("safetensors-header", "safetensors-data", "llama2c", "tok512", "tokenizer.model",
           "tokenizer.json", "config.json", "index.json")
TEXT = "Once upon a time, a caf\u00e9 \u2014 \u4e16\u754c <s> and </s>\t\n  123"

# --------------------------------------------------------------- the seeds

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)


def tiny_model():
    import numpy as np

    from pcasurgery import LlamaConfig, LlamaModel
    from pcasurgery.config import expected_shapes

    c = LlamaConfig(**TINY)
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal(s) * 0.3).astype(np.float32)
         for n, s in expected_shapes(c).items()}
    return LlamaModel(c, w)


def write_llama2c(path: Path) -> None:
    """A small llama2.c legacy checkpoint (tied classifier)."""
    import numpy as np

    dim, hidden, L, H, KV, V, S = 16, 24, 2, 4, 2, 300, 32
    hd = dim // H
    n = (V * dim + L * dim + L * dim * dim + 2 * L * KV * hd * dim + L * dim * dim + L * dim
         + 3 * L * hidden * dim + dim + 2 * S * hd // 2)
    data = np.random.default_rng(1).standard_normal(n).astype("<f4") * 0.3
    path.write_bytes(struct.pack("<7i", dim, hidden, L, H, KV, V, S) + data.tobytes())


def write_tok(path: Path) -> None:
    """A llama2.c tokenizer: specials, 256 byte pieces, some merges."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    pieces += [b" ", b"e", b"t", b" t", b"th", b"the", b" the", b"on", b"ce"]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, pieces))))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)) + p)


def write_tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 20, trainer)
    tk.save(str(path))


def make_seeds(work: Path) -> dict[str, Path]:
    """The seed file of each format, written into `work`: what the loaders
    will read (folders for the HF formats)."""
    from pcasurgery.export import save_hf_folder
    from pcasurgery.lookup import DEMO_MODEL_DIR

    seeds = {}
    folder = work / "hf"
    save_hf_folder(tiny_model(), folder, dtype="BF16")
    seeds["safetensors-header"] = seeds["safetensors-data"] = folder / "model.safetensors"
    seeds["config.json"] = folder / "config.json"
    sharded = work / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded / "config.json")
    _shard(folder / "model.safetensors", sharded)
    seeds["index.json"] = sharded / "model.safetensors.index.json"
    # the real trained files from ../shared when there, else small ones made here
    for fmt, real, name, make in (("llama2c", "stories260K.bin", "model.bin", write_llama2c),
                                  ("tok512", "tok512.bin", "tok.bin", write_tok)):
        if (SHARED / "models" / real).is_file():
            shutil.copy(SHARED / "models" / real, work / name)
        else:
            make(work / name)
        seeds[fmt] = work / name
    shutil.copy(DEMO_MODEL_DIR / "tokenizer.model", work / "tokenizer.model")
    seeds["tokenizer.model"] = work / "tokenizer.model"
    write_tokenizer_json(work / "tokenizer.json")
    seeds["tokenizer.json"] = work / "tokenizer.json"
    return seeds


def _shard(single: Path, folder: Path) -> None:
    """Split a safetensors file into two shards plus an index."""
    from pcasurgery.checkpoints import load_safetensors
    from pcasurgery.export import write_safetensors

    t = load_safetensors(single)
    names = list(t)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half],
             "model-00002-of-00002.safetensors": names[half:]}
    wmap = {}
    for fname, ns in parts.items():
        write_safetensors(folder / fname, {n: t[n] for n in ns}, "BF16")
        wmap.update(dict.fromkeys(ns, fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}, indent=2))


# ------------------------------------------------------------- the loaders

def load(fmt: str, path: Path) -> None:
    """What a user runs on a file of this format."""
    from pcasurgery import LlamaModel
    from pcasurgery.checkpoints import load_hf_folder, load_llama2c, load_safetensors
    from pcasurgery.tokenizers import HFTokenizer, Llama2cTokenizer, SentencePieceTokenizer

    if fmt.startswith("safetensors"):
        load_safetensors(path)
    elif fmt == "llama2c":
        config, w = load_llama2c(path)
        LlamaModel(config, w, n_ctx=min(32, config.max_position_embeddings)).logits([1, 2, 3])
    elif fmt == "tok512":
        tok = Llama2cTokenizer(path)
        tok.decode(tok.encode(TEXT[:24]))
    elif fmt == "tokenizer.model":
        tok = SentencePieceTokenizer(path)
        tok.decode(tok.encode(TEXT, special=True))
    elif fmt == "tokenizer.json":
        tok = HFTokenizer(path)
        tok.decode(tok.encode(TEXT))
    elif fmt == "config.json":
        m = LlamaModel.from_pretrained(path.parent, n_ctx=64)
        m.logits([1, 2, 3])
    elif fmt == "index.json":
        load_hf_folder(path.parent)
    else:
        raise SystemExit(f"unknown format {fmt}")


# ---------------------------------------------------------------- mutations

INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x80", b"\xff\xff\xff\x7f",
               b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\x80\x7f", b"\xc0\x7f", b"\x00\x7c",
               b"\xff" * 8, b"\x00" * 8]
JSON_VALUES = [0, -1, 1, 2**31, 2**63, 2**70, -(2**63), 1.5, 16.0, 1e308, -0.0, "16", "false",
               "", None, True, False, [], {}, [1, 2], {"a": 1}, "../x", "/etc/passwd"]


def mutate(data: bytes, rng: random.Random, fmt: str, others: list[bytes],
           header_end: int = 0) -> bytes:
    """One to four random edits of data (inside [lo, hi) for the region
    formats: the safetensors header or data)."""
    if fmt in ("config.json", "index.json") and rng.random() < 0.5:
        out = _mutate_json(data, rng)
        if out is not None:
            return out
    b = bytearray(data)
    lo, hi = 0, len(b)
    if fmt == "safetensors-header":
        hi = max(1, header_end)
    elif fmt == "safetensors-data":
        lo = min(header_end, len(b) - 1)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b = bytearray(rng.randbytes(rng.randint(1, 16)))
        pos = rng.randrange(lo, max(lo + 1, min(hi, len(b))))
        op = rng.random()
        if op < 0.35:  # flip 1-8 bits
            for _ in range(rng.randint(1, 8)):
                p = rng.randrange(lo, max(lo + 1, min(hi, len(b))))
                if p < len(b):
                    b[p] ^= 1 << rng.randrange(8)
        elif op < 0.5:  # insert bytes
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op < 0.6:  # delete bytes
            del b[pos:pos + rng.randint(1, 8)]
        elif op < 0.75:  # overwrite with a boundary value
            v = rng.choice(INTERESTING)
            b[pos:pos + len(v)] = v
        elif op < 0.85:  # truncate
            del b[rng.randrange(0, len(b) + 1):]
        else:  # splice a chunk of this file or of another format's
            src = rng.choice([bytes(b)] + others)
            if src:
                s = rng.randrange(len(src))
                b[pos:pos] = src[s:s + rng.randint(1, 64)]
    return bytes(b)


def _mutate_json(data: bytes, rng: random.Random) -> bytes | None:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    paths = []

    def walk(o, path):
        paths.append(path)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o[:8]):
                walk(v, path + [i])

    walk(obj, [])
    path = rng.choice(paths)
    if not path:
        obj = rng.choice(JSON_VALUES + ["[" * 5000])
    else:
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        r = rng.random()
        if r < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif r < 0.25:
            parent[path[-1]] = "\0deep"
        else:
            parent[path[-1]] = rng.choice(JSON_VALUES)
    deep = "[" * 5000 + "]" * 5000
    return json.dumps(obj).replace('"\\u0000deep"', deep).encode()


# ----------------------------------------------------------- running cases

def _child(w: int, fmt: str, path: Path, gen, start: int, end: int) -> None:
    """Run cases start..end-1 in this (forked) process, reporting each on
    the pipe: {"s": i} before, {"i": i, "o": outcome, "d": detail} after."""
    for i in range(start, end):
        path.write_bytes(gen(i))
        os.write(w, (json.dumps({"s": i}) + "\n").encode())
        outcome, detail = "ok", ""
        try:
            load(fmt, path)
        except EXPECTED:
            outcome = "expected"
        except BaseException:  # noqa: BLE001 - anything else is the finding
            outcome, detail = "unexpected", traceback.format_exc(limit=6)[-4000:]
        os.write(w, (json.dumps({"i": i, "o": outcome, "d": detail}) + "\n").encode())


def run_cases(fmt: str, path: Path, gen, cases: int, timeout: float, batch: int,
              on_result) -> None:
    """Every case in a forked child with a timeout; with batch > 1 one child
    runs up to `batch` cases in a row (faster), and after a crash or a hang
    a new child goes on from the next case. on_result(i, outcome, detail):
    outcome "ok", "expected" (a documented exception), "unexpected" (another
    exception), "crash" (a signal or an abnormal exit) or "hang"."""
    i = 0
    while i < cases:
        end = min(cases, i + batch)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                _child(w, fmt, path, gen, i, end)
            finally:
                os._exit(0)
        os.close(w)
        buf, current, started = b"", None, time.monotonic()
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, started + timeout - time.monotonic()))
            if not ready:  # the current case is taking too long
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                on_result(current if current is not None else i, "hang",
                          f"no answer in {timeout} s")
                i = (current if current is not None else i) + 1
                break
            chunk = os.read(r, 65536)
            if not chunk:  # the child ended
                _, status = os.waitpid(pid, 0)
                if current is not None:  # ... in the middle of a case
                    why = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                           else f"exit status {os.WEXITSTATUS(status)}")
                    on_result(current, "crash", why)
                    i = current + 1
                else:
                    i = end
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "s" in msg:
                    current, started = msg["s"], time.monotonic()
                else:
                    on_result(msg["i"], msg["o"], msg["d"])
                    current = None
        os.close(r)


def campaign(fmt: str, seeds: dict[str, Path], cases: int, seed: int, timeout: float,
             save: Path | None, progress: bool, batch: int = 1) -> dict:
    """Mutate the format's seed file `cases` times (case i is reproducible
    from (format, seed, i)) and load each mutant."""
    from pcasurgery.checkpoints import read_safetensors_header

    path = seeds[fmt]
    original = path.read_bytes()
    others = [seeds[f].read_bytes()[:4096] for f in FORMATS if f != fmt]
    header_end = read_safetensors_header(path)[1] if fmt.startswith("safetensors") else 0

    def gen(i: int) -> bytes:
        return mutate(original, random.Random(f"{fmt}/{seed}/{i}"), fmt, others, header_end)

    counts = {"ok": 0, "expected": 0, "unexpected": 0, "crash": 0, "hang": 0}
    failures = []
    t0 = time.perf_counter()

    def on_result(i: int, outcome: str, detail: str) -> None:
        counts[outcome] += 1
        if outcome in ("unexpected", "crash", "hang"):
            failures.append({"case": i, "outcome": outcome, "detail": detail[-2000:]})
            if save is not None:
                save.mkdir(parents=True, exist_ok=True)
                (save / f"{fmt}-{seed}-{i}-{outcome}").write_bytes(gen(i))
        done = sum(counts.values())
        if progress and done % 1000 == 0:
            print(f"  {fmt}: {done}/{cases} {counts}", file=sys.stderr, flush=True)

    try:
        run_cases(fmt, path, gen, cases, timeout, batch, on_result)
    finally:
        path.write_bytes(original)
    return {"format": fmt, "cases": cases, "seed": seed, "batch": batch,
            "seconds": time.perf_counter() - t0, **counts, "failures": failures[:20]}


def atheris_campaign(fmt: str, seeds: dict[str, Path], runs: int, timeout: float) -> None:
    """Coverage-guided, in process: atheris reports any exception other than
    the documented ones (and any crash) and stops."""
    import atheris

    path = seeds[fmt]
    original = path.read_bytes()
    # the loaders are imported already (the seeds were made with them):
    # instrument every function loaded so far for coverage feedback
    atheris.instrument_all()

    def one(data: bytes) -> None:
        path.write_bytes(data)
        try:
            load(fmt, path)
        except EXPECTED:
            pass

    corpus = Path(tempfile.mkdtemp(prefix=f"corpus-{fmt}-"))
    (corpus / "seed").write_bytes(original)
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-timeout={int(timeout)}",
                   "-rss_limit_mb=4096", str(corpus)], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--format", default="all",
                   help=f"comma-separated among {', '.join(FORMATS)} (default all)")
    p.add_argument("--cases", type=int, default=2000, help="cases per format (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0,
                   help="seconds a case may take before it counts as a hang (default 20)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--batch", type=int, default=1,
                   help="cases per forked child (default 1: a child per case); after a crash "
                        "or a hang a new child goes on from the next case")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--save-failures", type=Path, default=None,
                   help="folder for the inputs that failed")
    p.add_argument("--atheris", action="store_true",
                   help="coverage-guided with atheris (one format), if it is installed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fmts = FORMATS if args.format == "all" else tuple(args.format.split(","))
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        p.error(f"--format must be among {', '.join(FORMATS)}; got {','.join(bad)}")

    import pcasurgery

    pcasurgery.set_num_threads(1)  # children are forked: no BLAS thread pool to inherit
    work = Path(tempfile.mkdtemp(prefix="pcasurgery-fuzz-"))
    try:
        seeds = make_seeds(work)
        if args.atheris:
            try:
                import atheris  # noqa: F401
            except ImportError:
                print("atheris is not installed: running the mutation loop", file=sys.stderr)
            else:
                if len(fmts) != 1:
                    p.error("--atheris fuzzes one --format at a time")
                atheris_campaign(fmts[0], seeds, args.cases, args.timeout)
                return 0
        if args.jobs > 1 and not args.worker:
            return _parallel(args, fmts)
        reports = []
        for fmt in fmts:
            rep = campaign(fmt, seeds, args.cases, args.seed, args.timeout,
                           args.save_failures, progress=True, batch=args.batch)
            reports.append(rep)
            if not args.worker:
                _print(rep)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _finish(reports, args)


def _parallel(args, fmts) -> int:
    """--jobs N: N worker processes, cases split between them (distinct seeds)."""
    per = -(-args.cases // args.jobs)
    procs = []
    for j in range(args.jobs):
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--worker", "--format", ",".join(fmts), "--cases",
               str(per), "--seed", str(args.seed * 1000 + j), "--timeout", str(args.timeout),
               "--batch", str(args.batch), "--json", str(out)]
        if args.save_failures:
            cmd += ["--save-failures", str(args.save_failures)]
        procs.append((subprocess.Popen(cmd), out))
    reports = []
    for proc, out in procs:
        proc.wait()
        reports += json.loads(out.read_text())["reports"]
        out.unlink()
    merged = []
    for fmt in fmts:
        rs = [r for r in reports if r["format"] == fmt]
        m = {"format": fmt, "cases": sum(r["cases"] for r in rs), "seed": args.seed,
             "batch": args.batch,
             "seconds": max(r["seconds"] for r in rs),
             "failures": [f for r in rs for f in r["failures"]][:20]}
        for k in ("ok", "expected", "unexpected", "crash", "hang"):
            m[k] = sum(r[k] for r in rs)
        merged.append(m)
        _print(m)
    return _finish(merged, args)


def _print(r: dict) -> None:
    print(f"{r['format']:20} {r['cases']:8} cases {r['seconds']:8.1f} s: ok {r['ok']}, "
          f"expected errors {r['expected']}, unexpected {r['unexpected']}, crashes "
          f"{r['crash']}, hangs {r['hang']}", flush=True)
    for f in r["failures"][:3]:
        print(f"    case {f['case']}: {f['outcome']}: {f['detail'].strip()[-600:]}")


def _finish(reports: list[dict], args) -> int:
    if args.json:
        args.json.write_text(json.dumps({"reports": reports}, indent=2))
    failed = sum(r["unexpected"] + r["crash"] + r["hang"] for r in reports)
    if not args.worker:
        total = sum(r["cases"] for r in reports)
        print(f"fuzz: {total} cases, {failed} failures (unexpected exceptions, crashes, hangs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
