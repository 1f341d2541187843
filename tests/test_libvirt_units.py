"""Pure parts of the libvirt support: domain XML, pid-file folders, libvirt's error codes.

The domain XML is the live XML libvirt 9.0 gave for a test domain (trimmed to the memory parts
and what surrounds them). Error classification uses libvirt's own exception type with the codes
set by hand: a real "permission denied" needs a user other than root, and the shared test venv
cannot be run by one here; the other codes are also met for real in ``tests/test_libvirt.py``.
"""

from __future__ import annotations

import pytest

from qmpdump.errors import (
    DomainNotFound,
    DomainNotRunning,
    LayoutError,
    LibvirtError,
    LibvirtPermission,
    LibvirtUnavailable,
)
from qmpdump.libvirt.connection import DomainRef, _pid_dir, translate
from qmpdump.libvirt.domxml import parse_domain_memory
from qmpdump.libvirt.watch import matches

LIVE_XML = """<domain type='qemu' id='1'>
  <name>lvtry1</name>
  <uuid>1144f9d7-b89d-4283-afa2-ff5e127f3d15</uuid>
  <maxMemory slots='2' unit='KiB'>4194304</maxMemory>
  <memory unit='KiB'>3145728</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <cpu mode='maximum' check='none' migratable='off'>
    <numa>
      <cell id='0' cpus='0-1' memory='1048576' unit='KiB'/>
    </numa>
  </cpu>
  <devices>
    <memory model='virtio-mem'>
      <target>
        <size unit='KiB'>2097152</size>
        <node>0</node>
        <block unit='KiB'>2048</block>
        <requested unit='KiB'>262144</requested>
        <current unit='KiB'>262144</current>
      </target>
      <alias name='virtiomem0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </memory>
  </devices>
</domain>"""

MiB = 1 << 20


def test_live_xml_of_libvirt_9() -> None:
    mem = parse_domain_memory(LIVE_XML)
    assert mem.name == "lvtry1"
    assert mem.uuid == "1144f9d7-b89d-4283-afa2-ff5e127f3d15"
    assert (mem.memory, mem.max_memory) == (3072 * MiB, 4096 * MiB)
    assert (mem.source, mem.access, mem.hugepages) == ("memfd", "shared", False)
    (cell,) = mem.cells
    assert (cell.id, cell.size, cell.backend) == (0, 1024 * MiB, "ram-node0")
    (dev,) = mem.virtio_mem
    assert dev.backend == "memvirtiomem0"  # QEMU's object id for libvirt's alias
    assert (dev.size, dev.block_size, dev.requested_size, dev.current_size, dev.node) == (
        2048 * MiB,
        2 * MiB,
        256 * MiB,
        256 * MiB,
        0,
    )


def test_libvirt_defaults_and_units() -> None:
    xml = """<domain><name>d</name><memory unit='GiB'>2</memory>
      <cpu><numa><cell id='0' memory='1' unit='G'/><cell id='1' memory='1048576'/></numa></cpu>
      </domain>"""
    mem = parse_domain_memory(xml)
    # no <memoryBacking>: anonymous and private, libvirt's defaults
    assert (mem.source, mem.access) == ("anonymous", "private")
    assert mem.memory == 2048 * MiB
    assert [c.size for c in mem.cells] == [1024 * MiB, 1024 * MiB]
    assert mem.virtio_mem == ()


@pytest.mark.parametrize("xml", ["<domain", "<domain><memory unit='parsec'>1</memory></domain>"])
def test_bad_xml_is_a_layout_error(xml: str) -> None:
    with pytest.raises(LayoutError):
        parse_domain_memory(xml)


def test_pid_file_folders() -> None:
    assert str(_pid_dir("qemu:///system")) == "/run/libvirt/qemu"
    assert str(_pid_dir("qemu+unix:///system?socket=/x")) == "/run/libvirt/qemu"
    assert str(_pid_dir("qemu:///session")).endswith("/libvirt/qemu/run")
    assert _pid_dir("qemu+ssh://host/system") is None  # remote: no local pid


def _error(code: int, domain: int, message: str) -> Exception:
    libvirt = pytest.importorskip("libvirt")
    err = libvirt.libvirtError(message)
    err.err = (code, domain, message, 2, None, None, None, 0, 0)
    assert isinstance(err, Exception)
    return err


def test_libvirt_errors_map_onto_the_tree() -> None:
    libvirt = pytest.importorskip("libvirt")
    ref = DomainRef("qemu:///system", "d")
    cases: list[tuple[Exception, type[LibvirtError]]] = [
        (_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain"), DomainNotFound),
        (
            _error(
                libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, "domain is not running"
            ),
            DomainNotRunning,
        ),
        (
            _error(
                libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_FROM_RPC,
                "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied",
            ),
            LibvirtPermission,
        ),
        (
            _error(libvirt.VIR_ERR_ACCESS_DENIED, libvirt.VIR_FROM_ACCESS, "access denied"),
            LibvirtPermission,
        ),
        (
            _error(
                libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_FROM_RPC,
                "Failed to connect socket to '/run/libvirt/libvirt-sock': Connection refused",
            ),
            LibvirtUnavailable,
        ),
        (_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, "odd"), LibvirtError),
    ]
    for err, want in cases:
        got = translate(err, ref, "connect")
        assert type(got) is want, (err, got)
        assert got.exc is err
        assert "libvirt qemu:///system domain d" in str(got)


def test_domain_globs() -> None:
    assert matches("web1", ())
    assert matches("web1", ["db*", "web?"])
    assert not matches("web10", ["web?"])
