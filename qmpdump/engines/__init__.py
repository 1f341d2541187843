"""Dump engines: QEMU's ``dump-guest-memory`` (:mod:`.qemu`) and, with the sparse reader, our own.

:mod:`.run` is what every engine shares: the output file's life (partial, fsync, rename), the
sidecar JSON, and the memory-map summary recorded with each dump.
"""
