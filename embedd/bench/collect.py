"""collect: a batch output file to ``.npy``, embedd's path against the common one.

embedd's side is the real code: the collector's slice loop
(``collector.parsed_slices`` → ``batchlines.parse_output_line`` on base64 lines),
each slice stored in a real state database as the collector stores it, then the
delivery's streaming ``.npy`` write from that database. The baseline is what most scripts do
with the float output: read the whole file, ``json.loads`` every line, put the
rows in order and hand the nested lists to ``numpy.array``. Both files hold the
same vectors (the emulator's own batch writer makes the base64 one); each side runs
in a fresh interpreter so its peak RSS is its own.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedd.bench.common import MB, documents, peak_rss, run_worker
from embedd.emulator.output import write_batch_output
from embedd.openai.batchlines import encode_request_line

SIZES = {"small": 200, "full": 20_000}
DIMS = 3072
MODEL = "text-embedding-3-large"


def make_files(folder: Path, lines: int, dims: int) -> tuple[Path, Path, Path]:
    """(request file, base64 output file, float output file) for ``lines`` inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    requests = folder / "requests.jsonl"
    with requests.open("wb") as fh:
        for i, (_, text) in enumerate(documents(lines, 300)):
            fh.write(encode_request_line(f"r{i}", text, MODEL, dims))
    b64 = folder / "output.base64.jsonl"
    write_batch_output(
        batch_id="batch_bench", input_path=requests, output_path=b64,
        error_path=folder / "errors.jsonl", done=lines, unfinished_code="batch_expired",
        failed_line_rate=0.0, failed_line_status=500, seed=6, stop=threading.Event(),
    )  # fmt: skip
    floats = folder / "output.float.jsonl"
    with b64.open("rb") as src, floats.open("w") as dst:
        for line in src:
            obj = json.loads(line)
            item = obj["response"]["body"]["data"][0]
            vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
            # The float API answers with about 9 significant digits per number.
            item["embedding"] = [float(f"{x:.9g}") for x in vector.tolist()]
            dst.write(json.dumps(obj, separators=(",", ":")) + "\n")
    return requests, b64, floats


def _order(requests: Path) -> dict[str, int]:
    with requests.open("rb") as fh:
        return {json.loads(line)["custom_id"]: i for i, line in enumerate(fh)}


def embedd_side(args: dict[str, Any]) -> dict[str, Any]:
    """Worker: the daemon's own path, through a real state database.

    Untimed set-up: one file of ``lines`` records queued in a fresh ``Store``. Timed:
    the collector's slice loop over the base64 output (``collector.parsed_slices``),
    each slice stored through ``Store.vector_writer`` as the collector does, then the
    delivery's streaming write (``store.piece_blocks`` → ``delivery.record_rows`` →
    ``outbox.write_result`` with a ``RowStream``), fsynced.
    """
    return asyncio.run(_embedd_side(args))


async def _embedd_side(args: dict[str, Any]) -> dict[str, Any]:
    from embedd.files.outbox import RowStream, write_result
    from embedd.files.spool import SpoolPaths
    from embedd.pipeline.collector import READ_BUFFER, parsed_slices
    from embedd.pipeline.delivery import record_rows
    from embedd.state.store import NewRecord, NewRequest, Store, piece_blocks

    order = _order(Path(args["requests"]))
    dims = int(args["dims"])
    paths = SpoolPaths.from_root(Path(args["spool"]))
    paths.outbox.mkdir(parents=True, exist_ok=True)
    store = await Store.open(paths.state_dir / "bench.sqlite3")
    keys = sorted(order, key=order.__getitem__)
    await store.begin_claim("job_bench", "bench.jsonl", "batch", 0.0)
    await store.queue_file(
        "job_bench", sha256="0" * 64, size=0, lane="batch", now=0.0,
        records=[NewRecord(k, None, 1, [(k, 1)], cached=False) for k in keys],
        requests=[NewRequest(k, k, 1, 1, 1) for k in keys],
    )  # fmt: skip
    start = time.perf_counter()
    with Path(args["output"]).open("rb", buffering=READ_BUFFER) as fh:
        async with store.vector_writer(origin="batch_bench", clock=lambda: 0.0) as vectors:
            async for results in parsed_slices(fh, dims):
                good = []
                for r in results:
                    assert r.vector is not None, r.error_message
                    good.append((r.custom_id, r.vector, r.tokens))
                await vectors.add(good)
    rows = RowStream(
        (len(keys), dims),
        functools.partial(record_rows, piece_blocks(store.path, "job_bench")),
    )
    npy = await asyncio.to_thread(
        write_result, paths, "bench.jsonl", "job_bench", rows, {"source": "bench.jsonl"}
    )
    seconds = time.perf_counter() - start
    await store.close()
    return {"seconds": seconds, "peak_rss": peak_rss(), "npy": str(npy)}


