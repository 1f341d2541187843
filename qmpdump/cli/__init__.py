"""Operator commands: ``qmpdump demo`` (and, as they land, ``map``, ``dump`` and the API client)."""
