"""Operator commands: ``qmpdump demo`` (and, as they land, ``map``, ``dump`` and the API client)."""

import os
import signal
import sys
from types import FrameType


def _interrupted_while_loading(_signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C while the command's modules load (most of its start-up time): the same one line
    and exit code as an interrupt later, not a traceback from the middle of an import.
    :func:`qmpdump.cli.main.main` puts Python's own handler back before it runs a command."""
    print("qmpdump: interrupted", file=sys.stderr)
    raise SystemExit(130)


# Only in the ``qmpdump`` command itself: a program that imports qmpdump.cli keeps its own.
if os.path.basename(sys.argv[0] if sys.argv else "") == "qmpdump":
    signal.signal(signal.SIGINT, _interrupted_while_loading)
