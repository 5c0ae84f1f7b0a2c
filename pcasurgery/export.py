"""Writing results and models to disk, atomically: a failed or interrupted
write leaves nothing half-written behind."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .model import LlamaModel

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


@contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `target`; on success its files are moved
    into `target` (created if needed) one atomic rename each; on error it is
    removed and `target` is untouched."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is not
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
            return
        if not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a folder")
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it and one
    rename: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Fail early, before any work, if `folder` cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} exists and is not a folder")
    probe = folder if folder.exists() else folder.parent if str(folder.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} is not writable")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ValueError(f"{what} {folder} is not writable ({e.strerror})") from None


def check_empty_or_new(folder: str | os.PathLike, what: str) -> None:
    """ValueError unless `folder` does not exist yet or is an empty folder: a
    model folder must not keep stale files (an old
    model.safetensors.index.json would shadow the new model.safetensors)."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{what} {folder} exists and is not empty; expected a new or empty "
                         "folder (remove it or choose another)")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_safetensors(path: Path, tensors: Mapping[str, Any], dtype: str = "F32",
                      shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """A .safetensors file (F32 or BF16, rounded to nearest even), tensors in
    the given order, 8-byte aligned header as the reference writer makes.

    Written one tensor at a time (a bf16 model's file never needs a float32
    copy of the model): a value is an array (float, or uint16 bf16 bits), or
    a function returning one, called when its turn comes, whose shape
    `shapes` gives (so the header can be written first)."""
    from .dtypes import from_bf16_bits, to_bf16_bits

    if dtype not in ("F32", "BF16"):
        raise ValueError(f"dtype must be 'F32' or 'BF16', got {dtype!r}")
    item = 2 if dtype == "BF16" else 4
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, a in tensors.items():
        if callable(a):
            if shapes is None or name not in shapes:
                raise ValueError(f"shapes must give the shape of {name}, whose value is a function")
            shape = [int(x) for x in shapes[name]]
        else:
            shape = list(np.shape(a))
        size = item * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, a in tensors.items():
            a = np.asarray(a() if callable(a) else a)
            if list(a.shape) != header[name]["shape"]:
                raise ValueError(f"{name} has shape {a.shape}, expected {tuple(header[name]['shape'])}")
            if a.dtype == np.uint16:  # bf16 bits
                raw = np.ascontiguousarray(a) if dtype == "BF16" else from_bf16_bits(a)
            else:
                a = np.ascontiguousarray(a, dtype=np.float32)
                raw = to_bf16_bits(a) if dtype == "BF16" else a
            f.write(memoryview(raw).cast("B"))


def hf_config(model: LlamaModel, dtype: str) -> dict[str, Any]:
    """config.json for the model's class (Llama, Mistral or Qwen2), with the
    keys real checkpoints of that class carry (rope_scaling and rope_theta at
    the top level, which transformers 4 and 5 both read)."""
    from .checkpoints import HF_ARCHITECTURES

    c = model.config
    d: dict[str, Any] = {
        "architectures": [c.architecture], "model_type": HF_ARCHITECTURES[c.architecture][0],
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "torch_dtype": "bfloat16" if dtype == "BF16" else "float32",
    }
    if c.rope_type == "llama3":
        d["rope_scaling"] = {
            "rope_type": "llama3", "factor": c.rope_factor,
            "low_freq_factor": c.rope_low_freq_factor, "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_max_position_embeddings}
    elif c.rope_type == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_factor}
    if c.architecture == "LlamaForCausalLM":
        d.update(attention_bias=c.o_bias, mlp_bias=False)
    elif c.architecture == "MistralForCausalLM":
        d["sliding_window"] = c.sliding_window or None
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def save_hf_folder(model: LlamaModel, folder: str | os.PathLike, dtype: str | None = None
                   ) -> Path:
    """Write `model` (its current, possibly surgered, weights) as a Hugging
    Face folder that transformers and pcasurgery both load: config.json,
    model.safetensors and the source folder's tokenizer files. `folder` must
    be new or empty: nothing stale can then shadow the new files. dtype
    "F32" or "BF16"; None: BF16 for a model held in bfloat16 (exactly its
    weights), else F32."""
    if dtype is None:
        dtype = "BF16" if model.dtype == "bfloat16" else "F32"
    if dtype not in ("F32", "BF16"):
        raise ValueError(f"dtype must be 'F32' or 'BF16', got {dtype!r}")
    tensors = {n: model.stored_weight(n) for n in model.weights
               if not (n == "lm_head.weight" and model.config.tie_word_embeddings)}
    return write_hf_folder(model, folder, hf_config(model, dtype), tensors, dtype)


def write_hf_folder(model: LlamaModel, folder: str | os.PathLike, config: dict[str, Any],
                    tensors: Mapping[str, Any], dtype: str) -> Path:
    """config.json, model.safetensors (`tensors` in `dtype`) and the model's
    source tokenizer files, written into `folder` (new or empty) at once."""
    folder = Path(folder)
    check_writable(folder, "--save folder")
    check_empty_or_new(folder, "--save folder")
    with staging_dir(folder) as tmp:
        write_json(tmp / "config.json", config)
        write_safetensors(tmp / "model.safetensors", tensors, dtype)
        src = Path(model.source) if model.source else None
        if src is not None and src.is_dir():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
    return folder
