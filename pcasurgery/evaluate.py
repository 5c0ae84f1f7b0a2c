"""What a surgery did to the model: perplexity, KL divergence to the unmodified
model, top-1 agreement, a generated sample, and the eval text itself.

The base model's log-probabilities are computed once, before any surgery;
each setting then costs one forward pass per window.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .model import LlamaModel


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def window_nll(logp: np.ndarray, win: np.ndarray) -> float:
    """Negative log-likelihood of win[1:] under log-probs logp (len(win), V)
    of a window that starts with BOS: every token after BOS is scored."""
    return -float(logp[np.arange(len(win) - 1), win[1:]].sum())


def window_kl_agree(ref: np.ndarray, other: np.ndarray) -> tuple[float, int]:
    """Summed KL(ref || other) over positions and the number of positions
    whose argmax agrees, for log-probs (T, V)."""
    return (float((np.exp(ref) * (ref - other)).sum()),
            int((ref.argmax(-1) == other.argmax(-1)).sum()))


# Log-prob rows computed at once: float64 temporaries of (ROWS, V), never of
# (T, V) (a 128k vocabulary makes a 512-token window's 0.5 GB each).
ROWS = 64


def window_scores(logits: np.ndarray, win: np.ndarray,
                  ref: np.ndarray | None = None) -> tuple[float, float, int]:
    """For a window's logits (T, V): the negative log-likelihood of win[1:]
    (as window_nll), and with ref (the reference's logits, (T, V)) the
    summed KL(ref || these) and argmax agreements (as window_kl_agree on
    both log-probs), computed ROWS rows at a time."""
    nll = kl = 0.0
    agree = 0
    T = len(win)
    for r0 in range(0, T, ROWS):
        ls = log_softmax(logits[r0:r0 + ROWS])
        r1 = r0 + len(ls)
        rows = np.arange(r0, min(r1, T - 1))
        nll -= float(ls[rows - r0, win[rows + 1]].sum())
        if ref is not None:
            k, a = window_kl_agree(log_softmax(ref[r0:r1]), ls)
            kl += k
            agree += a
    return nll, kl, agree


@dataclass
class Quality:
    perplexity: float
    kl: float           # mean KL(base || surgered) per token, nats
    top1: float         # fraction of positions whose argmax agrees with the base
    tokens: int         # tokens scored
    seconds: float


def default_eval_tokens(model: LlamaModel, n_tokens: int, seed: int = 0) -> np.ndarray:
    """Eval text when none is given: the unmodified model's own sample
    (temperature 1, top-p 0.95, fixed seed) from BOS, so the default needs no
    data. Token ids without BOS."""
    out: list[int] = []
    s = seed
    while len(out) < n_tokens:  # a sample may stop at EOS early: continue with another seed
        need = n_tokens - len(out)
        ids = model.generate_ids(None, max_new_tokens=min(need, model.n_ctx - 1),
                                 temperature=1.0, top_p=0.95, seed=s)
        out += ids if ids else [model.config.bos_token_id]
        s += 1
    return np.asarray(out[:n_tokens], dtype=np.int64)


class Evaluator:
    """Scores the current weights of `model` against the weights it has now.

    tokens: eval token ids (without BOS); windows of n_ctx - 1, each after a
    BOS, as :meth:`LlamaModel.perplexity` does. Or docs: a list of documents
    (token ids without BOS each), scored each from a BOS of its own, as
    llama2.c does (a document longer than a window is cut into several).
    """

    def __init__(self, model: LlamaModel, tokens: Any = None, n_ctx: int = 512,
                 docs: list[Any] | None = None) -> None:
        self.model = model
        if (tokens is None) == (docs is None):
            raise ValueError("give exactly one of tokens and docs")
        if docs is not None:
            from .calibrate import document_windows

            model._windows([0], n_ctx)  # checks n_ctx
            docs = [model._as_tokens(d, f"docs[{i}]") for i, d in enumerate(docs)]
            if not docs:
                raise ValueError("docs is empty; expected at least one document")
            self.windows = document_windows(docs, model.config.bos_token_id, n_ctx)
        else:
            self.windows = model._windows(tokens, n_ctx)
        t0 = time.perf_counter()
        nll = 0.0
        self.base = []  # the base logits (float32; log-probs are computed as they are used)
        with model.lock:
            for w in self.windows:
                lb = model.logits(w)
                nll += window_scores(lb, w)[0]
                self.base.append(lb)
        # the base against itself: KL 0 and every argmax agrees, exactly
        scored = sum(len(w) - 1 for w in self.windows)
        self.base_quality = Quality(float(np.exp(nll / scored)), 0.0, 1.0, scored,
                                    time.perf_counter() - t0)

    def evaluate(self) -> Quality:
        t0 = time.perf_counter()
        nll = kl = 0.0
        agree = count = scored = 0
        with self.model.lock:  # one set of weights for every window
            for w, lb in zip(self.windows, self.base):
                n, k, a = window_scores(self.model.logits(w), w, lb)
                nll += n
                kl += k
                agree += a
                count += len(w)
                scored += len(w) - 1
        return Quality(float(np.exp(nll / scored)), kl / count, agree / count, scored,
                       time.perf_counter() - t0)
