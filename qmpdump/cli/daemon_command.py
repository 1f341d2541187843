"""``qmpdump daemon --config FILE``: run the service (under systemd, Type=notify)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from qmpdump.errors import UsageError
from qmpdump.service.config import example_config, load_config
from qmpdump.service.daemon import Daemon

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Register ``daemon``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "daemon",
        help="run the qmpdump service",
        description="Run the qmpdump service: keep VMs connected, run dump jobs, serve the API "
        "on a UNIX socket. Stops cleanly on SIGTERM.",
    )
    parser.add_argument("--config", type=Path, help="the TOML configuration")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument(
        "--example-config", action="store_true", help="print a commented example configuration"
    )
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    """Validate, then serve until SIGTERM."""
    if args.example_config:
        print(example_config(), end="")
        return 0
    if args.config is None:
        raise UsageError("the following arguments are required: --config")
    config = load_config(args.config)
    if args.check:
        vms = config.resolve_vms()
        print(f"{args.config}: valid; {len(vms)} VM(s): " + ", ".join(v.name for v in vms))
        for i, entry in enumerate(config.libvirt):
            globs = ", ".join(entry.domains) or "every domain"
            print(f"  libvirt[{i}]: {entry.uri}, {globs} (monitor {entry.monitor})")
        return 0
    if not args.verbose:
        # A service's log: what it does, at INFO (journald keeps it), the QMP library quiet.
        logging.getLogger("qmpdump").setLevel(logging.INFO)
    code = await Daemon(config).run()
    if config.libvirt:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process once the daemon has shut down in order (jobs, API socket, store, lock).

    libvirt's event implementation is process-wide and bound for good to the asyncio loop
    (``libvirtaio``; it can't be unregistered): libvirt objects the interpreter frees at exit
    would call into the closed loop and print tracebacks. Nothing is left to clean up by then.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
