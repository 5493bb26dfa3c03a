"""Settings of one emulator instance (frozen, passed to :func:`create_app`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EmulatorConfig:
    """How an emulator behaves.

    ``api_key`` None accepts any key starting ``sk-``; ``data_dir`` None uses a
    temporary directory removed at shutdown. The three durations time the batch walk
    (0 makes it instant). ``enqueued_token_limit`` fails new batches whose tokens would
    push the tokens of batches in flight over it. ``rpm``/``tpm`` enforce one-minute
    windows on ``POST /v1/embeddings``; ``rate_window_s`` enforces them in shorter
    slices instead (OpenAI documents that a per-minute limit may be enforced as a
    per-second one): each slice allows its share, ``limit * rate_window_s / 60``,
    while the headers keep reporting the per-minute limit. ``faults`` is a fault script (see
    :mod:`embedd.emulator.faults`); ``seed`` makes random faults and output order
    reproducible. ``auth_header`` selects where the key is expected.
    """

    api_key: str | None = None
    data_dir: Path | None = None
    validating_s: float = 0.2
    in_progress_s: float = 0.2
    finalizing_s: float = 0.2
    enqueued_token_limit: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    rate_window_s: float = 60.0
    faults: Mapping[str, Any] | None = None
    seed: int = 0
    # "authorization" (OpenAI: `Authorization: Bearer KEY`) or "api-key" (Azure OpenAI:
    # `api-key: KEY`); the other header is then refused like a missing key.
    auth_header: str = "authorization"
