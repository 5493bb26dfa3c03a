"""The `embedd` command: parse argv, resolve settings, run one subcommand, return its code.

Exit codes: 0 ok, 2 bad usage, 75 `submit --wait` timed out, 78 bad config or missing API key (systemd's
`RestartPreventExitStatus=78` then stops a restart loop), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from embedd import __version__
from embedd.config import Settings, find_config_path, load_settings, parse_duration
from embedd.errors import ConfigError, EmbeddError

EX_OK, EX_FAIL, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $EMBEDD_CONFIG, then ./config.toml, then built-in defaults)",
    )
    p = argparse.ArgumentParser(
        prog="embedd",
        description="Embed document files dropped into a spool folder, through the OpenAI "
        "Batch API at half the price, with a cost ledger.",
        epilog="Start with `embedd demo`. Each command has its own --help.",
    )
    p.add_argument("--version", action="version", version=f"embedd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument(
        "--emulate",
        action="store_true",
        help="start the built-in OpenAI emulator on loopback and use it (results say emulated)",
    )
    sub.add_parser(
        "demo",
        parents=[common],
        help="offline demo: temporary spool, emulator, sample documents, results, cost report",
    )
    submit = sub.add_parser(
        "submit",
        parents=[common],
        help="copy files into the inbox safely (tmp/, then a link that never replaces a name)",
        description="Copy files into the inbox. With --wait, print one line per input: "
        "`done outbox/NAME.npy (ROWS, DIMS)` or `failed failed/NAME.error.json: REASON`. "
        "Exit 0 all done, 1 any failed (or not submitted), 75 timeout.",
    )
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.add_argument(
        "--sync", action="store_true", help="use the synchronous lane (inbox/sync/)"
    )
    submit.add_argument(
        "--wait", action="store_true", help="block until each input is done or failed"
    )
    submit.add_argument(
        "--timeout",
        metavar="DUR",
        help='with --wait: give up after this long ("90s", "2h"; exit 75)',
    )
    submit.add_argument("--json", action="store_true", help="one JSON object a line")
    status = sub.add_parser("status", parents=[common], help="queue, batches, breaker, spend")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch", action="store_true", help="redraw every second with progress bars"
    )
    sub.add_parser(
        "report",
        parents=[common],
        help="cost report from the ledger: [--by day|week|month] [--since DATE] [--until DATE] "
        "[--format table|csv|json]",
    )
    emu = sub.add_parser("emulator", parents=[common], help="run the OpenAI emulator alone")
    emu.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    emu.add_argument("--port", type=int, default=8089, help="port (default 8089; 0 picks one)")
    emu.add_argument("--api-key", help="accept only this key (default: any key starting sk-)")
    emu.add_argument("--data-dir", type=Path, help="keep files and batches here (default: temp)")
    emu.add_argument(
        "--phase-time", type=float, default=0.5, help="seconds a batch spends in each state"
    )
    emu.add_argument("--faults", type=Path, help="JSON fault script (see embedd.emulator.faults)")
    emu.add_argument("--rpm", type=int, help="enforce requests a minute on /v1/embeddings")
    emu.add_argument("--tpm", type=int, help="enforce tokens a minute on /v1/embeddings")
    emu.add_argument(
        "--enqueued-token-limit",
        type=int,
        help="fail new batches with token_limit_exceeded past this many tokens in flight",
    )
    emu.add_argument("--seed", type=int, default=0, help="seed for random faults and order")
    emu.add_argument(
        "--rate-window",
        type=float,
        default=60.0,
        help="enforce --rpm/--tpm in windows of this many seconds (pro rata; default 60)",
    )
    emu.add_argument(
        "--auth-header",
        choices=("authorization", "api-key"),
        default="authorization",
        help="where the key is expected: Authorization: Bearer (default) or api-key (Azure)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_before_start)
    if argv[:1] == ["report"]:
        return _report(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    timeout: float | None = None
    if args.command == "submit" and args.timeout is not None:
        if not args.wait:
            parser.error("--timeout needs --wait")
        try:
            timeout = parse_duration(args.timeout)
        except ValueError as exc:
            parser.error(f"--timeout {args.timeout!r}: expected {exc}")
    try:
        if args.command == "emulator":
            return _emulator(args)
        if args.command == "demo":
            return _demo(args)
        settings = _settings(args)
        if args.command == "run":
            return _run(settings)
        if args.command == "submit":
            from embedd.files.spool import SpoolPaths

            SpoolPaths.from_root(settings.spool_root, settings.spool_state_dir).ensure()
            return submit_main(
                settings.spool_root,
                [Path(f) for f in args.files],
                sync=args.sync,
                wait=args.wait,
                timeout=timeout,
                as_json=args.json,
            )
        if args.command == "status":
            return _status(settings, as_json=args.json, watch=args.watch)
    except ConfigError as exc:
        print(f"embedd: configuration error: {exc.message}", file=sys.stderr)
        return EX_CONFIG
    except EmbeddError as exc:
        print(f"embedd: {exc.message}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_FAIL
    return EX_USAGE


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    path = find_config_path(getattr(args, "config", None))
    settings = load_settings(path, overrides=overrides)
    if getattr(args, "emulate", False):
        settings = dataclasses.replace(settings, emulate=True)
    return settings


def _api_key(settings: Settings) -> str:
    from embedd.secrets import load_api_key

    if settings.emulate:
        try:
            return load_api_key(settings.openai_api_key_env)
        except ConfigError:
            return "sk-emulated-" + secrets.token_hex(16)  # the emulator takes any sk- key
    return load_api_key(settings.openai_api_key_env)


def _stop_before_start(signum: int, _frame: object) -> None:
    # A stop asked for before the event loop takes over signals: nothing is in hand yet.
    sys.exit(EX_OK)


def _run(settings: Settings) -> int:
    from embedd.daemon import run_daemon
    from embedd.logs import configure_logging, get_logger

    configure_logging(settings.daemon_log_level)
    key = _api_key(settings)
    configure_logging(settings.daemon_log_level, secrets=[key])
    try:
        return asyncio.run(run_daemon(settings, key))
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception:
        # Through the logger, so the traceback is one redacted line like every other.
        get_logger("embedd.daemon").exception("daemon.crashed")
        # A crash can leave a worker thread behind (a database connection that failed
        # half-way open) that would keep the interpreter alive for ever; systemd must
        # see the process end to restart it. Everything durable is already on disk.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EX_FAIL)


def submit_main(
    spool_root: Path,
    files: list[Path],
    *,
    sync: bool,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> int:
    """`embedd submit`: link each file into the inbox; with `wait`, report each outcome.

    A name already waiting in the inbox is never replaced: that file is not submitted
    (exit 1). Exit 0 all done, 1 any failed or not submitted, 75 any without an outcome
    by the deadline.
    """
    import json
    import time

    from embedd.client import Spool, Submission, SubmissionFailed, SubmissionTimeout

    spool = Spool(spool_root)
    code = EX_OK
    submitted: list[tuple[Path, Submission]] = []
    for src in files:
        if not src.is_file():
            print(f"embedd submit: {src} is not a readable file; skipped", file=sys.stderr)
            code = EX_FAIL
            continue
        try:
            sub = spool.submit_file(src, sync=sync)
        except (OSError, ValueError) as exc:
            print(f"embedd submit: {exc}; skipped", file=sys.stderr)
            code = EX_FAIL
            continue
        submitted.append((src, sub))
        if not wait:
            line = {"file": str(src), "submitted": str(sub.path)}
            print(json.dumps(line) if as_json else sub.path, flush=True)
    if not wait:
        return code
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    for src, sub in submitted:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        out: dict[str, object] = {"file": str(src), "name": sub.name}
        try:
            result = sub.wait(left)
        except SubmissionFailed as exc:
            rel = exc.error_path.relative_to(spool.root)
            out |= {"outcome": "failed", "path": str(rel), "reason": exc.reason}
            out["records"] = exc.records
            text = f"failed {rel}: {exc.reason}"
            code = max(code, EX_FAIL)
        except SubmissionTimeout:
            timed_out = True
            out |= {"outcome": "timeout", "timeout_s": timeout}
            text = f"timeout {sub.name}: no outcome within {timeout:g}s"
        else:
            rel = result.path.relative_to(spool.root)
            rows, dims = result.vectors.shape
            out |= {"outcome": "done", "path": str(rel), "rows": rows, "dimensions": dims}
            text = f"done {rel} ({rows}, {dims})"
        print(json.dumps(out) if as_json else text, flush=True)
    return EX_TEMPFAIL if timed_out else code


def _status(settings: Settings, *, as_json: bool, watch: bool) -> int:
    from embedd.money.prices import format_usd
    from embedd.status import status_main

    def usd(value: Decimal | None) -> str | None:
        return None if value is None else format_usd(value)

    budget = {
        "daily_usd": usd(settings.budget_daily_usd),
        "monthly_usd": usd(settings.budget_monthly_usd),
        "action": settings.budget_action,
    }
    db = settings.spool_state_dir / "embedd.sqlite3"
    return status_main(db, as_json=as_json, watch=watch, budget=budget)


def _report(argv: list[str]) -> int:
    """`embedd report …`: the report module parses its own flags (and ignores --config)."""
    from embedd.money.report import report_main

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if "-h" in argv or "--help" in argv:
        return report_main(argv, Path("ledger.jsonl"))
    try:
        settings = load_settings(find_config_path(known.config))
    except ConfigError as exc:
        print(f"embedd: configuration error: {exc.message}", file=sys.stderr)
        return EX_CONFIG
    return report_main(argv, settings.spool_root / "ledger.jsonl")


def _emulator(args: argparse.Namespace) -> int:
    import json

    from embedd.emulator import EmulatorConfig, main_emulator

    faults = json.loads(args.faults.read_text()) if args.faults else None
    config = EmulatorConfig(
        api_key=args.api_key,
        data_dir=args.data_dir,
        validating_s=args.phase_time,
        in_progress_s=args.phase_time,
        finalizing_s=args.phase_time,
        faults=faults,
        rpm=args.rpm,
        tpm=args.tpm,
        enqueued_token_limit=args.enqueued_token_limit,
        seed=args.seed,
        rate_window_s=args.rate_window,
        auth_header=args.auth_header,
    )
    return main_emulator(args.host, args.port, config)


def _demo(args: argparse.Namespace) -> int:
    from embedd.demo import run_demo

    return run_demo(Path(tempfile.mkdtemp(prefix="embedd-demo-")))
