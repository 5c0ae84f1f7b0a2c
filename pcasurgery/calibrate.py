"""Calibration: the second moment of every layer's attention input.

For a layer with input h (the residual stream after the attention RMSNorm),
Σ = E[h hᵀ] over calibration tokens makes a basis activation-aware: the
error of a reconstruction Ŵ of W (k_proj, v_proj or both stacked) on those
inputs is E‖(W − Ŵ)h‖² = tr((W − Ŵ) Σ (W − Ŵ)ᵀ). The C forward pass
accumulates Σ (and the mean of h) while it runs the unmodified model over the
calibration windows, with the GIL released and no Python loop per token.

Calibration text is always separate from the eval text: by default it is
sampled from the unmodified model with seeds of its own (CALIB_SEED_BASE +
seed), so it never repeats the default eval text (seeds seed, seed+1, ...).
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _C

if TYPE_CHECKING:
    from .model import LlamaModel

DOC_SEPARATOR = "<|endoftext|>"
CALIB_SEED_BASE = 1_000_000
DEFAULT_CALIB_TOKENS = 2048


def split_documents(text: str) -> list[str]:
    """The documents of a text whose documents are separated by
    ``<|endoftext|>`` (as TinyStories is), stripped, empty ones dropped; a
    text without separators is one document."""
    return [d.strip() for d in text.split(DOC_SEPARATOR) if d.strip()]


def sampled_documents(model: LlamaModel, n_tokens: int, seed: int = 0) -> list[np.ndarray]:
    """Text sampled from the unmodified model (temperature 1, top-p 0.95) from
    BOS, one document per sample, seeds CALIB_SEED_BASE + seed, +1, ...,
    until n_tokens tokens. Token ids without BOS."""
    docs: list[np.ndarray] = []
    have = 0
    s = CALIB_SEED_BASE + seed
    while have < n_tokens:
        ids = model.generate_ids(None, max_new_tokens=min(n_tokens - have, model.n_ctx - 1),
                                 temperature=1.0, top_p=0.95, seed=s)
        s += 1
        if ids:
            docs.append(np.asarray(ids, dtype=np.int64))
            have += len(ids)
        elif s - CALIB_SEED_BASE - seed > 1000:
            raise ValueError("the model ends every sample at once; give --calib-text")
    return docs


def first_tokens(docs: list[Any], n: int) -> list[np.ndarray]:
    """The first n tokens of a list of documents, as documents."""
    out, have = [], 0
    for d in docs:
        if have >= n:
            break
        out.append(np.asarray(d, dtype=np.int64)[: n - have])
        have += len(out[-1])
    return [d for d in out if len(d)]


def document_windows(docs: list[Any], bos: int, n_ctx: int) -> list[np.ndarray]:
    """Windows of at most n_ctx tokens, each BOS + up to n_ctx - 1 tokens of
    one document (a long document is cut into several)."""
    w = n_ctx - 1
    out = []
    for d in docs:
        d = np.asarray(d, dtype=np.int64)
        out += [np.concatenate([[bos], d[i:i + w]]) for i in range(0, len(d), w)]
    return out


@dataclass
class Calibration:
    """Per-layer second moment and mean of the attention input.

    sigma : (L, D, D) float64, E[h hᵀ]
    mean : (L, D) float64, E[h]
    tokens : number of positions averaged (BOS included)
    source : what the calibration text was
    seconds : time the forward passes took
    """

    sigma: np.ndarray
    mean: np.ndarray
    tokens: int
    source: str
    seconds: float = 0.0
    cached: bool = False

    def describe(self) -> str:
        how = "loaded from the cache" if self.cached else f"{self.seconds:.1f} s"
        return f"{self.source}: {self.tokens} positions ({how})"


def calibrate(model: LlamaModel, docs: list[Any], n_ctx: int | None = None,
              source: str = "calibration text") -> Calibration:
    """Σ and the mean of every layer's attention input over `docs` (token
    ids without BOS), run in windows of n_ctx (default the model's context,
    at most 2048) with a BOS at each window's start."""
    n_ctx = min(model.n_ctx, 2048) if n_ctx is None else n_ctx
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 2 <= n_ctx <= model.n_ctx:
        raise ValueError(f"n_ctx must be an int in [2, {model.n_ctx}], got {n_ctx!r}")
    if not docs or not any(len(d) for d in docs):
        raise ValueError("the calibration text has no tokens")
    docs = [model._as_tokens(d, "calibration tokens") for d in docs if len(d)]
    c = model.config
    L, D = c.num_hidden_layers, c.hidden_size
    sigma = np.zeros((L, D, D))
    sums = np.zeros((L, D))
    count = 0
    t0 = time.perf_counter()
    with model.lock:
        for w in document_windows(docs, c.bos_token_id, n_ctx):
            model._rt.calibrate(w, sigma, sums)
            count += len(w)
        model._rt.reset()
    _C.symmetrize_upper(sigma, 1.0 / count)  # the C pass fills the upper triangles
    return Calibration(sigma, sums / count, count, source, time.perf_counter() - t0)


