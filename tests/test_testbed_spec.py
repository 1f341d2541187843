"""The testbed's memory options on QEMU's command line and in ``object-add`` (pure).

The fidelity matrix boots these for real; here the exact options, and the specs the testbed must
refuse before starting anything, are checked without QEMU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpdump.errors import UsageError
from qmpdump.testbed.qemus import QemuBuild, QemuInstall
from qmpdump.testbed.vm import (
    Backend,
    BackendOptions,
    MiB,
    NumaNodeSpec,
    VirtioMemSpec,
    VMSpec,
    backend_object_qmp,
    qemu_argv,
)

RUN = Path("/run/x")
SHM = Path("/dev/shm/x")


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def _argv(spec: VMSpec) -> list[str]:
    return qemu_argv(spec, RUN, SHM, None, QemuInstall(QemuBuild.SYSTEM_7_2, "qemu-system-x86_64"))


def test_private_hugetlb_and_prealloc_backends() -> None:
    spec = VMSpec(
        ram_backend=Backend.MEMFD,
        ram_options=BackendOptions(share=False, hugetlb=True, prealloc=True),
        virtio_mem=(
            VirtioMemSpec(backend=Backend.FILE, options=BackendOptions(share=False), node=None),
        ),
        guest=False,
    )
    objects = _options(_argv(spec), "-object")
    assert objects == [
        f"memory-backend-memfd,id=ram0,size={512 * MiB},share=off,hugetlb=on,"
        f"hugetlbsize={2 * MiB},prealloc=on",
        f"memory-backend-file,id=mem-vmem0,mem-path={SHM}/mem-vmem0,size={2 << 30},share=off",
    ]


def test_numa_nodes_virtio_mem_on_a_node_dimm_room_and_tcp() -> None:
    spec = VMSpec(
        ram_size=512 * MiB,
        numa=(
            NumaNodeSpec(256 * MiB, Backend.MEMFD),
            NumaNodeSpec(256 * MiB, Backend.FILE, BackendOptions(share=False)),
        ),
        virtio_mem=(VirtioMemSpec(backend=Backend.RAM, node=1),),
        dimm_slots=2,
        dimm_space=256 * MiB,
        qmp_tcp_port=4444,
        guest=False,
    )
    argv = _argv(spec)
    assert _options(argv, "-numa") == [
        "node,nodeid=0,memdev=node0",
        "node,nodeid=1,memdev=node1",
    ]
    objects = _options(argv, "-object")
    assert objects[:2] == [
        f"memory-backend-memfd,id=node0,size={256 * MiB},share=on",
        f"memory-backend-file,id=node1,mem-path={SHM}/node1,size={256 * MiB},share=off",
    ]
    assert _options(argv, "-m") == ["512M,slots=2,maxmem=2816M"]
    assert "memory-backend=" not in _options(argv, "-machine")[0]
    assert _options(argv, "-device")[0].endswith(",node=1")
    assert "tcp:127.0.0.1:4444,server=on,wait=off" in _options(argv, "-qmp")


def test_object_add_arguments_are_typed() -> None:
    args = backend_object_qmp(
        Backend.FILE, "mem-dimm0", 128 * MiB, SHM, BackendOptions(share=False, prealloc=True)
    )
    assert args == {
        "qom-type": "memory-backend-file",
        "id": "mem-dimm0",
        "mem-path": f"{SHM}/mem-dimm0",
        "size": 128 * MiB,
        "share": False,
        "prealloc": True,
    }


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: BackendOptions(hugetlb=True).properties(Backend.FILE), "memfd property"),
        (lambda: BackendOptions(share=False).properties(Backend.RAM), "memfd and file"),
        (lambda: BackendOptions(mem_dir=SHM).properties(Backend.MEMFD), "file only"),
        (lambda: VMSpec(numa=(NumaNodeSpec(256 * MiB),)), "sum to ram_size"),
        (
            lambda: VMSpec(ram_backend=Backend.MEMFD, numa=(NumaNodeSpec(512 * MiB),)),
            "nodes' backends",
        ),
        (lambda: VMSpec(ram_options=BackendOptions(share=False)), "no backend options"),
        (lambda: VMSpec(virtio_mem=(VirtioMemSpec(node=1),)), "node 1 does not exist"),
        (lambda: VMSpec(dimm_slots=1), "both slots and space"),
    ],
)
def test_specs_the_testbed_refuses(make: object, problem: str) -> None:
    assert callable(make)
    with pytest.raises(UsageError, match=problem):
        make()
