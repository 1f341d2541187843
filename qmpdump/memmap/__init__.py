"""Pure model of guest memory: ranges, layouts, virtio-mem state and populated sets. No I/O here."""
