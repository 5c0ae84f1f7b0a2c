"""Reading checkpoints into float32 weight arrays named as Hugging Face names them.

Supported: Hugging Face folders (config.json + model.safetensors or shards,
F32/F16/BF16) and llama2.c "legacy" .bin files (stories260K and friends).

Internal conventions: every weight is a C-contiguous float32 NumPy array
keyed by its Hugging Face name (``model.layers.0.self_attn.k_proj.weight``),
row-major (out_features, in_features). RoPE follows Hugging Face's
"rotate_half" layout, so llama2.c's q/k rows, which rotate interleaved pairs,
are permuted at load time exactly as transformers' conversion script does. A
row permutation of Wq or Wk does not change a PCA over their rows.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from . import _C
from .config import LlamaConfig, expected_shapes, layer_keys


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Meta/llama2.c/GGUF q or k projection (RoPE on pairs
    (2i, 2i+1) of each head) reordered for Hugging Face's rotate_half RoPE
    (pairs (i, i + hd/2)); transformers' convert_llama_weights_to_hf.permute."""
    rows, cols = w.shape
    hd = rows // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
    )


def load_llama2c(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read a llama2.c legacy checkpoint (.bin, fp32).

    Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len; a negative vocab_size means an untied classifier
    follows), then the tensors in run.c's order, then the RoPE tables
    (ignored). RMSNorm eps 1e-5, RoPE theta 10000 (run.c's constants).
    """
    path = Path(path)
    check_regular_file(path, "llama2.c checkpoint")
    size = path.stat().st_size
    if size < 28:
        raise ValueError(f"{path} is {size} bytes, too short for a llama2.c header (28)")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(28), dtype="<i4")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in header)
    tied = vocab > 0
    vocab = abs(vocab)
    for name, v in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers),
                    ("n_heads", n_heads), ("n_kv_heads", n_kv), ("vocab_size", vocab),
                    ("seq_len", seq_len)):
        if v <= 0 or v > 1 << 20:
            raise ValueError(f"{path}: header {name}={v} is not a plausible llama2.c value")
    if dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{path}: header dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} "
                         "are inconsistent")
    hd = dim // n_heads
    kv_dim = n_kv * hd
    counts = [
        ("tok_emb", (vocab, dim)), ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)), ("freq_cis", (2, seq_len, hd // 2)),
    ]
    if not tied:
        counts.append(("wcls", (vocab, dim)))
    need = 28 + 4 * sum(int(np.prod(s)) for _, s in counts)
    if size != need:
        raise ValueError(
            f"{path} is {size} bytes but its header (dim={dim}, hidden_dim={hidden}, "
            f"n_layers={n_layers}, vocab_size={vocab}, seq_len={seq_len}, "
            f"{'tied' if tied else 'untied'} classifier) implies {need}: truncated or not a "
            "llama2.c legacy checkpoint"
        )
    data = np.fromfile(path, dtype="<f4", offset=28).astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError(f"{path} contains NaN or Inf weights")
    t: dict[str, np.ndarray] = {}
    off = 0
    for name, shape in counts:
        n = int(np.prod(shape))
        t[name] = data[off:off + n].reshape(shape)
        off += n
    config = LlamaConfig(
        hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=vocab,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": t["tok_emb"],
        "model.norm.weight": t["rms_final"],
    }
    w["lm_head.weight"] = t["tok_emb"] if tied else t["wcls"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = t["rms_att"][i]
        w[p + "self_attn.q_proj.weight"] = interleaved_to_rotate_half(t["wq"][i], n_heads)
        w[p + "self_attn.k_proj.weight"] = interleaved_to_rotate_half(t["wk"][i], n_kv)
        w[p + "self_attn.v_proj.weight"] = t["wv"][i]
        w[p + "self_attn.o_proj.weight"] = t["wo"][i]
        w[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        w[p + "mlp.gate_proj.weight"] = t["w1"][i]
        w[p + "mlp.up_proj.weight"] = t["w3"][i]
        w[p + "mlp.down_proj.weight"] = t["w2"][i]
    return config, w


# ------------------------------------------------------------ files and JSON

def check_regular_file(path: Path, what: str = "file") -> None:
    """FileNotFoundError / ValueError unless `path` is (or links to) a
    regular file: a FIFO or device would block or never end."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ValueError(f"{what} {path} is {kind}; expected a regular file")


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of a regular file; ValueError naming it otherwise."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object (dict) from a UTF-8 file; one-line ValueError naming the
    file when it is not UTF-8, not JSON, nested too deeply or not an object."""
    import json

    path = Path(path)
    text = read_text_file(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is nested too deeply to be a config") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got a {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {  # every dtype the format defines -> bytes per value
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
LOADABLE_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER = 100 * 2**20  # the reference implementation's limit
MAX_DIM = 2**62  # a dimension NumPy can hold


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """Parse and validate a .safetensors header; returns ({name: entry}, data_start).

    Checks, each with a clear ValueError: the header length fits the file; the
    header is well-formed JSON (an object of objects); every dtype is one the
    format defines; shapes are lists of non-negative ints; data_offsets lie
    inside the data section, do not overlap, and span exactly
    prod(shape) * itemsize bytes.
    """
    import json

    path = Path(path)
    check_regular_file(path, "safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):  # the header only: no readahead into the tensors,
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # which the load maps
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        if n > MAX_HEADER:
            raise ValueError(f"{path}: header length {n} exceeds the {MAX_HEADER}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: the safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header must be a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    out: dict[str, dict] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where} must have dtype, shape and data_offsets")
        dt, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dt not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where} has unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM
                for d in shape):
            raise ValueError(f"{where} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ValueError(f"{where} has invalid data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise ValueError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the data section "
                f"({data_len} bytes)"
            )
        want = math.prod(shape) * SAFETENSORS_DTYPES[dt]  # exact, however large
        if end - begin != want:
            raise ValueError(
                f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dt} "
                f"needs {want}"
            )
        spans.append((begin, end, name))
        out[name] = {"dtype": dt, "shape": tuple(shape), "begin": begin, "end": end}
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    return out, data_start


def load_safetensors(
    path: str | os.PathLike, names: list[str] | None = None,
    header: tuple[dict[str, dict], int] | None = None, bf16: frozenset[str] = frozenset(),
    mmap: bool = True,
) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as float32 arrays (F32, F16 and BF16
    converted in C), except those named in `bf16`: uint16 arrays of bf16
    bits, memory-mapped from the file when it holds them as BF16 at an even
    offset (no copy; the pages stay the file's), else converted and rounded.
    mmap=False copies those bf16 bits into the process's own memory instead,
    one tensor at a time, each file page released once read (NumPy asks
    Linux for transparent huge pages for such arrays, which a mapping of
    the page cache doesn't get; see the README's bf16 section).
    Every value is checked for NaN/Inf. Converted tensors' pages are released
    once read, so the process holds one copy of each tensor.
    header: what :func:`read_safetensors_header` returned for it, if read."""
    import mmap as _mmap

    from .dtypes import to_bf16_bits

    path = Path(path)
    entries, data_start = header if header is not None else read_safetensors_header(path)
    wanted = entries.keys() if names is None else names
    out: dict[str, np.ndarray] = {}
    if not entries:
        return out
    with open(path, "rb") as f:
        mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
    if mmap and bf16:
        _ask_huge_pages(mm)
    mapped = False  # arrays that view mm keep it open; otherwise it is closed here
    try:
        # one pass in file order (sequential reads), whatever order was asked
        for name in sorted(wanted, key=lambda n: entries[n]["begin"]):
            e = entries[name]
            if e["dtype"] not in LOADABLE_DTYPES:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {e['dtype']}; pcasurgery loads "
                    f"{', '.join(LOADABLE_DTYPES)}"
                )
            start = data_start + e["begin"]
            nbytes = e["end"] - e["begin"]
            where = f"{path}: tensor {name!r}"
            if name in bf16 and e["dtype"] == "BF16" and start % 2 == 0:
                a = np.frombuffer(mm, dtype=np.uint16, count=nbytes // 2,
                                  offset=start).reshape(e["shape"])
                bad = _C.bf16_nonfinite(a)
                if bad >= 0:
                    raise ValueError(f"{where} contains NaN or Inf (first at flat index {bad} "
                                     f"of {a.size}); expected finite weights")
                if mmap:
                    out[name] = a
                    mapped = True
                    continue
                out[name] = a.copy()
                del a  # a view of mm: mm.close() below refuses while one is alive
                _release_pages(mm, start, nbytes)
                continue
            a = _C.to_float32(mm, start, nbytes, e["dtype"], e["shape"], where)
            if name in bf16:
                a = to_bf16_bits(a)
                bad = _C.bf16_nonfinite(a)
                if bad >= 0:  # a float32 beyond bf16's range rounds to Inf
                    raise ValueError(f"{where} overflows bfloat16 (flat index {bad})")
            out[name] = a
            _release_pages(mm, start, nbytes)
    finally:
        if not mapped:
            mm.close()
    return out


