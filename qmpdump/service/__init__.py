"""The dump service: what the daemon is told (:mod:`.config`) and what it remembers.

* :mod:`.config` -- the one TOML file, validated with pydantic; static VMs and discovery by glob.
* :mod:`.store` -- the durable job store (SQLite): jobs, the pause journal, the dump catalogue.
* :mod:`.retention` -- which dumps to delete to honour a VM's count and byte limits (pure).
"""