# ----------------------------------------------------------------- caching

def cache_dir() -> Path:
    """Where calibrations are kept: $PCASURGERY_CACHE, else
    ~/.cache/pcasurgery (under $XDG_CACHE_HOME when set)."""
    if os.environ.get("PCASURGERY_CACHE"):
        return Path(os.environ["PCASURGERY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pcasurgery"


def model_fingerprint(model: LlamaModel) -> str:
    """A hash of the model's config and every weight (bytes and shapes)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(sorted(vars(model.config).items())).encode())
    for name in sorted(model.weights):
        a = model.weights[name]
        h.update(name.encode() + repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _key(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"|")
    return h.hexdigest()


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # damaged: computed again


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    from .export import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # an unwritable cache only costs the next run the time


def cached_sampled_documents(model: LlamaModel, n_tokens: int, seed: int, folder: Path,
                             model_key: str | None = None) -> tuple[list[np.ndarray], bool]:
    """:func:`sampled_documents`, kept in `folder` (sampling N tokens decodes
    N steps: minutes for a 1B model). Returns (docs, loaded from the cache)."""
    model_key = model_key or model_fingerprint(model)
    path = folder / f"sample-{_key(model_key, n_tokens, seed, CALIB_SEED_BASE)}.npz"
    z = _load_npz(path)
    if z is not None and "ids" in z and "lengths" in z and int(z["lengths"].sum()) == len(z["ids"]):
        ends = np.cumsum(z["lengths"])
        return [a.astype(np.int64) for a in np.split(z["ids"], ends[:-1])], True
    docs = sampled_documents(model, n_tokens, seed)
    _save_npz(path, ids=np.concatenate(docs), lengths=np.array([len(d) for d in docs]))
    return docs, False


def cached_calibrate(model: LlamaModel, docs: list[Any], source: str, n_ctx: int | None = None,
                     folder: Path | None = None, model_key: str | None = None) -> Calibration:
    """:func:`calibrate`, kept in `folder` (default :func:`cache_dir`) under
    a hash of the model's weights, the tokens and the window length. A
    damaged cache file is computed again."""
    n_ctx = min(model.n_ctx, 2048) if n_ctx is None else n_ctx
    folder = cache_dir() if folder is None else folder
    toks = b"".join(np.asarray(d, dtype=np.int64).tobytes() + b"|" for d in docs)
    path = folder / f"calib-{_key(model_key or model_fingerprint(model), toks, n_ctx)}.npz"
    z = _load_npz(path)
    c = model.config
    if (z is not None and {"sigma", "mean", "tokens"} <= set(z)
            and z["sigma"].shape == (c.num_hidden_layers, c.hidden_size, c.hidden_size)):
        return Calibration(z["sigma"], z["mean"], int(z["tokens"]), source, 0.0, True)
    cal = calibrate(model, docs, n_ctx, source)
    _save_npz(path, sigma=cal.sigma, mean=cal.mean, tokens=np.array(cal.tokens))
    return cal