def _ask_huge_pages(mm) -> None:
    """Ask Linux to read a file mapping the model keeps into the page cache
    in 2 MiB folios (MADV_HUGEPAGE), where its pages are not cached yet.
    The kernel maps such folios with 2 MiB page-table entries when the
    mapping's address and file offset agree modulo 2 MiB, which it arranges
    for file mappings this large: bf16 decode streams every weight once
    per token, and with 4 KiB entries takes a TLB miss every 4 KiB (~6%
    slower decode on the AVX2 test machine, none measured on the AVX-512
    one). Pages already cached (a file just written, or read by another
    tool) keep the sizes they have; see mapped_page_sizes."""
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(advice)
    except OSError:  # THP compiled out or turned off: 4 KiB pages, as without it
        pass


def mapped_page_sizes(arrays) -> tuple[int, int]:
    """(bytes in 2 MiB pages, bytes resident) of the file mappings that
    `arrays` (arrays load_safetensors memory-mapped) view, summed over
    distinct mappings, from /proc/self/smaps (FilePmdMapped and Rss).
    (0, 0) where there is none, or no /proc (not Linux)."""
    spans = {}
    for a in arrays:
        mm = mapping_of(a)
        if mm is not None and not mm.closed and len(mm):
            base = _address(mm)
            spans[base] = base + len(mm)
    if not spans:
        return 0, 0
    try:
        with open("/proc/self/smaps") as f:
            return smaps_sizes(f.read(), spans.items())
    except OSError:
        return 0, 0


