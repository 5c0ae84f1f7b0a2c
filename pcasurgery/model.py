"""LlamaModel: a Llama-family decoder whose forward pass runs in C.

The weights are NumPy arrays owned by this object and keyed by their Hugging
Face names; the C runtime borrows them. With dtype "bfloat16" the weight
matrices stay bf16 in memory (uint16 arrays of bf16 bits, memory-mapped from
the checkpoint where possible) and the kernels widen them as they read;
norms and biases are float32. ``set_weight`` swaps one (e.g. a
PCA-reconstructed k_proj) without reloading or copying the others.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from . import _C
from .checkpoints import check_layer_count, load_llama2c
from .config import LlamaConfig, expected_shapes, runtime_names, weight_names
from .evaluate import log_softmax, window_scores


def _token_text_of(tok: Any, i: int | None) -> str:
    """The text of special token i ("" for none), as chat templates see
    bos_token and eos_token."""
    if i is None:
        return ""
    if hasattr(tok, "tk"):
        return tok.tk.id_to_token(i) or ""
    if hasattr(tok, "sp"):
        return tok.sp.id_to_piece(i)
    return {1: "<s>", 2: "</s>"}.get(i, "")


class WeightsView(Mapping):
    """Read-only mapping name -> float32 array of a model's weights (a
    bf16-resident matrix is widened on each access: a float32 copy)."""

    def __init__(self, model: LlamaModel) -> None:
        self._m = model

    def __getitem__(self, name: str) -> np.ndarray:
        a = self._m._weights[name]
        if a.dtype == np.uint16:
            from .dtypes import from_bf16_bits

            return from_bf16_bits(a)
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(self._m._weights)

    def __len__(self) -> int:
        return len(self._m._weights)


class LlamaModel:
    """A Llama decoder: config, tokenizer and float32 weights, with the C
    forward pass.

    Parameters
    ----------
    config : LlamaConfig
    weights : mapping name -> array
        Every tensor :func:`pcasurgery.config.weight_names` lists, with
        the shapes the config implies. Converted to C-contiguous float32.
    tokenizer : optional
        An object with ``encode``/``decode``/``bos_id``/``eos_id``.
    n_ctx : int, optional
        Context (KV-cache) length; default the config's
        max_position_embeddings.
    max_batch : int
        Tokens per prefill chunk (bounds the activation buffers; at most the
        context is used).
    dtype : "float32", "bfloat16" or None
        How the weight matrices are held. bfloat16: uint16 arrays of bf16
        bits are kept as they are (no copy), float arrays are rounded to
        bf16; the kernels compute in float32 on the widened values. None:
        bfloat16 when the given matrices are all uint16 (bf16 bits), else
        float32.

    Threads: a model may be shared between threads. Each call that runs it
    (``logits``, ``generate``, ``generate_ids``, ``perplexity``,
    ``kl_divergence``) or changes it (``set_weight``) holds the model's
    :attr:`lock` for its whole duration, so concurrent calls run one after
    another, each with its own use of the KV cache and one consistent set of
    weights. Hold ``model.lock`` yourself to make several calls one unit (as
    :class:`pcasurgery.evaluate.Evaluator` does). For parallel forward passes
    use one model per thread; they can share the weight arrays
    (``LlamaModel(m.config, m.weights)`` copies nothing, bf16 matrices
    included).
    """

    def __init__(
        self,
        config: LlamaConfig,
        weights: Mapping[str, Any],
        tokenizer: Any = None,
        *,
        n_ctx: int | None = None,
        max_batch: int = 512,
        source: str = "",
        dtype: str | None = None,
    ) -> None:
        from .config import is_matrix
        from .dtypes import check_dtype, from_bf16_bits, to_bf16_bits

        self.config = config
        self.tokenizer = tokenizer
        self.source = source
        if isinstance(weights, WeightsView):  # another model's: share its arrays as stored
            if dtype is None:
                dtype = weights._m.dtype
            weights = weights._m._weights
        check_layer_count(config, len(weights), "weights")
        shapes = expected_shapes(config)
        self._names = weight_names(config)
        if dtype is None:
            mats = [np.asarray(weights[n]).dtype for n in self._names
                    if is_matrix(n) and n in weights]
            dtype = "bfloat16" if mats and all(d == np.uint16 for d in mats) else "float32"
        self.dtype = check_dtype(dtype)
        self._weights: dict[str, np.ndarray] = {}
        for name in self._names:
            if name not in weights:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    self._weights[name] = self._weights["model.embed_tokens.weight"]
                    continue
                raise KeyError(f"weights has no tensor {name!r}")
            a = np.asarray(weights[name])
            if a.dtype == np.uint16 and not is_matrix(name):
                raise ValueError(f"{name} must be float, got bf16 bits (only weight matrices "
                                 "stay bf16)")
            if self.dtype == "bfloat16" and is_matrix(name):
                a = np.ascontiguousarray(a) if a.dtype == np.uint16 else to_bf16_bits(a)
            else:
                a = (from_bf16_bits(a) if a.dtype == np.uint16
                     else np.ascontiguousarray(a, dtype=np.float32))
            if a.shape != shapes[name]:
                raise ValueError(
                    f"{name} has shape {a.shape} but the config implies {shapes[name]}"
                )
            self._weights[name] = a
        n_ctx = config.max_position_embeddings if n_ctx is None else n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.n_ctx = n_ctx
        self.lock = threading.RLock()
        c = config
        rt_names = runtime_names(c)
        self._rt_index = {n: i for i, n in enumerate(rt_names)}
        self._rt = _C.LlamaRuntime(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
             c.num_key_value_heads, c.head_dim, c.vocab_size, n_ctx, float(c.rms_norm_eps),
             float(c.rope_theta), None if c.rope_type == "default" else c.rope_inv_freq(),
             c.sliding_window),
            [self._weights.get(n) for n in rt_names], rt_names, min(max_batch, n_ctx),
        )

    # ------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
        n_ctx: int | None = None, dtype: str | None = None, mmap: bool = True,
    ) -> LlamaModel:
        """Load a model from
        - ``"auto"``: TinyLlama-1.1B-Chat-v1.0 when it is in the local
          Hugging Face cache, else the embedded demo model (``"demo"``);
        - a Hugging Face folder (config.json, model.safetensors or shards,
          tokenizer.model or tokenizer.json);
        - a model id such as ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``, found in
          the local Hugging Face cache (downloaded only when huggingface_hub
          is installed and the network answers);
        - a llama2.c ``.bin`` checkpoint, its tokenizer ``.bin`` given or found
          beside it (``tok<V>.bin`` or ``tokenizer.bin``).
        n_ctx limits the context (and the KV cache). dtype: "bfloat16"
        (weight matrices stay bf16, memory-mapped where the file allows) or
        "float32"; None: the checkpoint's own when it is bf16, else float32.
        mmap=False: bf16 matrices are copied into the process's memory
        instead of memory-mapped: the same resident size and a slower load,
        in transparent huge pages. A mapping gets 2 MiB pages where the page
        cache holds the file in 2 MiB folios (a file read afresh, on Linux
        6.x), else 4 KiB ones (see the README)."""
        from .checkpoints import load_hf_folder
        from .lookup import resolve_model
        from .tokenizers import Llama2cTokenizer, load_hf_tokenizer

        if not isinstance(mmap, bool):
            raise TypeError(f"mmap must be True or False, got {mmap!r}")
        p = resolve_model(path_or_id)
        if p.is_dir():
            factors: dict = {}
            config, weights = load_hf_folder(p, dtype, factors_out=factors, mmap=mmap)
            tok = load_hf_tokenizer(Path(tokenizer) if tokenizer else p,
                                    bos_id=config.bos_token_id, eos_id=config.eos_token_id)
            if tok is not None and tok.vocab_size > config.vocab_size:
                raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model "
                                 f"only {config.vocab_size}")
            model = cls(config, weights, tok, n_ctx=n_ctx, source=str(p), dtype=dtype)
            if factors:  # a factored folder runs its latent path from the start
                from .factored import apply_factors

                apply_factors(model, factors)
            return model
        config, weights = load_llama2c(p)
        tok2c: Llama2cTokenizer | None = None
        cands = [Path(tokenizer)] if tokenizer else [
            p.with_name(f"tok{config.vocab_size}.bin"), p.with_name("tokenizer.bin")]
        for cand in cands:
            if cand.is_file():
                tok2c = Llama2cTokenizer(cand, vocab_size=config.vocab_size)
                break
        if tokenizer and tok2c is None:
            raise FileNotFoundError(f"tokenizer {tokenizer} does not exist")
        return cls(config, weights, tok2c, n_ctx=n_ctx, source=str(p), dtype=dtype or "float32")

    # ------------------------------------------------------------- weights
    @property
    def weights(self) -> WeightsView:
        """Read-only mapping of the weights by Hugging Face name (float32;
        a bf16-resident matrix is widened into a new array on each access)."""
        return WeightsView(self)

    def stored_weight(self, name: str) -> np.ndarray:
        """One weight as the model holds it, not copied: float32, or for a
        bf16-resident matrix its uint16 bf16 bits (possibly memory-mapped).
        Read-only by contract; :meth:`set_weight` takes it back unchanged."""
        if name not in self._weights:
            raise KeyError(f"no weight named {name!r}")
        return self._weights[name]

    def set_weight(self, name: str, array: Any, *, check_finite: bool = True) -> None:
        """Replace one weight by an array of the same shape (converted to
        C-contiguous float32; the model keeps it). Other weights are not
        touched or copied. check_finite=False skips the NaN/Inf scan, for
        arrays computed from finite weights (surgery's reconstructions). A
        model that holds its matrices in bfloat16 rounds a new matrix to
        bf16 (round to nearest even) and keeps that. A uint16 array is bf16
        bits (as :meth:`stored_weight` returns them): a bf16-resident model
        keeps it as it is, a float32 one widens it."""
        from .config import is_matrix
        from .dtypes import from_bf16_bits, to_bf16_bits

        if name not in self._weights:
            raise KeyError(f"no weight named {name!r}")
        bits = isinstance(array, np.ndarray) and array.dtype == np.uint16
        keep_bits = bits and self.dtype == "bfloat16" and is_matrix(name)
        if keep_bits:
            a = np.ascontiguousarray(array)
        elif bits:
            a = from_bf16_bits(array)
        else:
            a = np.ascontiguousarray(array, dtype=np.float32)
        if a.shape != self._weights[name].shape:
            raise ValueError(
                f"{name} must keep its shape {self._weights[name].shape}, got {a.shape}"
            )
        if keep_bits:
            if check_finite and _C.bf16_nonfinite(a) >= 0:
                raise ValueError(f"{name} replacement contains NaN or Inf")
        else:
            if check_finite and not np.isfinite(a).all():
                raise ValueError(f"{name} replacement contains NaN or Inf")
            if self.dtype == "bfloat16" and is_matrix(name):
                a = to_bf16_bits(a)
                if check_finite and _C.bf16_nonfinite(a) >= 0:
                    raise ValueError(f"{name} replacement overflows bfloat16")
        # a tied embedding and lm_head are one array under two names
        tied = {"model.embed_tokens.weight", "lm_head.weight"}
        names = tied if self.config.tie_word_embeddings and name in tied else {name}
        with self.lock:
            replaced = self._weights[name]
            for n in names:
                self._rt.set_weight(self._rt_index[n], a)
                self._weights[n] = a
            self._rt.reset()
            if replaced is not a and replaced.dtype == np.uint16:
                from .checkpoints import release_mapped

                release_mapped(replaced)  # a memory-mapped original leaves the resident set

    def set_latent(self, layer: int, k_down: Any, k_up: Any, v_down: Any = None,
                   v_up: Any = None) -> None:
        """Run layer's K and V from latents, and cache the latents instead
        of K and V (the latent path): K = k_up @ (k_down @ h), k_down (rk, D),
        k_up (kv_dim, rk); V from its own latent (v_down (rv, D), v_up
        (kv_dim, rv)) or, with v_down None, from K's (one shared latent, v_up
        (kv_dim, rk)). k_down and k_up None leave K dense (k_proj), v_up None
        leaves V dense; all None restore the layer's dense K and V. Keys are
        rebuilt from the cached latents at every step (RoPE sits between
        k_up and the scores) and V's up-projection is applied after the
        attention weights. The cache is laid out again for the new widths
        (:meth:`kv_cache_bytes`) and cleared. See :meth:`set_kv_quant`'s
        latent_bits for a quantised latent."""
        with self.lock:
            self._rt.set_latent(layer, k_down, k_up, v_down, v_up)
            self._rt.reset()

    def set_factored_q(self, layer: int, q_down: Any, q_up: Any) -> None:
        """Compute layer's queries from factors, q = q_up @ (q_down @ h):
        q_down (rq, D), q_up (num_heads * head_dim, rq), rq <= D + 1. Both
        None: q_proj again."""
        with self.lock:
            self._rt.set_factored_q(layer, q_down, q_up)
            self._rt.reset()

    def kv_cache_bytes(self, per_layer: bool = False) -> int | list[int]:
        """Bytes the KV cache really has allocated (float32, for n_ctx
        tokens): in total, or per layer. A dense layer holds K and V (2 x
        kv_dim floats per token), a latent one its latent's width."""
        with self.lock:
            widths = self._rt.cache_widths()
        b = [int(w) * self.n_ctx * 4 for w in widths]
        return b if per_layer else sum(b)

    def latent_layers(self) -> list[str]:
        """Per layer: "dense", or which of K, V and Q run from factors,
        e.g. "k|v shared", "k,v", "k", "q,k|v shared"."""
        out = []
        for layer in range(self.config.num_hidden_layers):
            kd, ku, vd, vu, qd, qu = self._rt.factors(layer)
            parts = []
            if qu is not None:
                parts.append("q")
            if vu is not None and vd is None:
                parts.append("k|v shared")
            else:
                parts += [p for p, a in (("k", ku), ("v", vu)) if a is not None]
            out.append(",".join(parts) or "dense")
        return out

    def set_kv_quant(self, k_bits: int = 0, v_bits: int = 0, group: int = 32,
                     k_per_channel: bool = False, latent_bits: int = 0,
                     latent_group: int = 32) -> None:
        """Simulate a quantised cache in the forward pass (0 bits: exact):
        K and V (K after RoPE) rounded as asymmetric groups of `group` values
        with a float16 scale and minimum, as they are written to the cache;
        k_per_channel groups K per channel over `group` tokens as KIVI does
        (a query sees complete groups quantised, its own open group exact);
        latent_bits rounds the latents of :meth:`set_latent` layers per token
        in groups of latent_group. No arguments: exact again."""
        with self.lock:
            self._rt.set_quant(k_bits, v_bits, group, k_per_channel, latent_bits, latent_group)
            self._rt.reset()

    # -------------------------------------------------------------- tokens
    def _as_tokens(self, tokens: Any, what: str = "tokens") -> np.ndarray:
        t = np.asarray(tokens)
        if t.ndim != 1 or (t.size and t.dtype.kind not in "iu"):
            raise TypeError(f"{what} must be a 1-D sequence of ints")
        if t.size == 0:
            raise ValueError(f"{what} is empty; expected at least one token")
        bad = (t < 0) | (t >= self.config.vocab_size)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{what}[{i}] = {int(t[i])} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        return t.astype(np.int64)

    def _encode(self, text: str, bos: bool, special: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text, bos=bos, special=special)

    # ------------------------------------------------------------- forward
    def logits(self, tokens: Any) -> np.ndarray:
        """Logits (T, vocab) float32 for a sequence starting at position 0."""
        t = self._as_tokens(tokens)
        if len(t) > self.n_ctx:
            raise ValueError(f"{len(t)} tokens exceed the context of {self.n_ctx} tokens")
        with self.lock:
            self._rt.reset()
            return self._rt.forward(t, 0, True)

    def generate(
        self, prompt: str | Any | None, max_new_tokens: int = 256, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None, chat: bool = False,
    ) -> str:
        """Continue `prompt` (text, encoded with BOS; token ids; or None for
        BOS alone) by up to
        max_new_tokens tokens and return the new text. Greedy at temperature
        0; otherwise softmax(logits / temperature) sampling, restricted to the
        top_p nucleus, reproducible for a given seed. Stops at EOS (or BOS,
        which llama2.c models emit between stories) and at the context end.
        chat=True wraps a text prompt, as the one user message, in the
        folder's chat template (rendered as transformers renders it), or in
        TinyLlama-Chat's when the model has none
        (:func:`pcasurgery.tokenizers.chat_prompt`)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; use generate_ids")
        ids = self.generate_ids(prompt, max_new_tokens, temperature, top_p, seed, chat)
        # ids past the tokenizer's vocabulary (padding rows of a larger
        # embedding) have no text: they are left out
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

    def generate_ids(
        self, prompt: str | Any | None, max_new_tokens: int = 256, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None, chat: bool = False,
    ) -> list[int]:
        """Like :meth:`generate`, returning the new token ids."""
        if prompt is None:  # from BOS alone, as llama2.c's run.c samples
            t = np.array([self.config.bos_token_id], dtype=np.int64)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; pass prompt=None to generate from BOS alone")
            if chat:
                t = self._as_tokens(self._chat_ids(prompt), "prompt")
            else:
                t = self._as_tokens(self._encode(prompt, bos=True), "prompt")
        else:
            t = self._as_tokens(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not (temperature >= 0.0) or not np.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if len(t) >= self.n_ctx:
            raise ValueError(
                f"prompt has {len(t)} tokens but the context holds {self.n_ctx}; "
                "no room to generate"
            )
        rng = np.random.default_rng(seed)
        stop = {self.config.eos_token_id, self.config.bos_token_id}
        if self.tokenizer is not None:
            stop |= {self.tokenizer.eos_id, self.tokenizer.bos_id}
        out: list[int] = []
        with self.lock:  # the KV cache is ours until the last token
            self._rt.reset()
            logits = self._rt.forward(t, 0, False)[0]
            pos = len(t)
            while len(out) < max_new_tokens:
                nxt = self._sample(logits, temperature, top_p, rng)
                if nxt in stop:
                    break
                out.append(nxt)
                if pos >= self.n_ctx:
                    break
                logits = self._rt.forward(np.array([nxt]), pos, False)[0]
                pos += 1
        return out

    def _chat_ids(self, prompt: str) -> list[int]:
        from .tokenizers import chat_prompt, check_text, render_chat

        tok = self.tokenizer
        template = getattr(tok, "chat_template", None)
        if not template:
            return self._encode(chat_prompt(prompt), bos=True, special=True)
        bos = _token_text_of(tok, tok.bos_id)
        eos = _token_text_of(tok, tok.eos_id)
        text = render_chat(template, [{"role": "user", "content": check_text(prompt, "prompt")}],
                           bos_token=bos, eos_token=eos)
        # as transformers' pipelines: the rendered text is tokenized with the
        # tokenizer's own BOS, unless the template already put it there
        return self._encode(text, bos=not (bos and text.startswith(bos)), special=True)

    @staticmethod
    def _sample(logits: np.ndarray, temperature: float, top_p: float,
                rng: np.random.Generator) -> int:
        if temperature == 0.0:
            return int(np.argmax(logits))
        logp = log_softmax(logits / temperature)
        p = np.exp(logp)
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, top_p)) + 1]
            q = p[keep] / p[keep].sum()
            return int(keep[rng.choice(len(keep), p=q)])
        return int(rng.choice(len(p), p=p / p.sum()))

    # ------------------------------------------------------------- metrics
    def _windows(self, text_or_tokens: str | Any, n_ctx: int) -> list[np.ndarray]:
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2:
            raise ValueError(f"n_ctx must be an int >= 2, got {n_ctx!r}")
        if n_ctx > self.n_ctx:
            raise ValueError(f"n_ctx={n_ctx} exceeds the model's context of {self.n_ctx}")
        if isinstance(text_or_tokens, str):
            if not text_or_tokens:
                raise ValueError("text is empty")
            toks = np.asarray(self._encode(text_or_tokens, bos=False), dtype=np.int64)
        else:
            toks = self._as_tokens(text_or_tokens)
        bos = self.config.bos_token_id
        w = n_ctx - 1
        return [np.concatenate([[bos], toks[i:i + w]]) for i in range(0, len(toks), w)]

    def perplexity(self, text_or_tokens: str | Any, n_ctx: int = 512) -> tuple[float, int]:
        """Perplexity of a text (or of token ids, without BOS).

        Protocol: the tokens are cut into non-overlapping windows of n_ctx - 1;
        each window is run with a BOS in front, and every token of every window
        is scored given BOS and the window's tokens before it (so each window's
        first token is predicted from BOS alone). Returns
        (exp(mean negative log-likelihood), number of tokens scored)."""
        nll, count = 0.0, 0
        windows = self._windows(text_or_tokens, n_ctx)
        with self.lock:  # one set of weights for every window
            for win in windows:
                nll += window_scores(self.logits(win), win)[0]
                count += len(win) - 1
        return float(np.exp(nll / count)), count

    def kl_divergence(
        self, reference: LlamaModel, text_or_tokens: str | Any, n_ctx: int = 512,
    ) -> tuple[float, float]:
        """Mean KL(reference ‖ self) per token (nats) and top-1 agreement, over
        the same windows as :meth:`perplexity`, one forward pass of each
        model per window."""
        if reference.config.vocab_size != self.config.vocab_size:
            raise ValueError("reference has a different vocabulary size")
        kl, agree, count = 0.0, 0, 0
        windows = self._windows(text_or_tokens, n_ctx)
        with ExitStack() as held:  # both models, always taken in one order
            for m in sorted({id(self): self, id(reference): reference}.items()):
                held.enter_context(m[1].lock)
            for win in windows:
                _, k, a = window_scores(self.logits(win), win, reference.logits(win))
                kl += k
                agree += a
                count += len(win)
        return kl / count, agree / count

