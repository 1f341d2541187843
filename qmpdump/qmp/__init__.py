"""Everything that speaks QMP: the session, typed replies and events, and probes that build
memmap types.

The only package that imports ``qemu.qmp``; no raw QMP dicts or library objects travel past it.
:mod:`.guestdump` is the one place that starts a ``dump-guest-memory`` into a pipe of ours.
"""
