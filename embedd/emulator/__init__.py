"""A local OpenAI emulator: Files, Batch and Embeddings endpoints, strictly, on loopback.

Modules, in the order a request meets them:

- :mod:`~embedd.emulator.config`: :class:`EmulatorConfig`
- :mod:`~embedd.emulator.server`: auth, fault injection, rate limits, sync embeddings
- :mod:`~embedd.emulator.resources`: the Files and Batch endpoints
- :mod:`~embedd.emulator.validation`: what the API accepts (pure)
- :mod:`~embedd.emulator.lifecycle`: a batch's status from the clock (pure)
- :mod:`~embedd.emulator.output`: answers and streamed batch output files
- :mod:`~embedd.emulator.vectors`: deterministic unit vectors and token counts
- :mod:`~embedd.emulator.faults`: the fault script (format documented there)
- :mod:`~embedd.emulator.store`: files and batches on disk

Every vector it makes is fake; callers mark results made through it as emulated.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from embedd.emulator import resources
from embedd.emulator.config import EmulatorConfig
from embedd.emulator.server import (
    EMULATOR_KEY,
    Emulator,
    create_embeddings,
    get_billed,
    get_state,
    openai_middleware,
    set_faults,
)
from embedd.emulator.vectors import embed_text

__all__ = [
    "EmulatorConfig",
    "RunningEmulator",
    "create_app",
    "embed_text",
    "main_emulator",
    "start_emulator",
]


def create_app(
    config: EmulatorConfig, *, clock: Callable[[], float] = time.time
) -> web.Application:
    """Build the emulator's aiohttp application (``clock`` is injectable for tests)."""

    emu = Emulator(config, clock)
    # 256 MiB lets a 200 MB batch file (plus multipart framing) reach the size check.
    app = web.Application(middlewares=[openai_middleware], client_max_size=256 * 1024**2)
    app[EMULATOR_KEY] = emu
    app.router.add_post("/v1/embeddings", create_embeddings)
    resources.add_routes(app)
    app.router.add_post("/_emulator/faults", set_faults)
    app.router.add_get("/_emulator/state", get_state)
    app.router.add_get("/_emulator/billed", get_billed)

    async def close(_: web.Application) -> None:
        emu.close()

    app.on_cleanup.append(close)
    return app


class RunningEmulator:
    """An emulator serving on a loopback port; an async context manager."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self._runner = runner
        self.url = url  # base URL including /v1

    @property
    def app(self) -> web.Application:
        """The running application (tests reach the :class:`Emulator` through it)."""
        return self._runner.app

    async def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningEmulator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_emulator(
    config: EmulatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    clock: Callable[[], float] = time.time,
) -> RunningEmulator:
    """Start serving ``config`` on ``host:port`` (0: any free port)."""
    runner = web.AppRunner(create_app(config, clock=clock), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    bound_port = addresses[0][1] if addresses else port
    shown = f"[{host}]" if ":" in host else host
    return RunningEmulator(runner, f"http://{shown}:{bound_port}/v1")


def main_emulator(host: str, port: int, config: EmulatorConfig) -> int:
    """Run the emulator until SIGINT/SIGTERM; print its URL; return an exit code."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with await start_emulator(config, host, port) as running:
            print(f"embedd emulator listening on {running.url}", flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"embedd emulator: cannot listen on {host}:{port}: {exc.strerror}", flush=True)
        return 1
    return 0
