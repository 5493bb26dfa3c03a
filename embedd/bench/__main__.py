"""``python -m embedd.bench``: run the benchmarks, print a table, write JSON.

Exit codes: 0 every selected benchmark ran (targets met or not: that is a figure,
not a failure), 1 a benchmark could not run, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedd.bench import claim, collect, pipeline, retention, sync

BENCHMARKS: dict[str, Callable[[str, Path], dict[str, Any]]] = {
    "collect": collect.run,
    "intake": pipeline.run_intake,
    "e2e": pipeline.run_e2e,
    "sync": sync.run,
    "retention": retention.run,
    "claim": claim.run,
}

Row = tuple[str, str, str, str, str, str, str]


def _f(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def targets(name: str, r: dict[str, Any], size: str) -> dict[str, bool]:
    """Issue 6's targets, checked against one benchmark's figures."""
    if name == "collect":
        return {
            "speedup_20x": r["speedup"] >= 20,
            "rss_under_1.5x_npy": r["embedd_rss_over_npy"] < 1.5,
        }
    if name == "intake":
        return {"planned_within_1.5x_floor": r["overhead_planned"] <= 1.5,
                "uploaded_within_1.5x_floor": r["overhead_uploaded"] <= 1.5}  # fmt: skip
    if name == "e2e":
        out = {"first_under_60s": r["runs"][0]["seconds"] < 60}
        if len(r["runs"]) > 1:
            out["growth_under_5.5x"] = r["time_ratio"] < 5.5
            out["memory_flat_within_1.15x"] = r["rss_ratio"] <= 1.15
        return out
    if name == "sync":
        e = r["embedd"]
        return {"at_least_95pct": e["fraction_of_limit"] >= 0.95,
                "no_429_after_warmup": e["http_429_after_warmup"] == 0}  # fmt: skip
    if name == "retention":
        return {
            "vectors_within_cap": r["vectors_over_cap"] <= 1.0,
            "state_flat_within_1.1x": r["state_growth"] <= 1.1,
            "rss_flat_within_1.15x": r["rss_growth"] <= 1.15,
        }
    if name == "claim":
        return {"peak_rss_under_512mb": r["daemon_peak_rss_mb"] < r["bound_mb"]}
    return {}


def rows(name: str, r: dict[str, Any], met: dict[str, bool]) -> list[Row]:
    """Table rows: benchmark, figure, embedd, baseline, ratio, target, met."""
    if name == "collect":
        return [
            ("collect", f"{r['lines']:,} lines x {r['dimensions']} to .npy, s",
             _f(r["embedd_s"]), _f(r["baseline_s"]), f"{r['speedup']:.1f}x faster",
             ">= 20x", _met(met["speedup_20x"])),
            ("", "input MB/s (base64 | float JSON)", _f(r["embedd_mb_s"], 0),
             _f(r["baseline_mb_s"], 0), "", "", ""),
            ("", f"peak RSS MB (.npy {r['npy_mb']:.0f} MB)", _f(r["embedd_peak_rss_mb"], 0),
             _f(r["baseline_peak_rss_mb"], 0), f"{r['embedd_rss_over_npy']:.2f}x .npy",
             "< 1.5x .npy", _met(met["rss_under_1.5x_npy"])),
        ]  # fmt: skip
    if name == "intake":
        return [
            ("intake", f"{r['documents']:,} docs, {r['text_mb']:.0f} MB to shard written, s",
             _f(r["planned_s"]), _f(r["floor_s"]), f"{r['overhead_planned']:.2f}x floor",
             "<= 1.5x", _met(met["planned_within_1.5x_floor"])),
            ("", "... to batch file uploaded (emulator checks it), s", _f(r["uploaded_s"]),
             _f(r["floor_s"]), f"{r['overhead_uploaded']:.2f}x floor", "<= 1.5x",
             _met(met["uploaded_within_1.5x_floor"])),
        ]  # fmt: skip
    if name == "e2e":
        out: list[Row] = []
        for i, run in enumerate(r["runs"]):
            ok = _met(met["first_under_60s"]) if i == 0 else ""
            out.append(
                ("e2e" if i == 0 else "", f"{run['documents']:,} docs x 3072 inbox to .npy, s",
                 _f(run["seconds"]), "", f"{run['docs_per_s']:,.0f} docs/s",
                 "< 60 s" if i == 0 else "", ok)
            )  # fmt: skip
            out.append(("", "daemon peak RSS MB", _f(run["daemon_peak_rss_mb"], 0), "", "", "", ""))
        if len(r["runs"]) > 1:
            out.append(
                (
                    "",
                    f"growth for {r['size_ratio']:.0f}x the documents: time",
                    "",
                    "",
                    f"{r['time_ratio']:.2f}x",
                    "< 5.5x",
                    _met(met["growth_under_5.5x"]),
                )
            )
            out.append(("", "growth: daemon peak RSS", "", "", f"{r['rss_ratio']:.2f}x",
                        "<= 1.15x", _met(met["memory_flat_within_1.15x"])))  # fmt: skip
        return out
    if name == "sync":
        e, b = r["embedd"], r["baseline"]
        return [
            ("sync", f"tokens/min vs limit {r['tpm']:,} (5x demand)",
             f"{e['fraction_of_limit']:.1%}", f"{b['fraction_of_limit']:.1%}",
             f"{e['fraction_of_limit'] / max(b['fraction_of_limit'], 1e-9):.2f}x", ">= 95%",
             _met(met["at_least_95pct"])),
            ("", "429s after warm-up (total)", f"{e['http_429_after_warmup']} ({e['http_429_total']})",
             f"{b['http_429_after_warmup']} ({b['http_429_total']})", "", "0",
             _met(met["no_429_after_warmup"])),
        ]  # fmt: skip
    if name == "retention":
        first = r["samples"][0]
        out = [
            ("retention", f"{r['documents']:,} docs x {r['dimensions']}, cache cap "
             f"{r['cap_mb']:.0f} MB: vectors at most, x cap", f"{r['vectors_over_cap']:.2f}x",
             "", "", "<= 1x", _met(met["vectors_within_cap"])),
        ]  # fmt: skip
        out += [
            ("", f"after {s['records']:,} docs: state/ MB (db) | RSS MB",
             f"{s['state_mb']:,.1f} ({s['db_mb']:,.1f}) | {s['rss_mb']:,.0f}", "", "", "", "")
            for s in r["samples"]
        ]  # fmt: skip
        out += [
            ("", "growth once capped: state/", f"{r['state_growth']:.2f}x", "",
             f"from {first['state_mb']:,.1f} MB", "<= 1.1x", _met(met["state_flat_within_1.1x"])),
            ("", "growth once capped: daemon RSS", f"{r['rss_growth']:.2f}x", "", "",
             "<= 1.15x", _met(met["rss_flat_within_1.15x"])),
        ]  # fmt: skip
        return out
    if name == "claim":
        return [
            ("claim", f"{r['file_mb']:,.0f} MB .jsonl ({r['records']:,} records) + "
             f"{r['file_mb']:,.0f} MB .txt at once, x {r['dimensions']}: daemon peak RSS MB",
             _f(r["daemon_peak_rss_mb"], 0), "", f"idle {r['idle_rss_mb']:,.0f} MB",
             f"< {r['bound_mb']:.0f} MB", _met(met["peak_rss_under_512mb"])),
            ("", "drop to both queued, s", _f(r["seconds"], 1), "", "", "", ""),
        ]  # fmt: skip
    return []


def table(all_rows: list[Row]) -> str:
    head: Row = ("benchmark", "figure", "embedd", "baseline", "ratio", "target", "met")
    widths = [max(len(row[i]) for row in [head, *all_rows]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [head]]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in all_rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedd.bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")  # fmt: skip
    parser.add_argument("--size", choices=["small", "full"], default="full")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    report: dict[str, Any] = {
        "size": args.size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "benchmarks": {},
    }
    failed = False
    all_rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="embedd-bench-", dir=args.workdir) as scratch:
        for name in names:
            began = time.monotonic()
            try:
                figures = BENCHMARKS[name](args.size, Path(scratch) / name)
            except Exception:  # a benchmark that cannot run is reported, the rest still run
                failed = True
                report["benchmarks"][name] = {"error": traceback.format_exc()}
                print(f"{name}: failed\n{traceback.format_exc()}", file=sys.stderr)
                continue
            figures["targets"] = targets(name, figures, args.size)
            figures["bench_wall_s"] = time.monotonic() - began
            report["benchmarks"][name] = figures
            all_rows += rows(name, figures, figures["targets"])
    print(table(all_rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
