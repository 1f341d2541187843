"""Run the installed ``qmpdump`` console script as an operator would (shared by the tests)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

QMPDUMP = str(Path(sys.executable).parent / "qmpdump")


async def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    umask: int | None = None,
) -> tuple[int, str, str]:
    """Run ``qmpdump ARGS``; (exit code, stdout, stderr). Killed if it outlives ``timeout_s``."""
    old = os.umask(umask) if umask is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            QMPDUMP,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
    finally:
        if old is not None:
            os.umask(old)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
