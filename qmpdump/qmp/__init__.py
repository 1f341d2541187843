"""Everything that speaks QMP: the session, typed replies, and probes that build memmap types.

The only package that imports ``qemu.qmp``; no raw QMP dicts travel past it.
"""
