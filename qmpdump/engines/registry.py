"""The engines by name: the one list a new engine is added to."""

from __future__ import annotations

from collections.abc import Mapping

from qmpdump.engines.backend import ENGINE as BACKEND
from qmpdump.engines.base import Engine
from qmpdump.engines.qemu import ENGINE as QEMU
from qmpdump.engines.snapshot import ENGINE as SNAPSHOT
from qmpdump.engines.spec import EngineName

__all__ = ["ENGINES"]

#: Every engine but ``auto`` (which is a choice among these).
ENGINES: Mapping[EngineName, Engine] = {
    EngineName.BACKEND: BACKEND,
    EngineName.QEMU: QEMU,
    EngineName.SNAPSHOT: SNAPSHOT,
}
