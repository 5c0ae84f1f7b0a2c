"""Where a model argument points: a folder, a llama2.c .bin file, a model id
in the local Hugging Face cache, "auto" (TinyLlama from the cache, else the
embedded demo model) or "demo"."""
from __future__ import annotations

import os
from pathlib import Path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def find_in_hf_cache(model_id: str) -> Path | None:
    """The snapshot folder of `model_id` in the local cache (refs/main first,
    else the newest snapshot holding a config.json), or None."""
    repo = hf_cache_dir() / ("models--" + model_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        cand = snaps / ref.read_text().strip()
        if (cand / "config.json").is_file():
            return cand
    found = [d for d in snaps.iterdir() if (d / "config.json").is_file()]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


DEFAULT_MODEL_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "models" / "demo"
DEMO_DESCRIPTION = ("pcasurgery's embedded demo model, a tiny Llama trained on Jane Austen, "
                    "a demo, not a useful language model")


def resolve_auto() -> tuple[Path, str]:
    """The default model: TinyLlama-1.1B-Chat-v1.0 when it is in the local
    Hugging Face cache, else the embedded demo model. Returns (folder, a
    sentence saying which one and why)."""
    snap = find_in_hf_cache(DEFAULT_MODEL_ID)
    if snap is not None:
        return snap, f"{DEFAULT_MODEL_ID} from the Hugging Face cache ({snap})"
    return DEMO_MODEL_DIR, (f"{DEMO_DESCRIPTION} ({DEFAULT_MODEL_ID} is not in the Hugging "
                            f"Face cache {hf_cache_dir()})")


def resolve_model(path_or_id: str | os.PathLike) -> Path:
    """A local path for a model argument: an existing folder or .bin file; a
    Hugging Face model id resolved from the local cache (downloaded only when
    huggingface_hub is installed and the network answers); "auto" (see
    :func:`resolve_auto`) or "demo" (the embedded demo model)."""
    if path_or_id == "auto":
        return resolve_auto()[0]
    if path_or_id == "demo":
        return DEMO_MODEL_DIR
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        if p.suffix != ".bin":
            raise ValueError(f"{p}: not a supported checkpoint (a Hugging Face folder or a "
                             "llama2.c .bin file)")
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")) or s.endswith(".bin"):
        raise FileNotFoundError(f"model path {s} does not exist")
    cached = find_in_hf_cache(s)
    if cached is not None:
        return cached
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        reason = "huggingface_hub is not installed, so it cannot be downloaded"
    else:
        try:
            return Path(snapshot_download(
                s, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
        except Exception as e:  # offline, unknown id, gated model...
            first = (str(e).strip().splitlines() or [""])[0]
            reason = f"downloading it failed ({type(e).__name__}: {first})"
    raise FileNotFoundError(
        f"model {s!r} is not in the Hugging Face cache ({hf_cache_dir()}) and {reason}. "
        f"Download it where there is a network (`huggingface-cli download {s}`) or pass "
        "the path of a local folder with config.json and model.safetensors."
    )