def smaps_sizes(smaps: str, spans) -> tuple[int, int]:
    """(FilePmdMapped, Rss) in bytes, summed over the mappings in the text
    of a /proc/PID/smaps that overlap any (start, end) address span."""
    huge = rss = 0
    inside = False
    for line in smaps.splitlines():
        head = line.split(None, 1)[0] if line.strip() else ""
        if not head.endswith(":") and "-" in head:  # a mapping's first line: start-end perms ...
            lo, _, hi = head.partition("-")
            lo, hi = int(lo, 16), int(hi, 16)
            inside = any(lo < e and b < hi for b, e in spans)
        elif inside and head in ("FilePmdMapped:", "Rss:"):
            n = int(line.split()[1]) * 1024  # "Rss:  2148352 kB"
            if head == "Rss:":
                rss += n
            else:
                huge += n
    return huge, rss


def _release_pages(mm, start: int, nbytes: int) -> None:
    """Drop bytes start..start+nbytes of a read-only file mapping (and the
    rest of the page they begin in) from the resident set, once copied."""
    import mmap

    if hasattr(mm, "madvise") and nbytes:
        lo = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, start + nbytes - lo)


def _address(mm) -> int:
    """The address of an open, non-empty mmap.mmap's first byte."""
    return np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data


def mapping_of(a: np.ndarray):
    """The mmap.mmap an array views (one load_safetensors made), or None."""
    import mmap

    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
        return base.obj
    return None


def release_mapped(a: np.ndarray) -> bool:
    """Drop the pages of a memory-mapped tensor (one load_safetensors made)
    from this process's resident set: for a tensor the model stopped
    reading (surgery replaced it). They stay in the page cache and come
    back on the next read, so the array stays valid. Pages it shares with a
    neighbouring tensor are kept. Returns whether it was memory-mapped."""
    import mmap

    mm = mapping_of(a)
    if mm is None or mm.closed or not hasattr(mm, "madvise"):
        return False
    start = a.ctypes.data - _address(mm)
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    hi = (start + a.nbytes) // page * page
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return True


# ------------------------------------------------------- Hugging Face folders

# Hugging Face class -> its model_type and the defaults its config class uses
# for keys a config.json may leave out.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}),
    "MistralForCausalLM": ("mistral", {"max_position_embeddings": 4096 * 32,
                                       "rms_norm_eps": 1e-6, "sliding_window": 4096}),
    "Qwen2ForCausalLM": ("qwen2", {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}),
}
ROPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor"), "linear": ("factor",)}


