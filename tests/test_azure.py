"""Azure OpenAI's key header: `[openai] auth_header = "api-key"` sends `api-key: KEY`,
and the emulator in that mode (`--auth-header api-key`) accepts only that."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from tests.conftest import TEST_KEY, DaemonProcess, EmulatorProcess, drop, wait_for


def get_batches(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url + "/batches", headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        assert TEST_KEY not in json.dumps(body)
        return int(exc.code)


def test_the_emulator_in_api_key_mode_takes_only_the_api_key_header(
    start_emulator: Callable[..., EmulatorProcess],
) -> None:
    """`--auth-header api-key`: `api-key: sk-…` is accepted, a bearer token or no key is
    a 401 like Azure's; by default it is the other way round."""
    azure = start_emulator("--auth-header", "api-key")
    assert get_batches(azure.url, {"api-key": TEST_KEY}) == 200
    assert get_batches(azure.url, {"Authorization": f"Bearer {TEST_KEY}"}) == 401
    assert get_batches(azure.url, {}) == 401
    plain = start_emulator()
    assert get_batches(plain.url, {"Authorization": f"Bearer {TEST_KEY}"}) == 200
    assert get_batches(plain.url, {"api-key": TEST_KEY}) == 401


@pytest.mark.parametrize("sync", [False, True], ids=["batch", "sync"])
def test_a_daemon_with_auth_header_api_key_embeds_through_an_azure_style_api(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    sync: bool,
) -> None:
    """End to end with `auth_header = "api-key"`: upload, batch, download (or the sync
    endpoint) all authenticate with `api-key`, and the file is delivered."""
    emulator = start_emulator("--auth-header", "api-key")
    daemon = start_daemon(emulator.url, openai={"auth_header": "api-key"})
    drop(daemon.spool, "doc.txt", b"embedded through an Azure-style key header", sync=sync)
    daemon.wait_done(["doc.txt"])
    assert daemon.outputs() == ["doc.txt.npy"]
    assert TEST_KEY not in daemon.log_text()
    assert daemon.stop() == 0


def test_a_daemon_sending_a_bearer_token_to_an_api_key_api_is_paused(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """The default header against an `api-key` API is refused: submission pauses and the
    file waits (so the end-to-end test above really exercises the header)."""
    emulator = start_emulator("--auth-header", "api-key")
    daemon = start_daemon(emulator.url)
    drop(daemon.spool, "doc.txt", b"never sent")
    wait_for(
        lambda: any(e.get("event") == "submission.paused" for e in daemon.events()),
        30,
        what="submission.paused",
    )
    assert daemon.outputs() == []
    assert daemon.stop() == 0
