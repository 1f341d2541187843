"""ELF64 cores: reading QEMU's headers and notes, and (with the sparse engine) planning our own."""