def _architecture(d: dict, where: str) -> str:
    arch = d.get("architectures")
    types = {t: a for a, (t, _) in HF_ARCHITECTURES.items()}
    supported = ", ".join(HF_ARCHITECTURES)
    if arch is None or arch == []:  # older configs name only the model_type
        mt = d.get("model_type", "llama")
        if mt not in types:
            raise ValueError(f"{where}: model_type {mt!r} is not supported; supported: "
                             f"{', '.join(types)}")
        return types[mt]
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise ValueError(f"{where}: architectures must be a list of class names, got {arch!r}")
    known = [a for a in arch if a in HF_ARCHITECTURES]
    if not known:
        raise ValueError(f"{where}: architecture {', '.join(arch)} is not supported; "
                         f"supported: {supported}")
    name = known[0]
    mt = d.get("model_type", HF_ARCHITECTURES[name][0])
    if mt != HF_ARCHITECTURES[name][0]:
        raise ValueError(f"{where}: model_type {mt!r} does not match architecture {name} "
                         f"({HF_ARCHITECTURES[name][0]!r})")
    return name


def _rope(d: dict, where: str) -> dict:
    """RoPE settings from rope_parameters (transformers 5) or rope_scaling
    plus a top-level rope_theta (older files, and every real checkpoint's)."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for key, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{where}: {key} must be a JSON object or null, got {v!r}")
    # as transformers 5: a legacy rope_scaling is merged over rope_parameters
    rope = dict(params or {})
    if scaling:
        rope.update(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            rope["rope_type"] = scaling["type"]
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{where}: RoPE parameters per layer type ({', '.join(rope)}) are not "
                         "supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", *ROPE_KEYS):
        raise ValueError(f"{where}: RoPE type {kind!r} is not supported; supported: default, "
                         f"{', '.join(ROPE_KEYS)}")
    prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={prf!r} is not supported (1.0 only)")
    out: dict = {"rope_type": kind,
                 "rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0))}
    for k in ROPE_KEYS.get(kind, ()):
        if k not in rope:
            raise ValueError(f"{where}: RoPE type {kind!r} needs {k!r}")
        out[f"rope_{k}"] = rope[k]
    if kind == "llama3":
        orig = rope.get("original_max_position_embeddings",
                        d.get("original_max_position_embeddings", 0))
        out["rope_original_max_position_embeddings"] = orig or 0
    return out


def config_from_hf(d: dict, where: str = "config.json") -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict: LlamaForCausalLM
    (RoPE default, llama3 or linear; attention_bias), MistralForCausalLM
    (sliding window) or Qwen2ForCausalLM (q/k/v biases). Everything else
    (other classes, RoPE types, MLP biases, Qwen2's sliding window) is
    refused by name, not guessed."""
    arch = _architecture(d, where)
    model_type, defaults = HF_ARCHITECTURES[arch]
    rope = _rope(d, where)
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported ('silu')")
    if d.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    qkv_bias = o_bias = False
    window = 0
    if arch == "LlamaForCausalLM":
        qkv_bias = o_bias = d.get("attention_bias", False)
        if not isinstance(qkv_bias, bool):
            raise ValueError(f"{where}: attention_bias must be true or false, got {qkv_bias!r}")
    elif arch == "Qwen2ForCausalLM":
        qkv_bias = True
        if d.get("use_sliding_window"):
            raise ValueError(f"{where}: Qwen2 with use_sliding_window=true is not supported")
    else:
        window = d.get("sliding_window", defaults["sliding_window"])
        if window is None:
            window = 0
        elif isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{where}: sliding_window must be a positive int or null, got "
                             f"{window!r}")
    try:
        return LlamaConfig(
            hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            vocab_size=d["vocab_size"],
            max_position_embeddings=d.get("max_position_embeddings",
                                          defaults["max_position_embeddings"]),
            rms_norm_eps=d.get("rms_norm_eps", defaults["rms_norm_eps"]),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            head_dim=d.get("head_dim") or 0,
            bos_token_id=_first_id(d.get("bos_token_id"), 1),
            eos_token_id=_first_id(d.get("eos_token_id"), 2),
            architecture=arch, qkv_bias=qkv_bias, o_bias=o_bias, sliding_window=window,
            **rope,
        )
    except KeyError as e:
        raise ValueError(f"{where} lacks {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _first_id(v, default: int) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else v


def check_layer_count(config: LlamaConfig, n_tensors: int, where: object) -> None:
    """ValueError when the checkpoint cannot hold the config's layers (9
    tensors each, plus biases, the embedding and the final norm): checked
    before anything loops over the layers, so a config claiming 2**70 layers
    fails at once."""
    need = len(layer_keys(config)) * config.num_hidden_layers + 2
    if n_tensors < need:
        raise ValueError(f"config num_hidden_layers={config.num_hidden_layers} needs at least "
                         f"{need} tensors but {where} holds {n_tensors}")


def _shard_name(name: object, index: Path, tensor: str) -> str:
    """A shard file name from an index: a relative path inside the folder
    (no absolute paths, no '..'), as the Hugging Face writers make them."""
    p = Path(name) if isinstance(name, str) and name else None
    if p is None or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{index}: tensor {tensor!r} maps to {name!r}; expected the name of "
                         "a .safetensors file inside the model folder")
    return str(p)


