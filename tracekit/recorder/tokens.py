"""The exact text of each token, as bytes.

Decoding a single id often loses information (a byte-level BPE token can be half a UTF-8
character; SentencePiece drops the leading space of a lone piece), so we read the token's
surface form from the vocabulary and map it back to bytes:

* byte-level BPE (GPT-2, Llama-3, Qwen, the demo model): the GPT-2 byte-to-unicode table;
* SentencePiece: ``▁`` is a space and ``<0xNN>`` byte-fallback pieces are that byte;
* WordPiece (BERT): a word's first piece gets the space the tokenizer's decode puts before it
  (``the`` -> `` the``), a continuation loses its prefix (``##ing`` -> ``ing``), so that the
  texts of a sequence join into its text; punctuation the decoder glues to the word before
  (``.``, ``,``, ``!``, ``?``) gets no space;
* anything else (special tokens): the vocabulary string in UTF-8.

:func:`vocab_texts` gives every id's bytes, the vocabulary a trace stores.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["token_bytes", "vocab_texts"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-ins back to raw bytes."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer",
                                                                        None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    text = repr(decoder) + type(decoder).__name__
    return "ByteLevel" in text


def _word_piece(tokenizer: Any) -> tuple[str, bool] | None:
    """(continuation prefix, whether decode glues punctuation) of a WordPiece tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer",
                                                                        None)
    model = getattr(backend, "model", None)
    if model is not None and type(model).__name__ == "WordPiece":
        decoder = getattr(backend, "decoder", None)
        return (getattr(model, "continuing_subword_prefix", None) or "##",
                decoder is None or "cleanup=True" in repr(decoder))
    if model is None and hasattr(tokenizer, "wordpiece_tokenizer"):  # a slow BertTokenizer
        return "##", bool(getattr(tokenizer, "clean_up_tokenization_spaces", True))
    return None


_GLUED = frozenset(".,!?")


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """The bytes of each token of ``ids`` (``str(id)`` when there is no tokenizer)."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i).encode() for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    out: list[bytes] = []
    if _is_byte_level(tokenizer):
        table = _unicode_to_byte()
        for piece in pieces:
            if piece is None:
                out.append(b"")
            elif piece in special or any(ch not in table for ch in piece):
                out.append(piece.encode("utf-8"))
            else:
                out.append(bytes(table[ch] for ch in piece))
        return out
    word_piece = _word_piece(tokenizer)
    for i, piece in zip(ids, pieces, strict=True):
        if piece is None:
            out.append(tokenizer.decode([i]).encode("utf-8"))
            continue
        if word_piece is not None and piece not in special:
            prefix, glued = word_piece
            if piece.startswith(prefix) and len(piece) > len(prefix):
                out.append(piece[len(prefix):].encode("utf-8"))
            elif glued and piece in _GLUED:
                out.append(piece.encode("utf-8"))
            else:
                out.append(b" " + piece.encode("utf-8"))
            continue
        m = _BYTE_PIECE.match(piece)
        if m:
            out.append(bytes([int(m.group(1), 16)]))
        elif "▁" in piece and piece not in special:
            out.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            out.append(piece.encode("utf-8"))
    return out


def vocab_texts(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes of every token id ``0..vocab_size-1``, as :func:`token_bytes` gives them;
    ids the tokenizer does not have (a model's embedding padded past its vocabulary) are
    empty."""
    known = min(vocab_size, len(tokenizer))
    return token_bytes(tokenizer, range(known)) + [b""] * (vocab_size - known)
