"""Tokenizers: SentencePiece models (TinyLlama's Llama-2 model, Mistral's),
Hugging Face tokenizer.json files (Llama 3's and Qwen2's byte-level BPE) and
llama2.c's vocabulary format, with the chat templates of Hugging Face folders.

Each exposes ``encode(text, bos=True, eos=False) -> list[int]``,
``decode(ids) -> str``, ``bos_id``, ``eos_id``, ``add_bos``, ``vocab_size``
and ``chat_template`` (None when the folder has none).
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

CHAT_SYSTEM = "You are a friendly chatbot."


def check_text(text: object, what: str = "text") -> str:
    """text itself if it is a str that UTF-8 can encode; a TypeError or a
    ValueError naming the first lone surrogate otherwise (such strings come
    from undecodable file names or command-line bytes)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} has a lone surrogate U+{ord(text[e.start]):04X} at index "
                         f"{e.start}; expected valid Unicode") from None
    return text


def _library_error(e: Exception) -> str:
    """The first line of a tokenizer library's message (they raise bare
    Exception, RuntimeError or OSError with long texts)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def encode_with_specials(tok, text: str, bos: bool, eos: bool, encode_part) -> list[int]:
    """Token ids of text in which the literal strings ``<s>`` and ``</s>``
    are BOS/EOS (as chat templates need); encode_part(part, after_special)
    encodes the text between them."""
    ids: list[int] = [tok.bos_id] if bos else []
    after_special = False
    for part in re.split(r"(</?s>)", text):
        if part in ("<s>", "</s>"):
            ids.append(tok.bos_id if part == "<s>" else tok.eos_id)
            after_special = True
        elif part:
            ids += encode_part(part, after_special)
            after_special = False
    return ids + ([tok.eos_id] if eos else [])


class Llama2cTokenizer:
    """llama2.c's tokenizer (``tokenizer.bin`` / ``tok512.bin``), as run.c
    encodes and decodes: a dummy-prefix space, one token per UTF-8 character
    with byte fallback (``<0xXX>`` = id byte + 3), then repeated merging of
    the adjacent pair whose concatenation is the highest-scoring piece.
    BOS = 1, EOS = 2."""

    bos_id = 1
    eos_id = 2
    add_bos = True
    chat_template: str | None = None

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None) -> None:
        from .checkpoints import check_regular_file

        path = Path(path)
        check_regular_file(path, "tokenizer")
        self.path = path
        data = path.read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path} is too short for a llama2.c tokenizer")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if off + 8 > len(data):
                raise ValueError(f"{path} is truncated at byte {off} (token {len(pieces)})")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise ValueError(f"{path}: token {len(pieces)} has length {n} past the end")
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{path} holds {len(pieces)} tokens but the model has {vocab_size}")
        self.pieces = pieces
        self.scores = np.array(scores, dtype=np.float32)
        self.vocab_size = len(pieces)
        self._lookup = {p: i for i, p in enumerate(pieces)}

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               special: bool = False) -> list[int]:
        check_text(text)
        if special:
            return encode_with_specials(self, text, bos, eos,
                                        lambda part, _: self.encode(part, bos=False))
        ids: list[int] = [self.bos_id] if bos else []
        toks: list[int] = []
        if text:
            if b" " not in self._lookup:
                raise ValueError(f"tokenizer {self.path} has no ' ' piece, which llama2.c's "
                                 "encoding needs for the dummy-prefix space")
            toks.append(self._lookup[b" "])
        for ch in text:
            b = ch.encode("utf-8")
            if b in self._lookup:
                toks.append(self._lookup[b])
            else:
                if self.vocab_size < 259:
                    raise ValueError(
                        f"tokenizer {self.path} has no piece for {ch!r} and, with "
                        f"{self.vocab_size} pieces, no <0x00>..<0xFF> byte fallback (ids 3-258)")
                toks.extend(byte + 3 for byte in b)
        pieces, scores, lookup = self.pieces, self.scores, self._lookup
        while True:
            best, best_i, best_id = -1e10, -1, -1
            for i in range(len(toks) - 1):
                j = lookup.get(pieces[toks[i]] + pieces[toks[i + 1]])
                if j is not None and scores[j] > best:
                    best, best_i, best_id = scores[j], i, j
            if best_i < 0:
                break
            toks[best_i:best_i + 2] = [best_id]
        ids += toks
        if eos:
            ids.append(self.eos_id)
        return ids

    def piece_bytes(self, prev: int, token: int) -> bytes:
        """run.c's decode(prev, token): the bytes token adds after prev."""
        p = self.pieces[token]
        if prev == self.bos_id and p.startswith(b" "):
            p = p[1:]
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            try:
                return bytes([int(p[3:5], 16)])
            except ValueError:
                return p
        return p

    def decode(self, ids: list[int] | np.ndarray) -> str:
        out = bytearray()
        prev = self.bos_id
        for t in (int(i) for i in ids):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
            if t in (0, self.bos_id, self.eos_id):
                prev = t
                continue
            out += self.piece_bytes(prev, t)
            prev = t
        return out.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model (``tokenizer.model``), e.g. Llama-2's, which
    TinyLlama uses unchanged."""

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        from .checkpoints import check_regular_file

        path = Path(path)
        check_regular_file(path, "tokenizer model")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises RuntimeError, OSError, ...
            raise ValueError(f"tokenizer model {path} is not a valid SentencePiece model "
                             f"({_library_error(e)})") from None
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        self.add_bos = True
        self.chat_template: str | None = None

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               special: bool = False) -> list[int]:
        """Token ids of text. special=True turns the literal strings ``<s>``
        and ``</s>`` into BOS/EOS (as chat templates need) and encodes the
        text after each without SentencePiece's dummy-prefix space, as
        transformers' non-legacy Llama tokenizer does."""
        check_text(text)
        if special:
            return encode_with_specials(self, text, bos, eos, self._encode_part)
        return ([self.bos_id] if bos else []) + list(self.sp.encode(text)) + (
            [self.eos_id] if eos else [])

    def _encode_part(self, text: str, no_prefix: bool) -> list[int]:
        if not no_prefix:
            return list(self.sp.encode(text))
        # encode "<unk>" + text and drop the "<unk>" pieces: no dummy prefix
        n = len(self.sp.encode("<unk>"))
        return list(self.sp.encode("<unk>" + text))[n:]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode(ids)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the `tokenizers` library
    (Llama 3's and Qwen2's byte-level BPE, or any other it holds).

    bos_id / eos_id: the ids of the folder's bos_token / eos_token (None:
    the model's). add_bos: whether ``encode(bos=True)`` puts a BOS in front;
    None asks the tokenizer.json itself (its post-processor adds one, as
    Llama 3's does, or not, as Qwen2's)."""

    def __init__(self, path: str | os.PathLike, bos_id: int | None = 1, eos_id: int | None = 2,
                 add_bos: bool | None = None, bos_token: str | None = None,
                 eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        from .checkpoints import check_regular_file

        check_regular_file(Path(path), "tokenizer")
        self.path = Path(path)
        try:
            self.tk = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ValueError(f"tokenizer {path} is not a valid tokenizer.json "
                             f"({_library_error(e)})") from None
        self.vocab_size = int(self.tk.get_vocab_size())
        for key, text in (("bos_token", bos_token), ("eos_token", eos_token)):
            if text is not None and self.tk.token_to_id(text) is None:
                raise ValueError(f"{key} {text!r} is not in tokenizer {self.path}")
        self.bos_id = bos_id if bos_token is None else self.tk.token_to_id(bos_token)
        self.eos_id = eos_id if eos_token is None else self.tk.token_to_id(eos_token)
        if add_bos is None:
            try:
                plain = self.tk.encode("a", add_special_tokens=False).ids
                full = self.tk.encode("a", add_special_tokens=True).ids
            except Exception as e:
                raise ValueError(f"tokenizer {self.path} cannot encode text "
                                 f"({_library_error(e)})") from None
            add_bos = len(full) > len(plain) and full[0] == self.bos_id
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template: str | None = None

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               special: bool = False) -> list[int]:
        """special: the tokenizer.json's own special tokens (e.g. ``</s>``,
        ``<|im_start|>``) are always recognised in text by the tokenizers
        library. bos adds the BOS only when this tokenizer uses one."""
        check_text(text)
        try:  # a tokenizer.json that loads can still fail here (an unk token it lacks)
            ids = list(self.tk.encode(text, add_special_tokens=False).ids)
        except Exception as e:
            raise ValueError(f"tokenizer {self.path} cannot encode the text "
                             f"({_library_error(e)})") from None
        head = [self.bos_id] if bos and self.add_bos else []
        return head + ids + ([self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
        try:
            return self.tk.decode(ids, skip_special_tokens=True)
        except Exception as e:
            raise ValueError(f"tokenizer {self.path} cannot decode the ids "
                             f"({_library_error(e)})") from None


def _token_text(v: object, where: str, key: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an
    AddedToken object ({"content": ...}) or null."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise ValueError(f"{where}: {key} must be a string, an object with \"content\" or null, "
                     f"got {v!r}")


def read_chat_template(folder: Path, tc: dict) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers' own
    file since 4.43), else tokenizer_config.json's chat_template (a string,
    or a list of named templates: the one named "default")."""
    from .checkpoints import read_text_file

    f = folder / "chat_template.jinja"
    if f.is_file():
        return read_text_file(f, "chat template")
    t = tc.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if t is not None and not isinstance(t, str):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string "
                         "or a list of {name, template} objects")
    return t


