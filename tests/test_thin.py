"""Thin disks through a real mount (issue 10): discard, write zeroes and SEEK_DATA/SEEK_HOLE.

Real tools only: util-linux's ``fallocate -p``/``-z``, ``qemu-img map``, ``cp --sparse=always``,
and the backing file's st_blocks as ``du`` reads them.  The daemon runs with the pyfuse3 that
``scripts/setup`` built (pyfuse3-patch/); one test serves with the stock pyfuse3 3.5.0 wheel
setup also keeps, and checks the mount behaves exactly as it did before the patch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusedisk.control import ask
from tests.mounting import Mounted, fusedisk, mounted
from tests.test_live_move import tmpfs

pytestmark = pytest.mark.mount

MiB = 1 << 20
STOCK_WHEELS = Path(__file__).parent.parent / ".venv" / "stock-pyfuse3"


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False
    )


def sparse_image(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 0) -> bytes:
    """An image of ``size`` bytes holding random data in ``extents`` (offset, length) and holes
    elsewhere; returns its content."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            data = rng.randbytes(length)
            content[offset : offset + length] = data
            f.seek(offset)
            f.write(data)
    return bytes(content)


def extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each data extent, found with SEEK_DATA/SEEK_HOLE as backup tools do."""
    found = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, size = 0, os.fstat(fd).st_size
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, offset))
    finally:
        os.close(fd)
    return found


def requests(m: Mounted) -> dict[str, int]:
    return dict(ask(m.status()["control"], {"command": "status"})["requests"])


@pytest.fixture
def data_image(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    image = tmp_path / "disk.img"
    content = random.Random(5).randbytes(32 * MiB)
    image.write_bytes(content)
    yield image, content


def test_punch_and_zero_through_the_mount_free_and_zero_the_backing_file(
    data_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    image, content = data_image
    model = bytearray(content)
    with mounted(image, tmp_path / "mnt") as m:
        status = m.status()
        assert status["capabilities"] == ["fallocate", "lseek"]
        before = allocated(image)
        assert before >= 32 * MiB
        punched = run("fallocate", "-p", "-o", str(4 * MiB), "-l", str(8 * MiB), m.file)
        assert punched.returncode == 0, punched.stderr
        model[4 * MiB : 12 * MiB] = bytes(8 * MiB)
        assert before - allocated(image) >= 8 * MiB  # the backing file gave the space back
        assert allocated(m.file) == allocated(image)  # and du through the mount says so
        zeroed = run("fallocate", "-z", "-o", str(20 * MiB + 100), "-l", str(MiB), m.file)
        assert zeroed.returncode == 0, zeroed.stderr
        model[20 * MiB + 100 : 21 * MiB + 100] = bytes(MiB)
        assert m.file.read_bytes() == model  # through the kernel's cache, which was dropped
        assert extents(m.file) == extents(image) == [(0, 4 * MiB), (12 * MiB, 32 * MiB)]
        assert requests(m)["fallocate"] == 2
        assert os.path.getsize(m.file) == 32 * MiB
        human = fusedisk("status", m.mountpoint)
        assert "capabilities: fallocate (discard, write zeroes, preallocation), lseek" in (
            human.stdout
        )
    assert image.read_bytes() == model


def test_qemu_img_map_through_the_mount_shows_the_backing_files_extents(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    sparse_image(image, 64 * MiB, [(MiB, 3 * MiB), (20 * MiB, 64 * 1024), (63 * MiB, MiB)])
    with mounted(image, tmp_path / "mnt") as m:
        through = run("qemu-img", "map", "--output=json", "-f", "raw", m.file)
        assert through.returncode == 0, through.stderr
        direct = run("qemu-img", "map", "--output=json", "-f", "raw", image)
        assert json.loads(through.stdout) == json.loads(direct.stdout)
        data = [e for e in json.loads(through.stdout) if e["data"]]
        assert [(e["start"], e["length"]) for e in data] == [
            (MiB, 3 * MiB),
            (20 * MiB, 64 * 1024),
            (63 * MiB, MiB),
        ]


def test_cp_sparse_out_of_the_mount_reads_only_the_data(tmp_path: Path) -> None:
    """cp finds the data with SEEK_DATA and reads nothing else: the copy is sparse, and the
    daemon serves reads for the 2 MiB of data only, not the 64 MiB of the disk."""
    image = tmp_path / "disk.img"
    content = sparse_image(image, 64 * MiB, [(8 * MiB, MiB), (40 * MiB, MiB)])
    with mounted(image, tmp_path / "mnt") as m:
        reads = requests(m).get("read", 0)
        copy = tmp_path / "copy.img"
        copied = run("cp", "--sparse=always", m.file, copy)
        assert copied.returncode == 0, copied.stderr
        served = requests(m).get("read", 0) - reads
        assert served <= 2 * MiB // (128 * 1024) + 8, f"{served} read requests"
    assert copy.read_bytes() == content
    assert allocated(copy) <= 2 * MiB + 64 * 1024


def test_a_mode_the_backing_filesystem_refuses_returns_its_errno(tmp_path: Path) -> None:
    """tmpfs punches holes but has no ZERO_RANGE: ``fallocate -z`` through the mount fails with
    its EOPNOTSUPP, logged as no error, and the disk serves on."""
    with tmpfs(tmp_path / "tmpfs", "size=64M") as fs:
        image = fs / "disk.img"
        image.write_bytes(random.Random(6).randbytes(8 * MiB))
        with mounted(image, tmp_path / "mnt") as m:
            zeroed = run("fallocate", "-z", "-o", "0", "-l", str(MiB), m.file)
            assert zeroed.returncode != 0
            assert "Operation not supported" in zeroed.stderr, zeroed.stderr
            punched = run("fallocate", "-p", "-o", "0", "-l", str(MiB), m.file)
            assert punched.returncode == 0, punched.stderr
            assert m.file.read_bytes()[: 2 * MiB] == bytes(MiB) + image.read_bytes()[MiB : 2 * MiB]
            assert m.status()["io_error"] is None
        log = m.log.read_text()
        assert "ERROR" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("dest_timeout", ["0", "1"], ids=["inline", "writer-process"])
def test_a_discard_during_a_move_frees_space_on_both_files(
    data_image: tuple[Path, bytes], tmp_path: Path, dest_timeout: str
) -> None:
    """Discards behind the copier (already copied: the destination frees it too) and ahead of
    it (the copier finds holes and copies nothing there): the destination ends as thin as the
    source, with the same bytes.  With a deadline the destination's discards run in the writer
    process, as its writes do."""
    image, content = data_image
    model = bytearray(content)
    dest = tmp_path / "moved.img"
    with mounted(image, tmp_path / "mnt") as m:
        started = fusedisk(
            "migrate",
            m.mountpoint,
            dest,
            "--rate",
            "4M",
            "--detach",
            "--dest-timeout",
            dest_timeout,
        )
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 60
        while m.status()["progress_bytes"] < 12 * MiB:
            assert time.monotonic() < deadline, m.status()
            time.sleep(0.05)
        start, end = extents(dest)[0]
        assert start == 0 and end >= 12 * MiB  # copied so far
        for offset in (0, 24 * MiB):  # behind the copier, and ahead of it
            punched = run("fallocate", "-p", "-o", str(offset), "-l", str(8 * MiB), m.file)
            assert punched.returncode == 0, punched.stderr
            model[offset : offset + 8 * MiB] = bytes(8 * MiB)
        assert m.status()["phase"] == "mirroring", "the move ended before the discards"
        assert extents(dest)[0][0] == 8 * MiB  # freed on the destination too
        assert fusedisk("rate", m.mountpoint, "0").returncode == 0
        status = m.wait_phase("done", "failed")
        assert status["phase"] == "done", status["error"]
        assert status["discarded_bytes"] == 16 * MiB
        # The range ahead was never copied: in sync by the map, or a hole the copier found.
        assert status["synced_by_writes_bytes"] + status["hole_bytes"] >= 8 * MiB
        assert m.file.read_bytes() == model
    assert dest.read_bytes() == model
    assert 15 * MiB <= allocated(dest) <= 17 * MiB


def test_the_stock_pyfuse3_serves_as_before(data_image: tuple[Path, bytes], tmp_path: Path) -> None:
    """With pyfuse3 3.5.0 as PyPI has it (no fallocate or lseek handler): no capability is
    claimed, discard fails as it always did (EOPNOTSUPP, from the kernel), the file reads as
    all data, and reads, writes and moves work."""
    wheels = sorted(STOCK_WHEELS.glob("pyfuse3-3.5.0-*.whl"))
    assert wheels, f"no stock pyfuse3 wheel in {STOCK_WHEELS}: run scripts/setup"
    stock = tmp_path / "stock"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    installed = subprocess.run(
        [*pip, "--target", str(stock), str(wheels[-1])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    path = [str(stock), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    image, content = data_image
    with mounted(image, tmp_path / "mnt", env=env) as m:
        status = m.status()
        assert status["capabilities"] == [], "not the stock pyfuse3, or a capability claimed"
        punched = run("fallocate", "-p", "-o", "0", "-l", str(MiB), m.file)
        # util-linux words EOPNOTSUPP for -p as "keep size mode is unsupported".
        assert punched.returncode != 0 and "unsupported" in punched.stderr, punched.stderr
        assert extents(m.file) == [(0, 32 * MiB)]
        fd = os.open(m.file, os.O_RDWR)
        try:
            os.pwrite(fd, b"still served", 5)
        finally:
            os.close(fd)
        assert "no discard, no SEEK_DATA/SEEK_HOLE" in fusedisk("status", m.mountpoint).stdout
        assert requests(m).get("fallocate", 0) == 0
    assert image.read_bytes() == content[:5] + b"still served" + content[17:]
