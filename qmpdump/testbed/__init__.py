"""Real QEMU VMs for the demo and the test suite: a cached Debian guest with virtio-mem, and
bare VMs whose memory the host writes. Product code: the README's demo runs on it."""