def baseline_side(args: dict[str, Any]) -> dict[str, Any]:
    """Worker: the whole float-JSON file in memory, json.loads, numpy.array, numpy.save."""
    order = _order(Path(args["requests"]))
    out = Path(args["spool"]) / "baseline.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = Path(args["output"]).read_bytes()
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    rows.sort(key=lambda row: order[row["custom_id"]])
    matrix = np.array(
        [row["response"]["body"]["data"][0]["embedding"] for row in rows], dtype=np.float32
    )
    np.save(out, matrix)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": peak_rss(), "npy": str(out)}


def idle_side(args: dict[str, Any]) -> dict[str, Any]:
    """Worker: import what both sides import and nothing else (the RSS floor)."""
    import embedd.pipeline.collector
    import embedd.pipeline.delivery

    del embedd

    return {"peak_rss": peak_rss()}


def run(size: str, work: Path) -> dict[str, Any]:
    """Measure both sides on the same vectors; return the figures."""
    lines = SIZES[size]
    requests, b64, floats = make_files(work / "files", lines, DIMS)
    embedd = run_worker(
        "collect.embedd",
        {"requests": str(requests), "output": str(b64), "dims": DIMS, "spool": str(work / "e")},
    )
    baseline = run_worker(
        "collect.baseline",
        {"requests": str(requests), "output": str(floats), "dims": DIMS, "spool": str(work / "b")},
    )
    idle = run_worker("collect.idle", {})
    a, b = np.load(embedd["npy"]), np.load(baseline["npy"])
    npy_bytes = Path(embedd["npy"]).stat().st_size
    figures = {
        "lines": lines,
        "dimensions": DIMS,
        "npy_mb": npy_bytes / MB,
        "base64_file_mb": b64.stat().st_size / MB,
        "float_file_mb": floats.stat().st_size / MB,
        "same_vectors": bool(a.shape == b.shape and np.allclose(a, b, atol=1e-6)),
        "embedd_s": embedd["seconds"],
        "baseline_s": baseline["seconds"],
        "speedup": baseline["seconds"] / embedd["seconds"],
        "embedd_mb_s": b64.stat().st_size / MB / embedd["seconds"],
        "baseline_mb_s": floats.stat().st_size / MB / baseline["seconds"],
        "embedd_rows_s": lines / embedd["seconds"],
        "baseline_rows_s": lines / baseline["seconds"],
        "embedd_peak_rss_mb": embedd["peak_rss"] / MB,
        "baseline_peak_rss_mb": baseline["peak_rss"] / MB,
        "idle_rss_mb": idle["peak_rss"] / MB,
        "embedd_rss_over_npy": embedd["peak_rss"] / npy_bytes,
        "baseline_rss_over_npy": baseline["peak_rss"] / npy_bytes,
    }
    for path in (b64, floats, Path(embedd["npy"]), Path(baseline["npy"])):
        path.unlink()
    return figures