def load_hf_tokenizer(path: str | os.PathLike, bos_id: int | None = None,
                      eos_id: int | None = None) -> SentencePieceTokenizer | HFTokenizer | None:
    """The tokenizer of a Hugging Face folder (tokenizer.model preferred, as
    TinyLlama's is the Llama-2 SentencePiece model; else tokenizer.json), a
    tokenizer file, or None when the folder has neither. The folder's
    tokenizer_config.json names the special tokens, whether a BOS is added,
    and the chat template (kept as ``chat_template``, None without one);
    bos_id / eos_id (the model config's) stand in for tokens it leaves out."""
    from .checkpoints import read_json_object

    p = Path(path)
    folder = p.parent if p.is_file() else p
    tc_path = folder / "tokenizer_config.json"
    tc = read_json_object(tc_path, "tokenizer config") if tc_path.is_file() else {}
    if p.is_file():
        tok_file = p
    elif (p / "tokenizer.model").is_file():
        tok_file = p / "tokenizer.model"
    elif (p / "tokenizer.json").is_file():
        tok_file = p / "tokenizer.json"
    else:
        return None
    tok: SentencePieceTokenizer | HFTokenizer
    if tok_file.suffix != ".json":
        tok = SentencePieceTokenizer(tok_file)
    else:
        add = tc.get("add_bos_token")
        if add is not None and not isinstance(add, bool):
            raise ValueError(f"{tc_path}: add_bos_token must be true or false, got {add!r}")
        try:
            tok = HFTokenizer(
                tok_file, bos_id=1 if bos_id is None else bos_id,
                eos_id=2 if eos_id is None else eos_id, add_bos=add,
                bos_token=_token_text(tc.get("bos_token"), str(tc_path), "bos_token"),
                eos_token=_token_text(tc.get("eos_token"), str(tc_path), "eos_token"))
        except ValueError as e:
            if "is not in tokenizer" not in str(e):
                raise
            raise ValueError(f"{tc_path}: {e}") from None
    tok.chat_template = read_chat_template(folder, tc)
    return tok


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """A chat template rendered as transformers' apply_chat_template renders
    it: a sandboxed Jinja environment with trim_blocks and lstrip_blocks,
    raise_exception, strftime_now and a tojson that keeps non-ASCII."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None


def chat_prompt(question: str, system: str | None = CHAT_SYSTEM) -> str:
    """TinyLlama-Chat's template (Zephyr style): ``<|system|>``, ``<|user|>``
    and ``<|assistant|>`` turns, each message ending in ``</s>``."""
    parts = []
    if system is not None:
        parts.append(f"<|system|>\n{system}</s>\n")
    parts.append(f"<|user|>\n{question}</s>\n<|assistant|>\n")
    return "".join(parts)
