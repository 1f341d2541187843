"""A bound on the daemon's log rate: the same line (logger and text) at most
:data:`BURST` times per :data:`WINDOW_S`; the rest are counted and said in one line when the
window ends. A flood of one failure (a client storm, a peer that keeps failing) then costs a few
lines, not megabytes a second, and every different line still gets through."""

from __future__ import annotations

import logging
import time

__all__ = ["BURST", "WINDOW_S", "RateLimitFilter", "install"]

#: lines of one kind let through per window
BURST = 5
#: the window, in seconds
WINDOW_S = 10.0
#: kinds of line remembered at most (the oldest are forgotten first)
_KINDS = 1024


class RateLimitFilter(logging.Filter):
    """The filter itself; put it on a handler."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        #: (logger, template) -> [window start, lines let through, lines dropped]
        self._seen: dict[tuple[str, object], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage()[:500])
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            dropped = int(entry[2]) if entry is not None else 0
            if len(self._seen) >= _KINDS and entry is None:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.getMessage()} (and {dropped} more in the last window)"
                record.args = None
            return True
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False


def install(logger: logging.Logger | None = None) -> None:
    """Put a rate-limit filter on every handler of ``logger`` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RateLimitFilter) for f in handler.filters):
            handler.addFilter(RateLimitFilter())
