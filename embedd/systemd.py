"""The systemd notify protocol in pure Python: READY, STATUS, WATCHDOG, STOPPING.

systemd starts the daemon with ``NOTIFY_SOCKET`` naming a Unix datagram socket (a path,
or ``@name`` for the abstract namespace) and, when the unit sets ``WatchdogSec=``,
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). A message is one datagram of ``KEY=value``
lines. Outside systemd there is no socket and every call here is a no-op, so the daemon
calls the same methods on a laptop and in production.

The parsing and message formatting are plain functions; `Notifier` is the thin shell
that owns the address and sends; `watchdog_loop` is the asyncio task that pings only
while a health probe (the daemon's state-database query) succeeds. Because the pings
are sent from the event loop itself, a loop that is stuck in a blocking call stops
pinging and systemd kills and restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from embedd.logs import get_logger

log = get_logger(__name__)


def parse_notify_address(value: str | None) -> str | None:
    """Turn a ``NOTIFY_SOCKET`` value into an address for ``sendto``, or None.

    ``/path`` is a file-system socket, ``@name`` an abstract one (a leading NUL byte on
    the wire). Anything else (unset, empty, ``vsock:`` addresses) means no notifications.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def parse_watchdog_usec(usec: str | None, watchdog_pid: str | None, pid: int) -> int | None:
    """Return the watchdog timeout in microseconds when it is meant for process *pid*.

    systemd sets ``WATCHDOG_PID`` to the main process; a child that inherited the
    environment must not ping on its parent's behalf. Malformed or zero values mean
    "no watchdog".
    """
    if not usec:
        return None
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


def format_message(fields: Mapping[str, object]) -> bytes:
    """Encode notify fields as the protocol's ``KEY=value`` lines.

    Keys are upper-cased (``ready=1`` becomes ``READY=1``). A newline inside a value
    would start a new, unintended assignment, so it is replaced by a space; booleans
    become ``1``/``0``.
    """
    lines = []
    for key, value in fields.items():
        name = key.upper()
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"not a notify field name: {key!r}")
        if isinstance(value, bool):
            text = "1" if value else "0"
        else:
            text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{name}={text}")
    return "\n".join(lines).encode("utf-8")


@dataclass
class Notifier:
    """Sends notify messages to systemd; does nothing when not run by systemd.

    Build it with `Notifier.from_env`. Sending never raises: a failure (socket gone,
    queue full) is logged once and the daemon carries on, since a missed status line
    must not take the service down (a missed watchdog ping will, by design).
    """

    address: str | None = None
    watchdog_usec: int | None = None
    _warned: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from *environ*."""
        env = os.environ if environ is None else environ
        return cls(
            address=parse_notify_address(env.get("NOTIFY_SOCKET")),
            watchdog_usec=parse_watchdog_usec(
                env.get("WATCHDOG_USEC"),
                env.get("WATCHDOG_PID"),
                os.getpid() if pid is None else pid,
            ),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the timeout, as systemd advises), or None."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, **fields: object) -> bool:
        """Send one message made of *fields*; return True when it was delivered."""
        if self.address is None or not fields:
            return False
        payload = format_message(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking: a full receive queue must never stall the event loop.
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "systemd notification failed; further failures are not logged",
                    error=f"{type(exc).__name__}: {exc.strerror or exc}",
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up is complete (``READY=1``), optionally with a status."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``)."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that shutdown has begun (``STOPPING=1``)."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)


async def watchdog_loop(
    notifier: Notifier,
    probe: Callable[[], Awaitable[bool]],
    interval: float | None,
    fields: Mapping[str, object] | None = None,
) -> None:
    """Ping the watchdog every *interval* seconds while *probe* reports health.

    With *fields*, send those instead of ``WATCHDOG=1`` (the daemon sends
    ``EXTEND_TIMEOUT_USEC=`` this way during start-up, when systemd's watchdog is not
    armed yet but its start timeout runs).

    The probe gets *interval* seconds to answer; a probe that returns False, raises or
    hangs means no ping this round, so systemd restarts the service once pings have
    been missing for ``WatchdogSec``. Returns at once when *interval* is None (no
    watchdog configured); otherwise runs until cancelled.
    """
    if interval is None:
        return
    if interval <= 0:
        raise ValueError("watchdog interval must be positive")
    healthy = True
    while True:
        ok = False
        try:
            # `asyncio.timeout`, not `wait_for`: the probe runs in this task, so a
            # cancel that lands as the probe answers is never swallowed (3.11's
            # `wait_for` returns the probe's answer then, and the loop ran forever).
            async with asyncio.timeout(interval):
                ok = await probe()
        except TimeoutError:
            reason = "the health probe did not answer in time"
        except Exception as exc:  # any failure of the probe is "unhealthy", never fatal here
            reason = f"the health probe failed: {type(exc).__name__}"
        else:
            reason = "the health probe reported a problem"
        if ok:
            if fields is None:
                notifier.watchdog()
            else:
                notifier.notify(**fields)
            if not healthy:
                log.info("watchdog pings resumed")
            healthy = True
        elif healthy:
            # Log the transition only, not every skipped ping.
            log.warning("watchdog ping withheld", reason=reason)
            healthy = False
        await asyncio.sleep(interval)


__all__ = [
    "Notifier",
    "format_message",
    "parse_notify_address",
    "parse_watchdog_usec",
    "watchdog_loop",
]