def load_hf_folder(folder: str | os.PathLike, dtype: str | None = None,
                   factors_out: dict | None = None,
                   mmap: bool = True) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """config.json plus model.safetensors, or the shards that
    model.safetensors.index.json lists; every tensor checked against the
    config's shapes. dtype "bfloat16": the weight matrices stay bf16 (uint16
    arrays of bf16 bits, memory-mapped where the file allows, or copied
    into the process's memory with mmap=False); "float32": everything
    widened; None: bfloat16 when the checkpoint's matrices are all BF16,
    else float32.

    A factored folder (pcasurgery/factored.py) is checked against the ranks
    its config.json declares; its factored projections come back rebuilt
    dense (up @ down), and factors_out, when given, receives each factored
    layer's factors (layer -> factors, as factored.apply_factors takes them;
    nothing for a dense folder)."""
    from . import factored

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    raw = read_json_object(cfg_path, "config")
    config = config_from_hf(raw, str(cfg_path))
    lay = factored.layout(raw, config, str(cfg_path))
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    headers: dict[Path, tuple[dict[str, dict], int]] = {}  # each file's header, read once
    if index.exists():
        weight_map = read_json_object(index, "index").get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ValueError(f"index {index}: weight_map must be a JSON object")
        listing, n_tensors = index, len(weight_map)
    elif single.exists():
        headers[single] = read_safetensors_header(single)
        listing, n_tensors = single, len(headers[single][0])
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    check_layer_count(config, n_tensors, listing)  # before anything loops over the layers
    shapes = expected_shapes(config) if lay is None else factored.expected_shapes(config, lay)
    needed = [n for n in shapes if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    files: dict[str, list[str]] = {"model.safetensors": needed} if listing == single else {}
    if listing == index:
        for n in needed:
            if n not in weight_map:
                raise ValueError(f"{index} does not list tensor {n!r}")
            files.setdefault(_shard_name(weight_map[n], index, n), []).append(n)
    from .config import is_matrix
    from .dtypes import check_dtype

    for fname, names in files.items():  # every header and shape first, then the data
        fpath = folder / fname
        if fpath not in headers:
            headers[fpath] = read_safetensors_header(fpath)
        header = headers[fpath][0]
        for n in names:
            if n not in header:
                raise ValueError(f"{fpath} has no tensor {n!r}")
            if header[n]["shape"] != shapes[n]:
                raise ValueError(
                    f"{fpath}: tensor {n!r} has shape {list(header[n]['shape'])} but "
                    f"config.json implies {list(shapes[n])}"
                    + (" (from its ranks)" if n.endswith(("_a_proj.weight", "_b_proj.weight"))
                       else "")
                )
    if dtype is None:
        stored = {headers[folder / f][0][n]["dtype"] for f, ns in files.items() for n in ns
                  if is_matrix(n)}
        dtype = "bfloat16" if stored == {"BF16"} else "float32"
    check_dtype(dtype)
    weights: dict[str, np.ndarray] = {}
    for fname, names in files.items():
        fpath = folder / fname
        keep = frozenset(n for n in names if is_matrix(n)) if dtype == "bfloat16" else frozenset()
        weights.update(load_safetensors(fpath, names, headers[fpath], bf16=keep, mmap=mmap))
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    if lay is not None:
        weights, factors = factored.assemble(config, lay, weights)
        if factors_out is not None:
            factors_out.update(factors)
    return config, weights
