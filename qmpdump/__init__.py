"""qmpdump: memory dumps of live QEMU virtual machines that copy only populated memory."""

__version__ = "0.1.0"
