"""The vocabulary a trace may carry (format 1.1): the text of every token id, as raw bytes.

Stored ragged, in two arrays: ``vocab_nbytes[i]`` is the length of token ``i``'s text and
``vocab_bytes`` holds every text, concatenated in id order. A plain zarr/h5py user reads it as
``ends = numpy.cumsum(vocab_nbytes); text_i = vocab_bytes[ends[i] - vocab_nbytes[i]:ends[i]]``.
Lengths rather than offsets, because small integers compress to a fraction of a byte each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import CorruptTraceError, TokenIdError, WriterError
from .format import MAX_VOCAB_BYTES, MAX_VOCAB_SIZE, TracePlan, decode_token_text


def pack_vocab(texts: Iterable[bytes | str]) -> tuple[np.ndarray, np.ndarray]:
    """``(vocab_nbytes, vocab_bytes)`` of token texts given in id order (str as UTF-8)."""
    raw = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
    if len(raw) > MAX_VOCAB_SIZE:
        raise WriterError(f"a vocabulary of {len(raw)} ids exceeds {MAX_VOCAB_SIZE}")
    nbytes = np.fromiter((len(r) for r in raw), dtype=np.int64, count=len(raw))
    if int(nbytes.sum()) > MAX_VOCAB_BYTES:
        raise WriterError(f"the vocabulary's texts take {int(nbytes.sum())} bytes, more than "
                          f"{MAX_VOCAB_BYTES}")
    return nbytes.astype(np.int32), np.frombuffer(b"".join(raw), dtype=np.uint8)


def plan_with_vocab(plan: TracePlan, vocab: Iterable[bytes | str] | None,
                ) -> tuple[TracePlan, tuple[np.ndarray, np.ndarray] | None]:
    """The plan with its vocabulary's size, and the packed vocabulary (or None).

    ``vocab`` has one text per token id (``plan.model.vocab_size`` of them): for byte-level
    BPE the raw bytes the token decodes to, as in ``token_bytes``."""
    if vocab is None:
        if plan.has_vocab:
            raise WriterError(f"the plan has a vocabulary of {plan.vocab_bytes} bytes; pass "
                              f"its texts as vocab=")
        return plan, None
    packed = pack_vocab(vocab)
    n, total = len(packed[0]), len(packed[1])
    if n != plan.model.vocab_size:
        raise WriterError(f"vocab has {n} token texts, but the model's vocab_size is "
                          f"{plan.model.vocab_size}")
    if plan.vocab_bytes not in (None, total):
        raise WriterError(f"vocab texts take {total} bytes, the plan says {plan.vocab_bytes}")
    return dataclasses.replace(plan, vocab_bytes=total), packed



class Vocabulary:
    """Every token id's text, loaded whole from a trace (checked before it is trusted)."""

    def __init__(self, nbytes: np.ndarray, data: np.ndarray) -> None:
        nbytes = np.asarray(nbytes, dtype=np.int64)
        if nbytes.ndim != 1 or (nbytes < 0).any():
            raise CorruptTraceError("vocab_nbytes holds negative lengths")
        ends = np.cumsum(nbytes)
        total = int(ends[-1]) if len(ends) else 0
        if total != len(data):
            raise CorruptTraceError(f"vocab_nbytes add up to {total} bytes, but vocab_bytes "
                                    f"holds {len(data)}")
        self._ends = ends
        self._data = bytes(np.asarray(data, dtype=np.uint8))
        self._texts: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._ends)

    def raw(self, token_id: int) -> bytes:
        """The stored bytes of one token id."""
        i = self._index(token_id)
        start = int(self._ends[i - 1]) if i else 0
        return self._data[start: int(self._ends[i])]

    def text(self, token_id: int) -> str:
        """One token id's text (invalid UTF-8, e.g. half a character, escaped)."""
        i = self._index(token_id)
        text = self._texts.get(i)
        if text is None:
            text = self._texts[i] = decode_token_text(self.raw(i))
        return text

    def decode(self, ids: Any) -> list[str]:
        """The text of each id of ``ids`` (an int, or any sequence or array of ints)."""
        flat = np.asarray(ids)
        if flat.dtype.kind not in "iu" and flat.size:
            raise TypeError(f"token ids must be integers, got {flat.dtype}")
        return [self.text(int(i)) for i in flat.reshape(-1)]

    def _index(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._ends):
            raise TokenIdError(f"token id {i} outside the vocabulary 0..{len(self._ends) - 1}")
        return i
