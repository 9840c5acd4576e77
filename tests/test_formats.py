"""Container formats move like any file, while QEMU's own tools write and grow them (tier 4).

fusedisk treats images as opaque bytes (DESIGN.md); these tests check that it really does for raw,
qcow2, VHD (qemu's ``vpc``) and VHDX.  ``qemu-io`` writes through the mount with ``-t none``
(O_DIRECT, as a VM with cache=none would) at growing offsets, so a container allocates new
clusters or blocks at its end, and its file grows, while the move is mirroring.  The same writes
go to a reference image outside the mount; afterwards ``qemu-img compare`` must find the
destination identical to the reference, through the mount and on disk, and ``qemu-img check``
must find the destination's metadata sound (raw has none, and qemu cannot check ``vpc``).

As in test_live_move, the move runs at a low ``--rate`` while the writes happen (so it cannot end
before they do: at 16 KiB/s each 192 KiB extent of data holds the pass for 12 s), then
``fusedisk rate MOUNT 0`` releases it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Mounted, fusedisk, mounted

pytestmark = [pytest.mark.mount, pytest.mark.qemu]

MiB = 1 << 20
VIRTUAL_SIZE = 64 * MiB
WRITE_LENGTH = 192 * 1024
QEMU_TIMEOUT = 60.0
TERMINAL = ("done", "failed", "cancelled")
FORMATS = ["raw", "qcow2", "vpc", "vhdx"]


def run(*args: str | Path, timeout: float = QEMU_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def guest_write(fmt: str, image: Path, i: int) -> tuple[int, int]:
    """Write number ``i``: pattern i+1 at a new 2 MiB region each time, so containers grow."""
    offset, pattern = i * 2 * MiB + (i % 4) * 64 * 1024, i % 250 + 1
    result = run(
        "qemu-io",
        "-f",
        fmt,
        "-t",
        "none",
        "-c",
        f"write -P {pattern} {offset} {WRITE_LENGTH}",
        image,
    )
    assert result.returncode == 0 and "wrote" in result.stdout, result.stdout + result.stderr
    return offset, pattern


def grow(fmt: str, image: Path, size: int) -> None:
    """Grow a raw image (ftruncate through the mount: the engine's truncate while mirroring)."""
    result = run("qemu-img", "resize", "-f", fmt, image, str(size))
    assert result.returncode == 0, result.stdout + result.stderr


def compare(fmt: str, reference: Path, image: Path) -> None:
    result = run("qemu-img", "compare", "-f", fmt, "-F", fmt, reference, image)
    assert result.returncode == 0, (
        f"{image} differs from the reference: {result.stdout}{result.stderr}"
    )


def read_back(fmt: str, image: Path, writes: list[tuple[int, int]]) -> None:
    """Every write's pattern, read with qemu-io (O_DIRECT) from ``image``."""
    commands = [a for off, pat in writes for a in ("-c", f"read -P {pat} {off} {WRITE_LENGTH}")]
    result = run("qemu-io", "-r", "-f", fmt, "-t", "none", *commands, image)
    assert result.returncode == 0 and "verification failed" not in result.stdout, result.stdout


def wait_status(
    m: Mounted, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not condition(status := m.status()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {status}"
        assert m.daemon.poll() is None, m.log.read_text()
        time.sleep(0.02)
    return status


@pytest.mark.parametrize("fmt", FORMATS)
def test_container_grows_while_it_moves(tmp_path: Path, fmt: str) -> None:
    for name in ("src", "dst", "ref"):
        (tmp_path / name).mkdir()
    source = tmp_path / "src" / f"disk.{fmt}"
    dest = tmp_path / "dst" / f"disk.{fmt}"
    reference = tmp_path / "ref" / f"disk.{fmt}"
    for image in (source, reference):
        result = run("qemu-img", "create", "-q", "-f", fmt, image, str(VIRTUAL_SIZE))
        assert result.returncode == 0, result.stderr
    writes: list[tuple[int, int]] = []

    def write(i: int, through: Path) -> None:
        writes.append(guest_write(fmt, through, i))
        guest_write(fmt, reference, i)

    with mounted(source, tmp_path / "mnt") as m:
        for i in range(6):  # a container with some data before the move
            write(i, m.file)

        result = fusedisk("migrate", m.mountpoint, dest, "--rate", "16K", "--detach", "--json")
        assert result.returncode == 0, result.stderr
        started = json.loads(result.stdout)
        assert started["phase"] == "mirroring", started
        for i in range(6, 18):  # while mirroring, each at a new region: the container grows
            write(i, m.file)
        if fmt == "raw":  # a raw disk grows only when resized: do that while mirroring too
            grow(fmt, m.file, VIRTUAL_SIZE + 16 * MiB)
            grow(fmt, reference, VIRTUAL_SIZE + 16 * MiB)
            write(VIRTUAL_SIZE // (2 * MiB) + 2, m.file)
        during = m.status()
        assert during["phase"] == "mirroring", "the writes did not overlap the move"
        assert during["total_bytes"] > started["total_bytes"], "the image did not grow"
        assert during["mirrored_bytes"] >= 12 * WRITE_LENGTH, during

        rated = fusedisk("rate", m.mountpoint, "0")
        assert rated.returncode == 0, rated.stderr
        status = m.wait_phase(*TERMINAL, timeout=QEMU_TIMEOUT)
        assert status["phase"] == "done" and status["error"] is None, status
        assert status["image"] == str(dest), status
        assert not source.exists()
        for i in range(18, 21):  # on the destination alone
            write(i, m.file)

        read_back(fmt, m.file, writes)
        compare(fmt, reference, m.file)
        assert (
            status["copied_bytes"] + status["synced_by_writes_bytes"] + status["hole_bytes"]
            >= during["total_bytes"]
        ), status

    compare(fmt, reference, dest)
    read_back(fmt, dest, writes)
    if fmt == "vpc":  # qemu-img has no check for vpc (exit 63): the header must still parse
        info = run("qemu-img", "info", "--output=json", "-f", fmt, dest)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] >= VIRTUAL_SIZE
    elif fmt != "raw":
        check = run("qemu-img", "check", "-f", fmt, dest)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "No errors were found" in check.stdout, check.stdout
