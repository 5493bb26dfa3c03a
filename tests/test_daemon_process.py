"""`embedd run` under a stand-in for systemd: the notify socket, the watchdog, signals.

The daemon runs as a real subprocess with ``NOTIFY_SOCKET`` naming a datagram socket
this test owns and ``WATCHDOG_USEC`` set, exactly as systemd starts it.

To stall the daemon's event loop from outside, some tests start it through
`STALLABLE_MAIN`: a few lines run with ``python -c`` that install a SIGUSR1 handler
calling `time.sleep` and then call `embedd.cli.main`. Python runs signal handlers in
the main thread, between two steps of the event loop, so the handler blocks the loop
exactly as a blocking call inside a coroutine would. The hook lives only here; the
product has no test switch.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    TEST_KEY,
    DaemonProcess,
    EmulatorProcess,
    drop,
    wait_for,
    write_config,
)

WATCHDOG_USEC = 400_000  # systemd's WatchdogSec=0.4s: the daemon pings every 0.2 s
PING_INTERVAL = WATCHDOG_USEC / 2_000_000
STALL_SECONDS = 2.0
STOP_TIMEOUT = 5.0
STATUS_LINE = re.compile(
    r"^(\d+) file\(s\) in progress, (\d+) batch\(es\) in flight, (\d+) done, (\d+) failed"
)

STALLABLE_MAIN = (
    "import signal, sys, time\n"
    f"signal.signal(signal.SIGUSR1, lambda *_: time.sleep({STALL_SECONDS}))\n"
    "from embedd.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@dataclass
class Message:
    """One notify datagram: when it arrived and its ``KEY=value`` fields."""

    at: float
    fields: dict[str, str]


class NotifySocket:
    """A datagram socket standing in for systemd's; keeps every message it received."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[Message] = []

    def _receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        message = Message(time.monotonic(), fields)
        self.messages.append(message)
        return message

    def wait(self, match: Callable[[Message], bool], timeout: float, what: str) -> Message:
        """Receive until a message satisfies `match`; fail the test at the deadline."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self._receive(min(left, 0.2))
            if message is not None and match(message):
                return message
        pytest.fail(f"no notify message {what} within {timeout}s; got {self.fields()}")

    def collect(self, seconds: float) -> None:
        """Receive everything that arrives in the next `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(min(left, 0.2))

    def fields(self) -> list[dict[str, str]]:
        return [m.fields for m in self.messages]

    def pings(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Arrival times of ``WATCHDOG=1`` between `start` and `end`."""
        return [m.at for m in self.messages if "WATCHDOG" in m.fields and start <= m.at <= end]

    def close(self) -> None:
        self.sock.close()


@dataclass
class NotifiedDaemon(DaemonProcess):
    """A daemon started as systemd would, optionally through `STALLABLE_MAIN`."""

    stallable: bool = False

    def start(self) -> NotifiedDaemon:
        self.runs += 1
        entry = ["-c", STALLABLE_MAIN] if self.stallable else ["-m", "embedd"]
        with self.log.open("ab") as log:
            log.write(f"--- run {self.runs}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, *entry, "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=REPO,
            )
        return self

    def stop_timed(self) -> tuple[int, float]:
        """SIGTERM; return the exit code and the seconds until the process was gone."""
        assert self.proc is not None
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(STOP_TIMEOUT + 10)
        return code, time.monotonic() - sent

    def event_names(self) -> list[str]:
        return [str(e.get("event")) for e in self.events()]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """The test-owned notify socket."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def notified_daemon(
    tmp_path: Path, notify: NotifySocket
) -> Iterator[Callable[..., NotifiedDaemon]]:
    """Factory: a daemon (not yet started) whose environment points at `notify`."""
    daemons: list[NotifiedDaemon] = []

    def make(base_url: str, *, stallable: bool = False, **sections: Any) -> NotifiedDaemon:
        spool = tmp_path / "spool"
        sections.setdefault("daemon", {})["stop_timeout"] = f"{STOP_TIMEOUT}s"
        config = write_config(tmp_path / "config.toml", spool, base_url, **sections)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
        env.update(
            OPENAI_API_KEY=TEST_KEY,
            PYTHONUNBUFFERED="1",
            NOTIFY_SOCKET=notify.path,
            WATCHDOG_USEC=str(WATCHDOG_USEC),
        )
        daemon = NotifiedDaemon(spool, config, tmp_path / "daemon.log", env, stallable=stallable)
        daemons.append(daemon)
        return daemon

    yield make
    for d in daemons:
        if d.alive():
            d.kill()


def pending(pid: int, sig: int) -> bool:
    """True while `sig` is pending (sent, not yet delivered) for process `pid`."""
    bit = 1 << (sig - 1)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def is_ready(m: Message) -> bool:
    return m.fields.get("READY") == "1"


def status_counts(m: Message) -> tuple[int, ...] | None:
    match = STATUS_LINE.match(m.fields.get("STATUS", ""))
    return tuple(int(g) for g in match.groups()) if match else None


@pytest.mark.slow
def test_ready_comes_only_after_reconciliation_and_the_first_scan(
    start_emulator: Callable[..., EmulatorProcess],
    notified_daemon: Callable[..., NotifiedDaemon],
    notify: NotifySocket,
) -> None:
    """READY=1 arrives only once start-up recovery is over: reconciliation with OpenAI
    succeeded (through three 500s), a file already in the inbox is claimed, and the log
    says daemon.ready; the watchdog pings and the start timeout is extended meanwhile;
    STATUS= lines count the queue."""
    emulator = start_emulator()
    emulator.set_faults(
        {"requests": [{"endpoint": "GET /v1/batches", "kind": "server_error", "count": 3}]}
    )
    daemon = notified_daemon(emulator.url)
    drop(daemon.spool, "early.txt", b"was here before the daemon")
    daemon.start()

    ready = notify.wait(is_ready, 30, "READY=1")
    names = daemon.event_names()  # the log as it was when READY arrived
    assert "daemon.ready" in names
    claimed = [e for e in daemon.events() if e.get("event") == "file.claimed"]
    assert [e["file"] for e in claimed] == ["early.txt"]
    assert names.index("file.claimed") < names.index("daemon.ready")
    listed = emulator.state()["requests_by_endpoint"]["GET /v1/batches"]
    assert listed >= 4, "READY before the list of batches was read successfully"
    assert [m for m in notify.messages if is_ready(m)] == [ready]
    assert notify.pings(end=ready.at), "no watchdog ping during start-up"
    # systemd arms its watchdog only after READY; until then the daemon extends the
    # start timeout while healthy, and stops asking once it is ready.
    extends = [m for m in notify.messages if "EXTEND_TIMEOUT_USEC" in m.fields]
    assert extends, "no EXTEND_TIMEOUT_USEC during start-up"
    assert all(m.at <= ready.at for m in extends)
    assert int(extends[0].fields["EXTEND_TIMEOUT_USEC"]) >= 10_000_000
    assert status_counts(ready) == (1, 0, 0, 0)

    later = notify.wait(lambda m: (status_counts(m) or (0, 0, 0))[2] == 1, 30, "1 done")
    assert status_counts(later) == (0, 0, 1, 0)
    assert (daemon.spool / "outbox" / "early.txt.npy").exists()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_watchdog_pings_at_the_configured_rate_and_stop_while_the_loop_stalls(
    start_emulator: Callable[..., EmulatorProcess],
    notified_daemon: Callable[..., NotifiedDaemon],
    notify: NotifySocket,
) -> None:
    """WATCHDOG=1 comes every WATCHDOG_USEC/2; a blocked event loop sends none for as
    long as it is blocked (so systemd would restart it), and pings resume after."""
    emulator = start_emulator()
    daemon = notified_daemon(emulator.url, stallable=True).start()
    ready = notify.wait(is_ready, 30, "READY=1")

    window = 2.0
    notify.collect(window)
    steady = notify.pings(ready.at, ready.at + window)
    expected = window / PING_INTERVAL  # 10
    assert expected * 0.5 <= len(steady) <= expected * 1.5, steady

    daemon.signal(signal.SIGUSR1)
    stalled_at = time.monotonic()
    notify.collect(STALL_SECONDS + 1.0)
    around = notify.pings(stalled_at - 1.0)
    gaps = [b - a for a, b in itertools.pairwise(around)]
    assert max(gaps) >= STALL_SECONDS * 0.9, gaps
    assert notify.pings(stalled_at + STALL_SECONDS + 0.1), "pings did not resume"
    assert daemon.alive()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_sigterm_sends_stopping_and_exits_0_within_stop_timeout(
    start_emulator: Callable[..., EmulatorProcess],
    notified_daemon: Callable[..., NotifiedDaemon],
    notify: NotifySocket,
) -> None:
    """SIGTERM with batches in flight: STOPPING=1 at once, a graceful exit 0 well within
    [daemon] stop_timeout; a restart finishes every file exactly once, and no shard was
    ever created as two batches."""
    emulator = start_emulator(phase_time=1.0)
    daemon = notified_daemon(emulator.url, batch={"max_lines": 20}).start()
    notify.wait(is_ready, 30, "READY=1")
    names = []
    for f in range(4):
        body = "".join(json.dumps({"text": f"file {f} line {i}"}) + "\n" for i in range(30))
        drop(daemon.spool, f"doc{f}.jsonl", body.encode())
        names.append(f"doc{f}.jsonl")
    wait_for(lambda: "shard.submitted" in daemon.event_names(), what="a batch in flight")

    code, seconds = daemon.stop_timed()
    print(f"stop with batches in flight took {seconds:.2f}s")
    assert code == 0
    assert seconds < STOP_TIMEOUT
    notify.wait(lambda m: m.fields.get("STOPPING") == "1", 1, "STOPPING=1")
    assert "daemon.stopped" in daemon.event_names()  # graceful, not the overrun exit
    assert "daemon.stop_timeout_exit" not in daemon.event_names()
    assert not daemon.outputs() or len(daemon.outputs()) < len(names)

    daemon.start()
    daemon.wait_done(names, timeout=60)
    assert daemon.outputs() == sorted(f"{n}.npy" for n in names)
    assert not list((daemon.spool / "failed").iterdir())
    state = emulator.state()
    assert state["batches_by_metadata"]
    assert all(count == 1 for count in state["batches_by_metadata"].values()), state
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_a_restart_loses_nothing(
    start_emulator: Callable[..., EmulatorProcess],
    notified_daemon: Callable[..., NotifiedDaemon],
    notify: NotifySocket,
) -> None:
    """Two SIGTERMs that reach a busy daemon before it can act on the first: it leaves
    at once with exit 0 (no graceful stop), and a restart still delivers every file."""
    emulator = start_emulator(phase_time=0.5)
    daemon = notified_daemon(emulator.url, stallable=True).start()
    notify.wait(is_ready, 30, "READY=1")
    drop(daemon.spool, "x.txt", b"some text to embed")
    wait_for(lambda: "shard.submitted" in daemon.event_names(), what="a batch in flight")

    # Stall the loop, so both signals wait for it; each is queued on its own.
    daemon.signal(signal.SIGUSR1)
    assert daemon.proc is not None
    daemon.signal(signal.SIGTERM)
    # Two signals pending at once would merge into one: send the second only after the
    # kernel has delivered the first.
    wait_for(lambda: not pending(daemon.proc.pid, signal.SIGTERM), 5, what="delivery")
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(STALL_SECONDS + 5) == 0
    names = daemon.event_names()
    assert "daemon.second_signal_exit" in names
    assert "daemon.stopped" not in names

    daemon.start()
    daemon.wait_done(["x.txt"])
    assert daemon.outputs() == ["x.txt.npy"]
    assert daemon.stop() == 0


@pytest.mark.slow
def test_sigterm_during_start_up_exits_0_at_once_without_ever_saying_ready(
    start_emulator: Callable[..., EmulatorProcess],
    notified_daemon: Callable[..., NotifiedDaemon],
    notify: NotifySocket,
) -> None:
    """While start-up keeps retrying an API that answers 500 to every listing, the
    watchdog still pings; SIGTERM then ends the daemon quickly with exit 0, and READY=1
    never follows STOPPING=1."""
    emulator = start_emulator()
    emulator.set_faults(
        {"requests": [{"endpoint": "GET /v1/batches", "kind": "server_error", "status": 503}]}
    )
    daemon = notified_daemon(emulator.url).start()
    notify.wait(lambda m: "WATCHDOG" in m.fields, 30, "WATCHDOG=1 during start-up")
    wait_for(
        lambda: emulator.state()["requests_by_endpoint"].get("GET /v1/batches", 0) >= 2,
        what="reconciliation retrying",
    )

    code, seconds = daemon.stop_timed()
    print(f"stop during start-up took {seconds:.2f}s")
    assert code == 0
    assert seconds < 2.0
    notify.wait(lambda m: m.fields.get("STOPPING") == "1", 1, "STOPPING=1")
    notify.collect(0.2)
    assert not [m for m in notify.messages if is_ready(m)]
    assert "daemon.ready" not in daemon.event_names()
    assert "daemon.stopped" in daemon.event_names()


@pytest.mark.slow
def test_record_ids_shaped_like_paths_never_become_paths(
    start_emulator: Callable[..., EmulatorProcess],
    notified_daemon: Callable[..., NotifiedDaemon],
    tmp_path: Path,
) -> None:
    """JSONL ids such as ../../etc/passwd are data: the outbox holds only NAME.npy and
    NAME.json, the ids come back verbatim in the manifest, and no file named after an
    id exists anywhere under the test's folder."""
    emulator = start_emulator()
    daemon = notified_daemon(emulator.url).start()
    ids = ["../../etc/passwd", "/etc/shadow", "..", "a/b/../../c", "outbox/../../x"]
    body = "".join(json.dumps({"id": i, "text": f"text {n}"}) + "\n" for n, i in enumerate(ids))
    drop(daemon.spool, "evil.jsonl", body.encode())
    daemon.wait_done(["evil.jsonl"])
    assert daemon.stop() == 0

    assert sorted(p.name for p in (daemon.spool / "outbox").iterdir()) == [
        "evil.jsonl.json",
        "evil.jsonl.npy",
    ]
    manifest = json.loads((daemon.spool / "outbox" / "evil.jsonl.json").read_text())
    assert [r["id"] for r in manifest["records"]] == ids
    names = {p.name for p in tmp_path.rglob("*")}
    assert not names & {"passwd", "shadow", "c", "x"}
