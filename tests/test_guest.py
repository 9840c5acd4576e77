"""A real QEMU guest (TCG) whose disk is the fusedisk file, running fio with verification while
the disk is live-moved under it.  Slow (a boot each): marked ``guest``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.mounting import Mounted, fusedisk, mounted

pytestmark = [pytest.mark.guest, pytest.mark.mount]

DISK_MIB = 96
# Writes every block of the disk once, then reads all back and checks each (crc32c).
FIO_ARGS = [
    "--name=guest",
    "--filename=/dev/vda",
    "--rw=randwrite",
    "--bs=4k",
    "--ioengine=libaio",
    "--direct=1",
    "--iodepth=16",
    f"--size={DISK_MIB}M",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
]


def _load_guest_module() -> ModuleType:
    path = Path(__file__).parent.parent / "scripts" / "guest.py"
    spec = importlib.util.spec_from_file_location("fusedisk_guest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def guest() -> tuple[ModuleType, Any]:
    module = _load_guest_module()
    return module, module.build_guest()


def _check_fio(result: Any) -> None:
    assert result.ok, f"guest fio failed (status {result.status}):\n{result.console[-3000:]}"
    job = result.fio["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == DISK_MIB << 20  # every block written ...
    assert job["read"]["io_bytes"] == DISK_MIB << 20  # ... and read back and verified


def _migrate_while_writing(
    mount: Mounted, run: Any, dest: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """Start a move once fio runs in the guest; return the finished migrate command, having
    checked that the guest wrote during the move (its status counts the writes mirrored)."""
    assert run.wait_started(180), "fio never started in the guest"
    time.sleep(1.0)  # let the guest's writes get going: the move must overlap them
    result = fusedisk("migrate", mount.mountpoint, dest, *extra, timeout=300)
    assert run.poll() is None, "the guest finished before the move did: no overlap to test"
    if result.returncode == 0:
        _check_overlap(mount)
    return result


def _check_overlap(mount: Mounted) -> None:
    """The move that just ended mirrored guest writes: they overlapped it."""
    status = mount.status()
    assert status["mirrored_bytes"] > 0, f"no guest write during the move: {status}"


@pytest.fixture
def raw_mount(tmp_path: Path) -> Iterator[Mounted]:
    image = tmp_path / "src" / "vm.img"
    image.parent.mkdir()
    image.write_bytes(bytes(DISK_MIB << 20))  # allocated: the pass has every block to copy
    with mounted(image, tmp_path / "mnt") as m:
        yield m


def test_guest_verifies_its_writes_across_a_live_move(
    guest: tuple[ModuleType, Any], raw_mount: Mounted, tmp_path: Path
) -> None:
    module, image = guest
    dest = tmp_path / "dst.img"
    with module.start_fio(
        raw_mount.file, FIO_ARGS, guest=image, console_log=tmp_path / "console.log"
    ) as run:
        moved = _migrate_while_writing(raw_mount, run, dest)
        assert moved.returncode == 0, moved.stderr
        result = run.wait()
    _check_fio(result)
    status = raw_mount.status()
    assert status["phase"] == "done" and status["image"] == str(dest)
    assert status["mirrored_bytes"] > 0  # the guest really wrote during the move
    assert not raw_mount.image.exists()


def test_guest_sees_no_error_when_the_destination_fills_up(
    guest: tuple[ModuleType, Any], raw_mount: Mounted, tmp_path: Path
) -> None:
    module, image = guest
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128M", "tmpfs", str(small)], check=True)
    try:
        with module.start_fio(
            raw_mount.file, FIO_ARGS, guest=image, console_log=tmp_path / "console.log"
        ) as run:
            assert run.wait_started(180)
            dest = small / "dst.img"
            started = fusedisk("migrate", raw_mount.mountpoint, dest, "--rate", "8M", "--detach")
            assert started.returncode == 0, started.stderr
            deadline = time.monotonic() + 60
            while raw_mount.status()["progress_bytes"] < 16 << 20:
                assert time.monotonic() < deadline, raw_mount.status()
                time.sleep(0.1)
            # Something else fills the destination's filesystem in the middle of the pass.
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={small / 'filler'}", "bs=1M"], capture_output=True
            )
            status = raw_mount.wait_phase("failed", "done", timeout=120)
            assert run.poll() is None, "the guest finished before the move failed"
            result = run.wait()
        _check_fio(result)  # the guest saw no error at all
        assert status["phase"] == "failed" and status["image"] == str(raw_mount.image)
        assert "No space" in status["error"]
        assert not dest.exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_guest_qcow2_disk_moves(guest: tuple[ModuleType, Any], tmp_path: Path) -> None:
    module, image = guest
    qcow2 = tmp_path / "vm.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), f"{DISK_MIB}M"], check=True
    )
    dest = tmp_path / "moved.qcow2"
    with mounted(qcow2, tmp_path / "mnt") as mount:
        with module.start_fio(
            mount.file, FIO_ARGS, fmt="qcow2", guest=image, console_log=tmp_path / "c.log"
        ) as run:
            moved = _migrate_while_writing(mount, run, dest)
            assert moved.returncode == 0, moved.stderr
            result = run.wait()
        _check_fio(result)
        assert mount.status()["size"] > 1 << 20  # the container grew while it moved
    check = subprocess.run(["qemu-img", "check", str(dest)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_guest_keeps_running_across_two_moves(
    guest: tuple[ModuleType, Any], raw_mount: Mounted, tmp_path: Path
) -> None:
    module, image = guest
    there, back = tmp_path / "there.img", raw_mount.image
    with module.start_fio(
        raw_mount.file, FIO_ARGS, guest=image, console_log=tmp_path / "console.log"
    ) as run:
        first = _migrate_while_writing(raw_mount, run, there)
        assert first.returncode == 0, first.stderr
        second = fusedisk("migrate", raw_mount.mountpoint, back, timeout=300)
        assert second.returncode == 0, second.stderr
        assert run.poll() is None, "the guest finished before the second move did"
        _check_overlap(raw_mount)
        result = run.wait()
    _check_fio(result)
    status = raw_mount.status()
    assert status["image"] == str(back) and not there.exists()
