"""Token bitmasks in llguidance's layout: int32 words, bit i % 32 of word i // 32 = token i."""

from __future__ import annotations

import numpy as np


def words_for(n_tokens: int) -> int:
    return -(-n_tokens // 32)


def put(words: np.ndarray, ids, on: bool) -> None:
    """Set (on) or clear the bits of `ids`."""
    view = words.view(np.uint32)
    for i in ids:
        bit = np.uint32(1 << (int(i) & 31))
        view[int(i) >> 5] = view[int(i) >> 5] | bit if on else view[int(i) >> 5] & ~bit


def of(ids, n_words: int) -> np.ndarray:
    """A bitmask of `n_words` words with exactly `ids` set."""
    words = np.zeros(n_words, np.int32)
    put(words, ids, True)
    return words


def widened(bits: np.ndarray, n_words: int) -> np.ndarray:
    """`bits` in a mask of `n_words` words (the model's vocabulary may be the larger)."""
    out = np.zeros(n_words, np.int32)
    out[:len(bits)] = bits
    return out


def select(words: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The ids among `ids` (int64) whose bits are set."""
    return ids[(words.view(np.uint32)[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1 == 1]
