"""The systemd notify protocol: messages on a real datagram socket, and the watchdog loop."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedd.systemd import (
    Notifier,
    format_message,
    parse_notify_address,
    parse_watchdog_usec,
    watchdog_loop,
)

# How long a test waits for something that should happen almost at once.
DEADLINE = 5.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A test-owned datagram socket in tmp_path, standing in for systemd's."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def recv(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """One datagram, or fail after *timeout* seconds."""
    sock.settimeout(timeout)
    return sock.recv(4096)


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting."""
    sock.setblocking(False)
    got = []
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        pass
    return got


async def wait_until(condition: object, what: str) -> None:
    """Yield to the event loop until *condition()* is true, failing after DEADLINE."""
    assert callable(condition)
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def test_address_parsing() -> None:
    """Paths are used as is, @names become abstract addresses, other values disable."""
    assert parse_notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_notify_address("@embedd/notify") == "\0embedd/notify"
    assert parse_notify_address(None) is None
    assert parse_notify_address("") is None
    assert parse_notify_address("@") is None
    assert parse_notify_address("vsock:2:1234") is None


def test_watchdog_usec_only_for_our_pid() -> None:
    """WATCHDOG_USEC counts only when WATCHDOG_PID is absent or names this process."""
    assert parse_watchdog_usec("30000000", None, 42) == 30_000_000
    assert parse_watchdog_usec("30000000", "42", 42) == 30_000_000
    assert parse_watchdog_usec("30000000", "41", 42) is None
    assert parse_watchdog_usec("30000000", "x", 42) is None
    assert parse_watchdog_usec("0", None, 42) is None
    assert parse_watchdog_usec("soon", None, 42) is None
    assert parse_watchdog_usec(None, "42", 42) is None


def test_format_message_uppercases_and_keeps_one_line_per_field() -> None:
    """Field names are upper-cased and a newline in a value cannot inject a field."""
    assert format_message({"ready": 1, "status": "up"}) == b"READY=1\nSTATUS=up"
    assert format_message({"STATUS": "a\nWATCHDOG=1"}) == b"STATUS=a WATCHDOG=1"
    assert format_message({"READY": True}) == b"READY=1"
    with pytest.raises(ValueError, match="field name"):
        format_message({"A=B": 1})


def test_messages_arrive_on_path_socket(receiver: tuple[socket.socket, str]) -> None:
    """READY, STATUS, WATCHDOG and STOPPING reach the socket named by NOTIFY_SOCKET."""
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert recv(sock) == b"READY=1"
    assert n.status("3 files queued, 1 batch in flight")
    assert recv(sock) == b"STATUS=3 files queued, 1 batch in flight"
    assert n.watchdog()
    assert recv(sock) == b"WATCHDOG=1"
    assert n.stopping("draining")
    assert recv(sock) == b"STOPPING=1\nSTATUS=draining"
    assert n.ready("ready")
    assert recv(sock) == b"READY=1\nSTATUS=ready"


def test_messages_arrive_on_abstract_socket() -> None:
    """An @name NOTIFY_SOCKET reaches a socket in the abstract namespace."""
    name = f"embedd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert recv(sock) == b"READY=1"
        assert n.notify(status="x", main_pid=7)
        assert recv(sock) == b"STATUS=x\nMAIN_PID=7"


def test_no_socket_means_no_op() -> None:
    """Without NOTIFY_SOCKET every call does nothing and reports False."""
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert n.watchdog_interval() is None


def test_send_failure_never_raises(tmp_path: Path) -> None:
    """A socket path with nobody listening makes sends return False, not raise."""
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready()
    assert not n.status("still fine")


def test_watchdog_interval_is_half_the_timeout(receiver: tuple[socket.socket, str]) -> None:
    """watchdog_interval() is half of WATCHDOG_USEC, in seconds, for our own pid."""
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval() == 15.0
    assert Notifier.from_env(env, pid=os.getpid() + 1).watchdog_interval() is None


async def test_watchdog_loop_returns_without_interval() -> None:
    """With no watchdog configured the loop ends at once instead of running forever."""
    calls = 0

    async def probe() -> bool:
        nonlocal calls
        calls += 1
        return True

    await asyncio.wait_for(watchdog_loop(Notifier(), probe, None), timeout=DEADLINE)
    assert calls == 0


