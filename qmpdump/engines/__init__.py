"""Dump engines, one shape for all.

* :mod:`.spec` -- the dump specification and what each engine offers (every rule lives there);
* :mod:`.base` -- the :class:`~.base.Engine` protocol, its job, its typed result, ``Progress``;
* :mod:`.qemu`, :mod:`.backend` -- the engines; :mod:`.registry` lists them;
* :mod:`.run` -- survey, choose, run, commit with a :mod:`.sidecar`; cancellation.

Helpers: :mod:`.relay` (QEMU's pipe into the file), :mod:`.copier` and :mod:`.copyplan` (the
sparse reader's copy), :mod:`.threads` (the one wait loop for blocking work).
"""
