"""The daemon's Prometheus metrics, through ``prometheus_client`` with a registry of its own.

Why the library: it owns the text exposition format (escaping, ``# HELP``/``# TYPE``, float
formatting) so qmpdump does not; a registry of our own keeps the process-global default one
(and whatever other code registers there) out of ``/metrics``. A custom collector reads the
daemon's state at scrape time, so there is no second copy of "connected" or "running" to keep
in step, and counters come without the ``_created`` series ``Counter`` objects add.

Series: ``qmpdump_dumps_total{vm,result}``, ``qmpdump_dump_bytes_total{vm}``,
``qmpdump_dump_duration_seconds_total{vm}``, ``qmpdump_vm_paused_seconds_total{vm}``,
``qmpdump_vm_connected{vm}``, ``qmpdump_jobs_running``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "DaemonMetrics"]

#: text exposition format 0.0.4, what ``generate_latest`` writes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Totals:
    dumps: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    duration_s: dict[str, float] = field(default_factory=dict)
    paused_s: dict[str, float] = field(default_factory=dict)


class DaemonMetrics(Collector):
    """Counters the job runner feeds, gauges read from the daemon when scraped."""

    def __init__(
        self,
        *,
        connected: Callable[[], Mapping[str, bool]],
        running_jobs: Callable[[], int],
    ) -> None:
        self._connected = connected
        self._running_jobs = running_jobs
        self._totals = _Totals()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def ended(self, vm: str, result: str) -> None:
        """A job of ``vm`` ended as ``result`` (succeeded, failed, cancelled)."""
        self._totals.dumps[vm, result] += 1

    def dumped(self, vm: str, size: int, duration_s: float, paused_s: float | None) -> None:
        """A dump of ``vm`` succeeded."""
        t = self._totals
        t.bytes[vm] += size
        t.duration_s[vm] = t.duration_s.get(vm, 0.0) + duration_s
        t.paused_s[vm] = t.paused_s.get(vm, 0.0) + (paused_s or 0.0)

    def collect(self) -> Iterator[Metric]:
        t = self._totals
        dumps = CounterMetricFamily(
            "qmpdump_dumps", "Dump jobs ended, by VM and result.", labels=["vm", "result"]
        )
        for (vm, result), n in sorted(t.dumps.items()):
            dumps.add_metric([vm, result], n)
        yield dumps
        for name, help_text, data in (
            ("qmpdump_dump_bytes", "Bytes of dumps written.", dict(t.bytes)),
            ("qmpdump_dump_duration_seconds", "Seconds spent dumping.", t.duration_s),
            ("qmpdump_vm_paused_seconds", "Seconds VMs were paused by dumps.", t.paused_s),
        ):
            family = CounterMetricFamily(name, help_text, labels=["vm"])
            for vm, value in sorted(data.items()):
                family.add_metric([vm], value)
            yield family
        connected = GaugeMetricFamily(
            "qmpdump_vm_connected", "Whether the daemon's QMP connection is up.", labels=["vm"]
        )
        for vm, up in self._connected().items():
            connected.add_metric([vm], int(up))
        yield connected
        yield GaugeMetricFamily(
            "qmpdump_jobs_running", "Dump jobs running now.", value=self._running_jobs()
        )

    def text(self) -> str:
        """The exposition text of every series."""
        return generate_latest(self.registry).decode()
