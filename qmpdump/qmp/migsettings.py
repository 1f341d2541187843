"""Migration settings an engine changes, and how to put them back after a crash.

The snapshot engine turns on QEMU's ``background-snapshot`` migration capability and raises the
``max-bandwidth`` parameter for a dump, and restores both at the end. A qmpdump that dies in
between (SIGKILL, a crash) leaves them changed: a later migration by the operator would silently
become a background snapshot. Both the daemon (its SQLite journal) and the CLI (a file per VM,
:mod:`qmpdump.cli.settings_journal`) journal the values to put back before the change, and on
their next session with the same QEMU process end the orphaned migration
(:func:`end_orphaned_migration`) and send the values back (:func:`restore_migration_settings`).

QMP commands (QEMU's ``qapi/migration.json``): ``query-migrate`` (``MigrationStatus``),
``migrate_cancel``, ``migrate-set-capabilities``, ``migrate-set-parameters``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from qmpdump.errors import QmpdumpError
from qmpdump.qmp.session import QMPSession

__all__ = [
    "MIGRATION_CANCEL_WAIT_S",
    "MIGRATION_IDLE",
    "MigrationSettings",
    "SettingsToRestore",
    "describe_settings",
    "end_orphaned_migration",
    "migration_status",
    "restore_migration_settings",
]

#: ``query-migrate`` states in which no migration runs (QEMU's MigrationStatus); any other is
#: one in progress
MIGRATION_IDLE = frozenset({"none", "completed", "failed", "cancelled"})
#: how long a ``migrate_cancel`` of an orphaned background snapshot may take to end it
MIGRATION_CANCEL_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    """Migration settings to restore: ``{capability: state}`` and parameters as QMP takes them."""

    capabilities: dict[str, bool]
    parameters: dict[str, int]


class SettingsToRestore(Protocol):
    """What a journal entry holds to put back (:class:`MigrationSettings`, the daemon's
    :class:`~qmpdump.service.store.MigrationSettingsRecord`, the CLI's journal entry)."""

    @property
    def capabilities(self) -> Mapping[str, bool]: ...

    @property
    def parameters(self) -> Mapping[str, int]: ...


async def migration_status(session: QMPSession) -> str:
    """``query-migrate``'s status (``none`` when QEMU gives none)."""
    reply = await session.execute("query-migrate")
    status = reply.get("status") if isinstance(reply, dict) else None
    return status if isinstance(status, str) else "none"


async def end_orphaned_migration(
    session: QMPSession, *, wait_s: float = MIGRATION_CANCEL_WAIT_S
) -> bool:
    """Cancel the migration QEMU still runs, if any, and wait for it to end; whether one ran.

    With a journal entry of the same QEMU, the one migration that can run is the background
    snapshot qmpdump started and lost (its reader gone, it may still be in its setup).
    Raises :class:`~qmpdump.errors.QmpdumpError` when it does not end within ``wait_s`` (the
    journal entry stays, for the next session).
    """
    status = await migration_status(session)
    if status in MIGRATION_IDLE:
        return False
    await session.execute("migrate_cancel")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while (status := await migration_status(session)) not in MIGRATION_IDLE:
        if loop.time() > deadline:
            raise QmpdumpError(
                f"the migration did not end within {wait_s:g} s of migrate_cancel "
                f"(it is {status!r})"
            )
        await asyncio.sleep(0.05)
    return True


async def restore_migration_settings(session: QMPSession, settings: SettingsToRestore) -> None:
    """Send the journalled capabilities and parameters back to QEMU."""
    if settings.capabilities:
        await session.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": name, "state": state}
                    for name, state in sorted(settings.capabilities.items())
                ]
            },
        )
    if settings.parameters:
        await session.execute("migrate-set-parameters", dict(settings.parameters))


def describe_settings(settings: SettingsToRestore) -> str:
    """``background-snapshot=off, max-bandwidth=134217728``."""
    parts = [f"{k}={'on' if v else 'off'}" for k, v in sorted(settings.capabilities.items())]
    parts += [f"{k}={v}" for k, v in sorted(settings.parameters.items())]
    return ", ".join(parts) or "nothing"
