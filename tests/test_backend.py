"""PosixFile's write from the event loop's thread, which keeps the GIL through its syscall."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from fusedisk import backend
from fusedisk.backend import PosixFile


@pytest.fixture
def image(tmp_path: Path) -> PosixFile:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 << 10))
    return PosixFile.open(str(path))


def test_it_keeps_the_gil() -> None:
    # ctypes drops the GIL around a foreign call unless the function is a PyDLL's.
    function = backend.pwrite_keeping_gil
    assert function is not None
    assert function._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_the_bytes_land_where_asked(image: PosixFile, kind: type) -> None:
    data = os.urandom(4096 + 17)
    image.pwrite_from_loop(kind(data), 8192 + 5)
    assert os.pread(image.fd, len(data) + 2, 8192 + 4) == b"\0" + data + b"\0"


def test_a_short_write_is_completed_and_an_interrupted_one_retried(
    image: PosixFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def flaky(fd: int, data: bytes, size: int, offset: int) -> int:
        calls.append(size)
        if len(calls) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return os.pwrite(fd, data[:100], offset)  # short

    monkeypatch.setattr(backend, "pwrite_keeping_gil", flaky)
    data = os.urandom(4096)
    image.pwrite_from_loop(data, 0)
    assert calls == [4096, 4096]
    assert os.pread(image.fd, 4096, 0) == data


def test_an_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    readonly = PosixFile(str(path), os.open(path, os.O_RDONLY))
    with pytest.raises(OSError) as failed:
        readonly.pwrite_from_loop(b"x" * 512, 0)
    assert failed.value.errno == errno.EBADF
    assert failed.value.filename == str(path)
