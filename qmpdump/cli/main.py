"""The ``qmpdump`` command: argument parsing and the one mapping of errors to exit codes.

Every failure qmpdump expects ends as one line on stderr and the exit code of its error class
(:mod:`qmpdump.errors`); a traceback means a bug. The commands (and the libraries they pull in,
most of the start-up time) are imported inside :func:`main`, so that a Ctrl-C that lands while
they load is an interrupt like any other, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from qmpdump import __version__

__all__ = ["main"]

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per command."""
    from qmpdump.cli import (  # noqa: PLC0415  (see the module doc)
        client_commands,
        daemon_command,
        demo,
        dump_command,
        map_command,
    )

    parser = argparse.ArgumentParser(
        prog="qmpdump", description="Memory dumps of live QEMU VMs, copying only populated memory."
    )
    parser.add_argument("--version", action="version", version=f"qmpdump {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    map_command.add_parser(commands)
    dump_command.add_parser(commands)
    daemon_command.add_parser(commands)
    demo.add_parser(commands)
    client_commands.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    try:
        from qmpdump.cli import (  # noqa: PLC0415  (see the module doc)
            client_commands,  # noqa: F401
            daemon_command,  # noqa: F401
            demo,  # noqa: F401
            dump_command,  # noqa: F401
            map_command,  # noqa: F401
        )
    except SystemExit as done:  # Ctrl-C while loading (qmpdump.cli's handler said so)
        return int(done.code or EXIT_INTERRUPTED)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("qmpdump: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    from qmpdump.errors import QmpdumpError  # noqa: PLC0415  (see the module doc)

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # qemu.qmp logs every failed connection at ERROR; qmpdump reports it as one line.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        return int(asyncio.run(args.run(args)))
    except QmpdumpError as err:
        print(f"qmpdump: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
