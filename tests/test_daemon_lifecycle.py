"""The daemon's shutdown undoes every start-up step in reverse, even when one of them fails.

A pure test of the undo wrappers on :class:`contextlib.AsyncExitStack` (the real daemon's
start and stop on QEMU are in test_daemon.py); a failing step is something a real resource
cannot be made to do on demand.
"""

from __future__ import annotations

import contextlib
import logging

import pytest

from qmpdump.service.daemon import _Undo


async def test_every_undo_runs_in_reverse_and_each_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    undo = _Undo()
    ran: list[str] = []

    def boom() -> None:
        ran.append("store")
        raise OSError("disk gone")

    async def aboom() -> None:
        ran.append("api")
        raise RuntimeError("socket busy")

    with caplog.at_level(logging.ERROR, logger="qmpdump.service.daemon"):
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(undo.sync("releasing the lock", lambda: ran.append("lock")))
            stack.callback(undo.sync("closing the job store", boom))
            stack.push_async_callback(undo.wrap("stopping the API", aboom))
            stack.callback(undo.sync("notifying", lambda: ran.append("notify")))
    assert ran == ["notify", "api", "store", "lock"]
    assert undo.failures == 2
    failed = [r.getMessage() for r in caplog.records]
    assert failed == [
        "shutdown: stopping the API failed",
        "shutdown: closing the job store failed",
    ]
