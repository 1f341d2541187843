"""Which dumps to delete so that one VM's dumps fit its retention limits (pure).

The policy: dumps are ordered oldest first by creation time (ties keep the order they were given
in). The victims are the shortest run of the oldest dumps whose removal leaves at most
``keep_count`` dumps and at most ``keep_bytes`` bytes. The newest dump is never a victim, even
when it alone is larger than ``keep_bytes``: a dump just taken is not deleted by its own
retention. Victims are always the oldest ones -- a small old dump is not kept in place of a newer
large one, so what survives is always "the latest N dumps".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

__all__ = ["RetainedDump", "retention_victims"]


class RetainedDump(Protocol):
    """What retention needs to know of a dump (e.g. :class:`qmpdump.service.store.DumpRecord`)."""

    @property
    def created(self) -> float:
        """When the dump was taken (seconds since the epoch)."""
        ...

    @property
    def size(self) -> int:
        """Its size in bytes."""
        ...


D = TypeVar("D", bound=RetainedDump)


def retention_victims(
    dumps: Iterable[D], keep_count: int | None, keep_bytes: int | None
) -> list[D]:
    """The dumps to delete, oldest first, so that the rest fit the limits (None: no limit).

    Raises ValueError if ``keep_count`` is below 1 or ``keep_bytes`` below 0.
    """
    if keep_count is not None and keep_count < 1:
        raise ValueError(f"keep_count must be at least 1, not {keep_count}")
    if keep_bytes is not None and keep_bytes < 0:
        raise ValueError(f"keep_bytes must not be negative, not {keep_bytes}")
    ordered = sorted(dumps, key=lambda d: d.created)
    kept_bytes = 0
    # Walk from the newest back; the first dump that would break a limit and all older go.
    for kept_count, i in enumerate(range(len(ordered) - 1, -1, -1)):
        size = ordered[i].size
        too_many = keep_count is not None and kept_count + 1 > keep_count
        too_big = keep_bytes is not None and kept_bytes + size > keep_bytes
        if kept_count and (too_many or too_big):
            return ordered[: i + 1]
        kept_bytes += size
    return []
