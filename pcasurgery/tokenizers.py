"""Tokenizers: the Llama-2 SentencePiece model (TinyLlama) and llama2.c's
vocabulary format.

Both expose ``encode(text, bos=True, eos=False) -> list[int]``,
``decode(ids) -> str``, ``bos_id``, ``eos_id`` and ``vocab_size``.
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
    """A Hugging Face ``tokenizer.json`` through the `tokenizers` library,
    for checkpoints that ship no tokenizer.model."""

    def __init__(self, path: str | os.PathLike, bos_id: int = 1, eos_id: int = 2) -> None:
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
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               special: bool = False) -> list[int]:
        """special: the tokenizer.json's own special tokens (e.g. ``</s>``)
        are always recognised in text by the tokenizers library."""
        check_text(text)
        try:  # a tokenizer.json that loads can still fail here (an unk token it lacks)
            ids = list(self.tk.encode(text, add_special_tokens=False).ids)
        except Exception as e:
            raise ValueError(f"tokenizer {self.path} cannot encode the text "
                             f"({_library_error(e)})") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

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


def load_hf_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer | None:
    """The tokenizer of a Hugging Face folder (tokenizer.model preferred, as
    TinyLlama's is the Llama-2 SentencePiece model), a tokenizer file, or
    None when the folder has neither."""
    p = Path(path)
    if p.is_file():
        return HFTokenizer(p) if p.suffix == ".json" else SentencePieceTokenizer(p)
    if (p / "tokenizer.model").is_file():
        return SentencePieceTokenizer(p / "tokenizer.model")
    if (p / "tokenizer.json").is_file():
        return HFTokenizer(p / "tokenizer.json")
    return None


def chat_prompt(question: str, system: str | None = CHAT_SYSTEM) -> str:
    """TinyLlama-Chat's template (Zephyr style): ``<|system|>``, ``<|user|>``
    and ``<|assistant|>`` turns, each message ending in ``</s>``."""
    parts = []
    if system is not None:
        parts.append(f"<|system|>\n{system}</s>\n")
    parts.append(f"<|user|>\n{question}</s>\n<|assistant|>\n")
    return "".join(parts)