async def test_watchdog_pings_only_while_probe_succeeds(
    receiver: tuple[socket.socket, str],
) -> None:
    """No WATCHDOG=1 is sent while the health probe fails or raises; pings resume after."""
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    state = {"healthy": True, "calls": 0, "raise": False}

    async def probe() -> bool:
        state["calls"] += 1
        if state["raise"]:
            raise OSError("database is locked")
        return bool(state["healthy"])

    task = asyncio.create_task(watchdog_loop(n, probe, 0.01))
    try:
        await wait_until(lambda: state["calls"] >= 2, "two healthy probes")
        assert drain(sock)[:1] == [b"WATCHDOG=1"]

        # The probe and its ping run without yielding, so nothing is in flight now.
        state["healthy"] = False
        drain(sock)
        seen = state["calls"]
        await wait_until(lambda: state["calls"] >= seen + 3, "three failing probes")
        assert drain(sock) == []

        state["raise"] = True
        seen = state["calls"]
        await wait_until(lambda: state["calls"] >= seen + 3, "three raising probes")
        assert drain(sock) == []

        state["raise"] = False
        state["healthy"] = True
        seen = state["calls"]
        await wait_until(lambda: state["calls"] >= seen + 1, "a healthy probe")
        assert b"WATCHDOG=1" in drain(sock)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_stops_when_cancelled_as_its_probe_answers(
    receiver: tuple[socket.socket, str],
) -> None:
    """A cancel that arrives while the probe is answering stops the loop (the daemon's
    shutdown cancels it): it is not swallowed, so the loop does not run on forever."""
    _, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    cancelling = True
    task: asyncio.Task[None] | None = None

    async def probe() -> bool:
        await asyncio.sleep(0)
        if cancelling and task is not None:
            task.cancel()  # lands while the probe's answer is on its way back
        return True

    task = asyncio.create_task(watchdog_loop(n, probe, 0.01))
    try:
        done, _ = await asyncio.wait({task}, timeout=DEADLINE)
        assert task in done
        assert task.cancelled()
    finally:
        cancelling = False
        task.cancel()
        await asyncio.wait({task}, timeout=DEADLINE)


async def test_watchdog_withholds_ping_when_probe_hangs(
    receiver: tuple[socket.socket, str],
) -> None:
    """A probe that never answers (a wedged database) counts as unhealthy."""
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    started = 0

    async def probe() -> bool:
        nonlocal started
        started += 1
        await asyncio.Event().wait()  # never set
        return True

    task = asyncio.create_task(watchdog_loop(n, probe, 0.01))
    try:
        await wait_until(lambda: started >= 3, "three timed-out probes")
        assert drain(sock) == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_blocked_event_loop_sends_no_pings(receiver: tuple[socket.socket, str]) -> None:
    """Pings come from the event loop: while it is blocked, none arrive; after, they resume."""
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})

    async def probe() -> bool:
        return True

    task = asyncio.create_task(watchdog_loop(n, probe, 0.01))
    try:
        await wait_until(lambda: bool(drain(sock)), "the first ping")
        # Every ping sent so far is queued (sendto on a Unix datagram socket is
        # synchronous); drop them. Then block the loop with a synchronous receive that
        # waits 30 ping intervals: a ping can only arrive if it was sent during it.
        drain(sock)
        sock.setblocking(True)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        # Unblocked: the loop catches up and pings again.
        await wait_until(lambda: b"WATCHDOG=1" in drain(sock), "a ping after the block")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_can_send_other_fields(receiver: tuple[socket.socket, str]) -> None:
    """With `fields`, the health-gated loop sends them instead of WATCHDOG=1 (the daemon's
    EXTEND_TIMEOUT_USEC= during start-up)."""
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    calls = 0

    async def probe() -> bool:
        nonlocal calls
        calls += 1
        return True

    task = asyncio.create_task(watchdog_loop(n, probe, 0.01, {"EXTEND_TIMEOUT_USEC": 30000000}))
    try:
        await wait_until(lambda: calls >= 2, "two probes")
        got = drain(sock)
        assert got
        assert set(got) == {b"EXTEND_TIMEOUT_USEC=30000000"}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
