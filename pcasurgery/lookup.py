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


# What the forward pass reads from a repository: the config, the weights as
# safetensors (single file or shards; not consolidated.safetensors or .bin
# copies), the tokenizer and its config, the chat template.
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors",
               "model.safetensors.index.json", "model-*.safetensors", "tokenizer.json",
               "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja"]


def _hub():
    """huggingface_hub, imported without the warning its tqdm.auto import
    prints in a Jupyter kernel without ipywidgets (progress bars then fall
    back to text)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import huggingface_hub

        # its submodules load lazily, on first attribute access: load them here
        huggingface_hub.snapshot_download, huggingface_hub.try_to_load_from_cache  # noqa: B018
    return huggingface_hub


def find_in_hf_cache(model_id: str) -> Path | None:
    """The snapshot folder of `model_id` (its main revision) in the local
    Hugging Face cache, found by huggingface_hub itself, or None when it is
    not there (or has no config.json)."""
    try:
        cfg = _hub().try_to_load_from_cache(model_id, "config.json", cache_dir=hf_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    return Path(cfg).parent if isinstance(cfg, str) else None


def download(model_id: str) -> Path:
    """Download the files the forward pass needs (MODEL_FILES) of a model id
    into the Hugging Face cache, with huggingface_hub's progress bars; one
    clear FileNotFoundError for a gated, missing or unreachable model."""
    hub = _hub()
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(hub.snapshot_download(model_id, cache_dir=hf_cache_dir(),
                                          allow_patterns=MODEL_FILES))
    except GatedRepoError:
        reason = ("it is gated: accept its license on huggingface.co and log in "
                  "(`hf auth login`)")
    except RepositoryNotFoundError:
        reason = "the Hugging Face Hub has no such model (or it is private)"
    except Exception as e:  # offline, no network, a server error
        first = (str(e).strip().splitlines() or [""])[0]
        reason = f"downloading it failed ({type(e).__name__}: {first})"
    raise FileNotFoundError(
        f"model {model_id!r} is not in the Hugging Face cache ({hf_cache_dir()}) and {reason}. "
        f"Download it where there is a network (`hf download {model_id}`) or pass the path "
        "of a local folder with config.json and model.safetensors.")


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
    Hugging Face model id resolved from the local cache, else downloaded
    when the network answers (:func:`download`); "auto" (see
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
    return cached if cached is not None else download(s)
