"""Cost truth end to end: the ledger a real daemon writes against what the emulator
billed, the report computed from it, and the manifests' costs."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from embedd.cli import main
from embedd.money.ledger import AlertEntry, LedgerEntry, read_entries
from embedd.money.prices import cost
from embedd.pipeline.intake import scan_and_claim
from embedd.pipeline.submitter import submit_once
from tests.conftest import TEST_KEY, DaemonProcess, EmulatorProcess, drop, wait_for
from tests.test_budgeting import rig

BATCH = Decimal("0.065")
STANDARD = Decimal("0.13")


def usage_lines(spool: Path) -> list[LedgerEntry]:
    return [e for e in read_entries(spool / "ledger.jsonl") if isinstance(e, LedgerEntry)]


def billed_batches(emulator: EmulatorProcess) -> dict[str, int]:
    """Every batch the emulator holds with the input tokens it billed (paging through)."""
    out: dict[str, int] = {}
    after = ""
    while True:
        url = f"{emulator.url}/batches?limit=100" + (f"&after={after}" if after else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TEST_KEY}"})  # noqa: S310
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            page = json.loads(resp.read())
        for batch in page["data"]:
            out[batch["id"]] = int((batch.get("usage") or {}).get("input_tokens") or 0)
        if not page["has_more"]:
            return out
        after = page["last_id"]


def report_json(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(["report", "--config", str(config), "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out, parse_float=Decimal)


MONEY = re.compile(r'"(\w+_usd)": ([^,}\s]+)')
PLAIN = re.compile(r"-?\d+(\.\d{1,12})?")


def assert_plain_money(text: str) -> None:
    """Every money field is a plain decimal number: no exponent, at most 12 places."""
    found = MONEY.findall(text)
    assert found
    bad = [(key, value) for key, value in found if not PLAIN.fullmatch(value)]
    assert not bad, f"money not written as a plain decimal: {bad}"


def manifests(spool: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted((spool / "outbox").glob("*.json")):
        text = path.read_text()
        assert_plain_money(text)
        docs.append(json.loads(text, parse_float=Decimal))
    return docs


def assert_ledger_is_the_bill(spool: Path, emulator: EmulatorProcess, price: Decimal) -> None:
    """One line per billed batch or call, none twice; tokens and money to the unit."""
    lines = usage_lines(spool)
    ids = [e.batch_id for e in lines]
    assert len(ids) == len(set(ids)), f"a usage line was written twice: {ids}"
    assert_plain_money((spool / "ledger.jsonl").read_text())
    tokens = sum(e.tokens for e in lines)
    assert tokens == emulator.state()["tokens_billed"]
    assert sum(e.cost_usd for e in lines) == cost(tokens, price)
    assert sum(e.standard_cost_usd for e in lines) == cost(tokens, STANDARD)
    assert all(e.cost_usd == cost(e.tokens, price) for e in lines)


@pytest.mark.slow
def test_ledger_equals_the_bill_across_faults_and_a_restart(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With an expired batch, failed lines and a SIGTERM while batches are in flight,
    every batch the emulator billed has exactly one ledger line with its tokens; the
    sums equal the bill to the token and the micro-dollar; the report shows a 50.0%
    saving; and the manifests' exact costs add up to the ledger's."""
    emulator = start_emulator(phase_time=0.4)
    emulator.set_faults(
        {
            "batches": [
                {"outcome": "expire", "completed_fraction": 0.5, "count": 1},
                {"outcome": "complete", "failed_line_rate": 0.3, "failed_line_status": 500},
            ]
        }
    )
    daemon = start_daemon(emulator.url, batch={"max_lines": 15})
    names = []
    for f in range(4):
        name = f"doc{f}.jsonl"
        body = "".join(json.dumps({"text": f"ledger file {f} line {i}"}) + "\n" for i in range(20))
        drop(daemon.spool, name, body.encode())
        names.append(name)
    wait_for(
        lambda: any(e.get("event") == "shard.submitted" for e in daemon.events()),
        what="a batch in flight",
    )
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_done(names, timeout=60)
    assert daemon.outputs() == sorted(f"{n}.npy" for n in names)

    billed = {b: t for b, t in billed_batches(emulator).items() if t}
    lines = usage_lines(daemon.spool)
    assert {e.batch_id: e.tokens for e in lines} == billed
    collected = [e for e in daemon.events() if e.get("event") == "batch.collected"]
    assert any(e["status"] == "expired" for e in collected), "the expiry fault did not fire"
    assert any(e["retried"] for e in collected), "no failed line was retried"
    assert_ledger_is_the_bill(daemon.spool, emulator, BATCH)
    assert all(e.kind == "batch" and e.saved_usd == e.cost_usd for e in lines)

    report = report_json(daemon.config, capsys)
    total = report["total"]
    assert total["saving_pct"] == Decimal("50.0")
    assert total["tokens"] == sum(e.tokens for e in lines)
    assert total["cost_usd"] == sum(e.cost_usd for e in lines)
    assert total["requests"] == 80

    docs = manifests(daemon.spool)
    assert sum(d["cost_usd"] for d in docs) == total["cost_usd"]
    assert all(d["cost_usd"] == cost(d["tokens"], BATCH) for d in docs)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_sync_lane_run_costs_the_standard_price_and_saves_nothing(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Files through inbox/sync/ are billed at the standard price: the ledger equals the
    bill, the report shows a 0.0% saving, and the manifests agree with the ledger."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url, sync={"max_inputs": 4})
    names = []
    for f in range(2):
        name = f"now{f}.jsonl"
        body = "".join(json.dumps({"text": f"sync file {f} line {i}"}) + "\n" for i in range(10))
        drop(daemon.spool, name, body.encode(), sync=True)
        names.append(name)
    daemon.wait_done(names, timeout=30)
    assert_ledger_is_the_bill(daemon.spool, emulator, STANDARD)
    lines = usage_lines(daemon.spool)
    assert all(e.kind == "sync" and e.saved_usd == 0 for e in lines)
    assert emulator.state()["batches_created"] == 0
    total = report_json(daemon.config, capsys)["total"]
    assert total["saving_pct"] == Decimal("0.0")
    assert total["saved_usd"] == 0
    assert total["requests"] == 20
    docs = manifests(daemon.spool)
    assert sum(d["cost_usd"] for d in docs) == total["cost_usd"]
    assert daemon.stop() == 0


# One batch a day: 5 days, 3 ISO weeks (2029-12-31 is in 2030-W01), 3 months.
DAYS = [(2029, 12, 31), (2030, 1, 1), (2030, 1, 30), (2030, 2, 1), (2030, 2, 4), (2030, 2, 4)]


def _table_total(text: str) -> list[str]:
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith("total")
    return last.split()


async def test_report_totals_equal_the_ledger_for_every_grouping_and_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batches billed on days across weeks and months: for --by day|week|month, the
    json and csv totals equal the sums of the ledger lines exactly, the groups add up
    to the total, there is one group per period, and the table's totals row shows the
    same tokens and requests."""
    async with rig(tmp_path, daily_usd="1000", action="warn") as r:
        rt = r.rt
        for n, day in enumerate(DAYS):
            r.clock.now = datetime(*day, 12, n, tzinfo=UTC).timestamp()
            text = " ".join(f"report word{k}" for k in range(n + 1))
            drop(rt.paths.root, f"d{n}.txt", text.encode())
            await scan_and_claim(rt.intake)
            r.clock.now += 2
            await submit_once(rt.submitter)
            await r.collect_all()
        config = rt.settings.config_path
        assert config is not None
    entries = list(read_entries(tmp_path / "spool" / "ledger.jsonl"))
    lines = [e for e in entries if isinstance(e, LedgerEntry)]
    assert len(lines) == len(DAYS)
    assert not [e for e in entries if isinstance(e, AlertEntry)]
    want = {
        "tokens": sum(e.tokens for e in lines),
        "requests": sum(e.requests for e in lines),
        "cost_usd": sum(e.cost_usd for e in lines),
        "standard_cost_usd": sum(e.standard_cost_usd for e in lines),
        "saved_usd": sum(e.saved_usd for e in lines),
    }
    periods = {"day": 5, "week": 3, "month": 3}
    for by, count in periods.items():
        report = report_json(config, capsys, "--by", by)
        assert {k: report["total"][k] for k in want} == want, by
        assert len(report["rows"]) == count, by
        for key, value in want.items():
            assert sum(row[key] for row in report["rows"]) == value, (by, key)

        assert main(["report", "--config", str(config), "--by", by, "--format", "csv"]) == 0
        rows = capsys.readouterr().out.splitlines()
        header = rows[0].split(",")
        total = dict(zip(header, rows[-1].split(","), strict=True))
        assert total["period"] == "total"
        assert len(rows) == count + 2
        for key, value in want.items():
            assert Decimal(total[key]) == value, (by, key)

        assert main(["report", "--config", str(config), "--by", by]) == 0
        cells = _table_total(capsys.readouterr().out)
        assert f"{want['requests']:,}" in cells
        assert f"{want['tokens']:,}" in cells
        assert "50.0%" in cells
