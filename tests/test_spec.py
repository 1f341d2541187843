"""The dump specification's rules and the one size parser: pure tests, plus the CLI refusing
before it connects to anything (the QMP path does not exist, so exit 2 proves no connection
was tried: a connection attempt would exit 21)."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpdump.cli.dump_command import _size
from qmpdump.engines.spec import DumpFormat, DumpSpec, EngineName, Mode
from qmpdump.errors import UsageError
from qmpdump.service.config import Retention
from qmpdump.sizes import format_size, parse_size

from .clirun import run_cli


def test_live_is_never_handed_to_qemu() -> None:
    with pytest.raises(UsageError, match="stops the VM: live mode needs engine backend or auto"):
        DumpSpec.checked(engine="qemu", mode="live")
    # auto in live mode may only ever pick an engine that honours it
    live = DumpSpec(mode=Mode.LIVE)
    assert [t.name for t in live.candidates()] == [EngineName.BACKEND]
    # a format only QEMU writes, in live mode: no engine can, so the spec refuses
    with pytest.raises(UsageError, match="no engine can make this dump"):
        DumpSpec.checked(format="win-dmp", mode="live")
    # kdump: the backend writes it too (its own writer), so a live kdump-zlib is the backend's
    kdump = DumpSpec(format=DumpFormat.KDUMP_ZLIB, mode=Mode.LIVE)
    assert [t.name for t in kdump.candidates()] == [EngineName.BACKEND]
    # and only the backend writes zstd, or picks a codec itself
    for fmt in (DumpFormat.KDUMP_ZSTD, DumpFormat.KDUMP):
        assert [t.name for t in DumpSpec(format=fmt).candidates()] == [EngineName.BACKEND]
    with pytest.raises(UsageError, match="does not write 'kdump-zstd'"):
        DumpSpec.checked(engine="qemu", format="kdump-zstd")


def test_options_belong_to_their_engine() -> None:
    with pytest.raises(UsageError, match="--zero-pages is not for QEMU"):
        DumpSpec.checked(engine="qemu", zero_pages=True)
    with pytest.raises(UsageError, match="--paging is not for the backend engine"):
        DumpSpec.checked(engine="backend", paging=True)
    with pytest.raises(UsageError, match="does not write 'win-dmp'"):
        DumpSpec.checked(engine="backend", format="win-dmp")
    with pytest.raises(UsageError, match="--kdump-zero-pages is for qmpdump's own kdump"):
        DumpSpec.checked(kdump_zero_pages="shared")
    with pytest.raises(UsageError, match="--zero-pages is for the elf format only"):
        DumpSpec.checked(format="kdump-lzo", zero_pages=True)
    # auto with a QEMU-only option leaves QEMU as the only candidate
    ranged = DumpSpec(begin=0, length=4096)
    assert [t.name for t in ranged.candidates()] == [EngineName.QEMU]
    with pytest.raises(UsageError, match="begin and length go together"):
        DumpSpec.checked(begin=0)
    with pytest.raises(UsageError, match="for the kdump formats only"):
        DumpSpec.checked(seekable=True)


def test_every_format_has_an_engine_and_an_extension() -> None:
    for fmt in DumpFormat:
        assert DumpSpec(format=fmt).candidates(), fmt
        assert fmt.extension in ("elf", "kdump", "dmp")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--engine", "qemu", "--live"], "live mode needs engine backend or auto"),
        (["--format", "win-dmp", "--live"], "no engine can make this dump"),
        (["--engine", "backend", "--format", "win-dmp"], "does not write 'win-dmp'"),
        (["--engine", "qemu", "--format", "kdump-zstd"], "does not write 'kdump-zstd'"),
        (["--engine", "qemu", "--zero-pages"], "--zero-pages is not for QEMU"),
    ],
)
async def test_cli_refuses_before_connecting(args: list[str], words: str) -> None:
    code, out, err = await run_cli(
        "dump", "--qmp", "/nonexistent/qmp.sock", "-o", "/nonexistent/x.elf", *args
    )
    assert (code, out) == (2, "")
    assert words in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("1MB", 10**6),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("1.5GiB", 3 << 29),
        ("2 kb", 2000),
        ("10GB", 10 * 10**9),
        ("1T", 1 << 40),
    ],
)
def test_sizes_read_the_same_in_the_cli_and_the_config(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert _size(text) == size  # dump --begin/--length
    assert Retention.model_validate({"keep_bytes": text}).keep_bytes == size


@pytest.mark.parametrize("text", ["", "MB", "1.5", "1 XB", "-1", "0x", "1e6"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)
    with pytest.raises(argparse.ArgumentTypeError):
        _size(text)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_reads_back_close(n: int) -> None:
    """The formatter writes binary units the parser reads back, within its rounding (0.05 of
    the unit)."""
    back = parse_size(format_size(n).replace(" ", ""))
    unit = 1 << (10 * max(0, (n.bit_length() - 1) // 10)) if n else 1
    assert abs(back - n) <= unit // 20 + 1
