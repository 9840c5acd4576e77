"""Every request is the guest's (DESIGN.md): one FUSE request per guest read or write.

The daemon counts the requests it serves by operation.  fio does the guest's I/O (O_DIRECT,
queue depth 16, as QEMU with cache=none); the counts are read through the control socket
directly, which touches nothing in the mount, so the differences are exactly what the kernel
sent for fio's I/O.  A getxattr handler (the old status xattrs) made the kernel ask
GETXATTR("security.capability") before every WRITE: these tests fail if anything like it returns.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from fusedisk.control import ask
from tests.mounting import Mounted, fusedisk, mounted, random_image

pytestmark = pytest.mark.mount

BLOCK = 4096
IMAGE_SIZE = 16 << 20
OTHERS = 12  # other requests allowed in all: opening and closing the file twice, a handful each
# Long enough to outlast a one-second attribute timeout: when one expires under concurrent reads
# the kernel sends a storm of GETATTRs (fs.ATTR_TIMEOUT).
SECONDS = 2.5


def requests(control: str) -> Counter[str]:
    return Counter(ask(control, {"command": "status"})["requests"])


def fio(file: Path, rw: str) -> int:
    """4 KiB O_DIRECT random I/O at queue depth 16, as a guest with cache=none does; returns
    how many I/Os fio completed."""
    result = subprocess.run(
        [
            "fio",
            "--name=guest",
            f"--filename={file}",
            f"--rw={rw}",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            f"--runtime={SECONDS}",
            "--time_based",
            f"--size={IMAGE_SIZE}",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job = json.loads(result.stdout)["jobs"][0]
    done: int = job["read"]["total_ios"] + job["write"]["total_ios"]
    assert done > 1000, f"fio did too little to tell: {done}"
    return done


def assert_one_request_per_io(mount: Mounted) -> None:
    control = mount.status()["control"]  # found once; from here on only the socket is asked
    before = requests(control)
    writes = fio(mount.file, "randwrite")
    reads = fio(mount.file, "randread")
    sent = requests(control) - before
    assert sent["write"] == writes, sent
    assert sent["read"] == reads, sent
    others = {op: n for op, n in sent.items() if op not in ("read", "write")}
    assert sum(others.values()) <= OTHERS, f"requests beyond the guest's I/O: {others}"
    assert sent["getxattr"] <= 1, f"the kernel asks getxattr before writes: {others}"


def test_one_request_per_read_and_write_idle(tmp_path: Path) -> None:
    random_image(tmp_path / "disk.img", IMAGE_SIZE, seed=5)
    with mounted(tmp_path / "disk.img", tmp_path / "mnt") as m:
        assert_one_request_per_io(m)


def test_one_request_per_read_and_write_during_a_move(tmp_path: Path) -> None:
    """Mirrored writes go to two files, but the guest still pays one request each."""
    random_image(tmp_path / "disk.img", IMAGE_SIZE, seed=6)
    (tmp_path / "dst").mkdir()
    with mounted(tmp_path / "disk.img", tmp_path / "mnt") as m:
        # Slow enough that the move is still mirroring when the I/O is done.
        started = fusedisk(
            "migrate", m.mountpoint, tmp_path / "dst" / "disk.img", "--rate", "64K", "--detach"
        )
        assert started.returncode == 0, started.stderr
        assert_one_request_per_io(m)
        status = m.status()
        assert status["phase"] == "mirroring", status
        assert status["mirrored_bytes"] >= 1000 * BLOCK, "the writes were not mirrored"
        cancelled = fusedisk("cancel", m.mountpoint)
        assert cancelled.returncode == 0, cancelled.stderr
