"""Where ``map`` and ``dump`` find the VM: a QMP socket (``--qmp``) or a libvirt domain.

``--libvirt DOMAIN [--connect URI] [--monitor passthrough|supported]``. The CLI's default
monitor mode is **supported**: it works on every libvirt host without side effects, while
passthrough marks the domain tainted (``custom-monitor``) for the rest of its life, sends
``stop``/``cont`` and fd passing behind libvirt's back, and should be a deliberate choice, as it
is in the daemon's configuration. Passthrough is what the backend engine, ``--exact-plug`` and a
guest-physical map need; asking for one of those without it is a usage error that says so.
"""

from __future__ import annotations

import argparse

from qmpdump.errors import UsageError
from qmpdump.libvirt.connection import DEFAULT_URI, DomainRef
from qmpdump.qmp.passthrough import LibvirtQMPSession
from qmpdump.qmp.session import QMPSession, parse_address

__all__ = ["DEFAULT_MONITOR", "add_source_arguments", "libvirt_ref", "monitor_mode", "open_session"]

DEFAULT_MONITOR = "supported"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--qmp`` or ``--libvirt`` (one of them), ``--connect``, ``--monitor``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--qmp", help="QEMU's QMP socket (path, or tcp:HOST:PORT)")
    source.add_argument("--libvirt", metavar="DOMAIN", help="a running libvirt domain, by name")
    parser.add_argument(
        "--connect",
        metavar="URI",
        help="libvirt URI for --libvirt (default qemu:///system)",
    )
    parser.add_argument(
        "--monitor",
        choices=["passthrough", "supported"],
        help="with --libvirt: supported (default; QEMU's dump through libvirt, map from the "
        "domain XML, no taint) or passthrough (QMP through libvirt's monitor passthrough: "
        "every engine and the full map; libvirt marks the domain tainted)",
    )


def monitor_mode(args: argparse.Namespace) -> str | None:
    """None for ``--qmp``; else the libvirt monitor mode (checked)."""
    if args.libvirt is None:
        if args.connect is not None or args.monitor is not None:
            raise UsageError("--connect and --monitor go with --libvirt")
        return None
    return str(args.monitor or DEFAULT_MONITOR)


def libvirt_ref(args: argparse.Namespace) -> DomainRef:
    """The domain of ``--libvirt``/``--connect``."""
    if not args.libvirt:
        raise UsageError("--libvirt needs a domain name")
    return DomainRef(args.connect or DEFAULT_URI, args.libvirt)


def open_session(args: argparse.Namespace) -> QMPSession:
    """A not yet connected session for ``--qmp`` or ``--libvirt --monitor passthrough``
    (libvirt itself is imported only when the session connects)."""
    if args.libvirt is None:
        return QMPSession(parse_address(args.qmp), timeout_s=args.timeout)
    return LibvirtQMPSession(libvirt_ref(args), timeout_s=args.timeout)
