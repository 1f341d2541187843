"""kdump-compressed ("diskdump") output: format, planning, codecs (pure)."""
