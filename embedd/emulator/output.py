"""Embedding responses, for the sync endpoint and for batch output files.

:func:`write_batch_output` answers the lines of a batch input file and streams the
``BatchRequestOutput`` lines to disk in chunks, so a 50,000-line batch never sits in
memory whole. Lines are answered in a deterministic shuffle of the input order (the
real API keeps no order either). Lines the batch did not reach (expired, cancelled)
go to the error file with ``batch_expired`` / ``batch_cancelled``; lines picked by the
``failed_line_rate`` fault go there with a 400 or 500 response.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from embedd.emulator.errors import ApiError, error_body
from embedd.emulator.validation import EmbeddingRequest, parse_embedding_request
from embedd.emulator.vectors import FloatArray, embed_texts, to_base64, to_floats

_CHUNK = 256  # lines embedded together


@dataclass(frozen=True)
class OutputSummary:
    """What a finished batch produced."""

    completed: int
    failed: int
    tokens: int
    output_lines: int
    error_lines: int
    billed: list[str] = field(default_factory=list)  # custom_id of every line billed


class Aborted(Exception):
    """Output writing stopped because the emulator is shutting down."""


def embedding_response(req: EmbeddingRequest, matrix: FloatArray | None = None) -> dict[str, Any]:
    """A ``CreateEmbeddingResponse`` body for a validated request.

    ``matrix`` holds the request's vectors when the caller embedded them already.
    """
    if matrix is None:
        matrix = embed_texts(req.texts, req.dimensions)
    encode = to_base64 if req.encoding_format == "base64" else to_floats
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(row)}
            for i, row in enumerate(matrix)
        ],
        "model": req.model,
        "usage": {"prompt_tokens": req.total_tokens, "total_tokens": req.total_tokens},
    }


def _short_id(*parts: object) -> str:
    return hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _line_offsets(path: Path) -> list[tuple[int, int]]:
    offsets: list[tuple[int, int]] = []
    position = 0
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                offsets.append((position, len(line)))
            position += len(line)
    return offsets


class _Writer:
    """Appends JSON lines to a temporary file, renamed into place on success."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(final.name + ".part")
        self.handle: IO[bytes] = self.tmp.open("wb")
        self.lines = 0

    def write(self, obj: dict[str, Any]) -> None:
        self.handle.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        self.lines += 1

    def finish(self) -> Path | None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if self.lines == 0:
            self.tmp.unlink()
            return None
        self.tmp.replace(self.final)
        return self.final

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def write_batch_output(
    *,
    batch_id: str,
    input_path: Path,
    output_path: Path,
    error_path: Path,
    done: int,
    unfinished_code: str,
    failed_line_rate: float,
    failed_line_status: int,
    seed: int,
    stop: threading.Event,
) -> OutputSummary:
    """Answer the first ``done`` lines of the shuffled input; write output and error files.

    ``unfinished_code`` (``batch_expired`` or ``batch_cancelled``) marks the lines past
    ``done``. A file with no line is not left on disk.
    """
    offsets = _line_offsets(input_path)
    order = list(range(len(offsets)))
    rng = random.Random(f"{seed}:{batch_id}")
    rng.shuffle(order)
    out, err = _Writer(output_path), _Writer(error_path)
    completed = failed = tokens = 0
    billed: list[str] = []
    try:
        with input_path.open("rb") as source:
            for start in range(0, min(done, len(order)), _CHUNK):
                if stop.is_set():
                    raise Aborted
                chunk = order[start : min(start + _CHUNK, done)]
                lines = []
                for index in chunk:
                    source.seek(offsets[index][0])
                    lines.append(json.loads(source.read(offsets[index][1])))
                for obj, response in _answer(
                    lines, batch_id, rng, failed_line_rate, failed_line_status
                ):
                    ok = response["status_code"] == 200
                    (out if ok else err).write(
                        {
                            "id": f"batch_req_{_short_id(batch_id, obj['custom_id'])}",
                            "custom_id": obj["custom_id"],
                            "response": response,
                            "error": None,
                        }
                    )
                    if ok:
                        completed += 1
                        tokens += response["body"]["usage"]["total_tokens"]
                        billed.append(obj["custom_id"])
                    else:
                        failed += 1
            source.seek(0)
            for index in order[done:]:
                source.seek(offsets[index][0])
                obj = json.loads(source.read(offsets[index][1]))
                err.write(_unfinished(batch_id, obj["custom_id"], unfinished_code))
                failed += 1
    except BaseException:
        out.discard()
        err.discard()
        raise
    out.finish()
    err.finish()
    return OutputSummary(completed, failed, tokens, out.lines, err.lines, billed)


def _unfinished(batch_id: str, custom_id: str, code: str) -> dict[str, Any]:
    message = (
        "This request could not be executed before the completion window expired."
        if code == "batch_expired"
        else "This request was not executed because the batch was cancelled."
    )
    return {
        "id": f"batch_req_{_short_id(batch_id, custom_id)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _answer(
    lines: list[dict[str, Any]],
    batch_id: str,
    rng: random.Random,
    failed_line_rate: float,
    failed_line_status: int,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Answer a chunk of lines; requests of equal dimensions are embedded together."""
    answers: list[tuple[dict[str, Any], dict[str, Any]]] = []
    pending: list[tuple[int, EmbeddingRequest]] = []
    for obj in lines:
        request_id = f"req_{_short_id(batch_id, obj['custom_id'], 'r')}"
        if failed_line_rate > 0 and rng.random() < failed_line_rate:
            if failed_line_status == 400:
                body = error_body("The input could not be processed.")
            else:
                body = error_body(
                    "The server had an error while processing your request. Sorry about that!",
                    type_="server_error",
                )
            answers.append(
                (obj, {"status_code": failed_line_status, "request_id": request_id, "body": body})
            )
            continue
        try:
            req = parse_embedding_request(obj["body"])
        except ApiError as exc:
            response = {"status_code": exc.status, "request_id": request_id, "body": exc.body()}
            answers.append((obj, response))
            continue
        pending.append((len(answers), req))
        answers.append((obj, {"status_code": 200, "request_id": request_id, "body": {}}))
    # One embed call per distinct dimensions keeps the numpy work vectorised.
    for dims in {req.dimensions for _, req in pending}:
        group = [(slot, req) for slot, req in pending if req.dimensions == dims]
        matrix = embed_texts([t for _, req in group for t in req.texts], dims)
        row = 0
        for slot, req in group:
            rows = matrix[row : row + len(req.texts)]
            row += len(req.texts)
            answers[slot][1]["body"] = embedding_response(req, rows)
    return answers
