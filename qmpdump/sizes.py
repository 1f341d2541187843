"""Byte counts as people write them, and back: the one parser and the one formatter of sizes.

Units mean what they say, everywhere (CLI options and the configuration alike), case-insensitive:

* ``B`` or no unit: bytes. A plain integer may also be hex (``0x1000``), for addresses.
* ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB`` -- powers of 1024 (IEC 80000-13);
* ``K``, ``M``, ``G``, ``T``, ``P`` alone -- also powers of 1024, as in QEMU's ``-m 4G`` and
  ``numfmt --from=iec``;
* ``KB``, ``MB``, ``GB``, ``TB``, ``PB`` -- powers of 1000 (SI), as a disk vendor means them.

A fraction is allowed with a unit (``1.5GiB``); the fraction of a byte left over is dropped.
:func:`format_size` always writes binary units (``1.5 GiB``), which :func:`parse_size` reads
back.
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["format_size", "parse_size"]

_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1024**i for i, p in enumerate("kmgtp", 1)},
    **{f"{p}ib": 1024**i for i, p in enumerate("kmgtp", 1)},
    **{f"{p}b": 1000**i for i, p in enumerate("kmgtp", 1)},
}


def parse_size(text: str) -> int:
    """Read a byte count such as ``4096``, ``0x1000``, ``10GiB``, ``1.5G`` or ``500MB``.

    Raises ValueError, whose message says what a size looks like, on anything else.
    """
    stripped = text.strip()
    if _HEX_RE.fullmatch(stripped):
        return int(stripped, 16)
    match = _SIZE_RE.fullmatch(stripped)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or ("." in match.group(1) and not unit):
        raise ValueError(
            f"{text!r} is not a size: write a number of bytes, or a number with a unit "
            "such as 500MB, 10GiB or 2T"
        )
    return int(Decimal(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """Bytes in binary units, short: ``768 KiB``, ``1.5 GiB``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"
