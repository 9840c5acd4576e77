"""A real QEMU guest (TCG) whose disk is the fusedisk file, running fio with verification while
the disk is live-moved under it.  Slow (a boot each): marked ``guest``."""

from __future__ import annotations

import importlib.util
import os
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
    # The move must overlap the guest's writes: wait until they reach the daemon (a fixed
    # sleep was too short under TCG on a busy machine: the move ended before the first write).
    deadline = time.monotonic() + 120
    while not mount.status()["requests"].get("write"):
        assert time.monotonic() < deadline, "the guest's writes never reached the daemon"
        time.sleep(0.2)
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


# ---- thin disks: the guest's discards reach the image (issue 10) -----------------------------

THIN_MIB = 64
# Fills the disk, writes two regions fio can verify later (16-48 and 56-64 MiB), then discards
# 8-16 MiB at step "filled", and 0-8 and 48-56 MiB at step "moving" (the host starts a move
# in between), flushes (rewriting one kept block with conv=fsync: QEMU then writes a
# container's metadata out, and from here on the guest only reads), then verifies the two
# regions, which no discard touched.
THIN_SCRIPT = """
W="$FIO --filename=/dev/vda --rw=write --bs=1M --ioengine=libaio --direct=1 --iodepth=4"
V="--verify=crc32c --verify_fatal=1"
KEPT="--name=c --offset=16M --size=32M --name=e --offset=56M --size=8M"
$W --name=fill --size=64M --output=/tmp/fill.json
$W $V --do_verify=0 $KEPT --output=/tmp/write.json
step filled
blkdiscard -o $((8 << 20)) -l $((8 << 20)) /dev/vda
step idle-discarded
blkdiscard -o 0 -l $((8 << 20)) /dev/vda
blkdiscard -o $((48 << 20)) -l $((8 << 20)) /dev/vda
dd if=/dev/vda of=/dev/vda bs=4096 count=1 skip=4096 seek=4096 conv=notrunc,fsync 2>/dev/null
step move-discarded
$W $V --verify_only $KEPT --output=/tmp/fio.json
"""


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _first_data(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


def _thin_guest(
    module: ModuleType, image: Any, mount: Mounted, tmp_path: Path, fmt: str = "raw"
) -> Any:
    """A guest running THIN_SCRIPT on the mounted disk, discards passed on (discard=unmap)."""
    return module.start_fio(
        mount.file,
        [],
        fmt=fmt,
        script=THIN_SCRIPT,
        drive_options="discard=unmap",
        guest=image,
        console_log=tmp_path / "console.log",
    )


def _move_to(mount: Mounted, dest: Path, progress: int, *extra: str) -> None:
    """Start a slow move and return once it has copied ``progress`` bytes."""
    started = fusedisk("migrate", mount.mountpoint, dest, "--rate", "8M", "--detach", *extra)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 120
    while mount.status()["progress_bytes"] < progress:
        assert time.monotonic() < deadline, mount.status()
        time.sleep(0.05)


def _check_verified(result: Any) -> None:
    assert result.ok, f"guest script failed (status {result.status}):\n{result.console[-3000:]}"
    jobs = result.fio["jobs"]
    assert [job["error"] for job in jobs] == [0, 0]
    assert sum(job["read"]["io_bytes"] for job in jobs) == 40 << 20  # all kept data verified


def test_guest_discards_thin_the_image_idle_and_during_a_move(
    guest: tuple[ModuleType, Any], tmp_path: Path
) -> None:
    """The guest's blkdiscard (virtio-blk, QEMU discard=unmap) punches holes in the backing
    file through the mount; during a move in the destination too, behind the copier, and
    ahead of it the copier finds holes and copies nothing."""
    module, image = guest
    disk = tmp_path / "vm.img"
    with open(disk, "wb") as f:
        f.truncate(THIN_MIB << 20)  # sparse: the guest fills it
    dest = tmp_path / "moved.img"
    with mounted(disk, tmp_path / "mnt") as mount:
        with _thin_guest(module, image, mount, tmp_path) as run:
            run.wait_step("filled", 300)
            filled = _allocated(disk)
            assert filled >= THIN_MIB << 20
            run.resume()
            run.wait_step("idle-discarded", 120)
            assert mount.status()["phase"] == "idle"
            assert filled - _allocated(disk) >= 8 << 20, "an idle discard freed nothing"
            _move_to(mount, dest, progress=16 << 20)
            run.resume()
            run.wait_step("move-discarded", 120)
            status = mount.status()
            assert status["phase"] == "mirroring", "the discards did not fall in the move"
            assert status["discarded_bytes"] == 16 << 20
            assert _first_data(dest) == 16 << 20  # 0-8 MiB, copied before, freed again
            assert fusedisk("rate", mount.mountpoint, "0").returncode == 0
            run.resume()
            result = run.wait()
        _check_verified(result)
        status = mount.wait_phase("done", "failed")
        assert status["phase"] == "done", status["error"]
    # 24 of the 64 MiB were discarded: the destination holds the 40 MiB left, no more.
    assert 39 << 20 <= _allocated(dest) <= 41 << 20
    with open(dest, "rb") as moved:
        for start in (0, 8 << 20, 48 << 20):
            assert os.pread(moved.fileno(), 8 << 20, start) == bytes(8 << 20)


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_guest_discarding_on_a_container_keeps_it_consistent_across_a_move(
    guest: tuple[ModuleType, Any], tmp_path: Path, fmt: str
) -> None:
    """qcow2 and vhdx under a guest that discards while the image moves: the guest's data
    verifies, ``qemu-img check`` finds the moved image consistent, and it holds what the source
    (kept, and written no more after the guest's last step) holds.  (QEMU's qcow2 frees the
    clusters and punches the file, so discards reach fusedisk; its vhdx ignores discards.)"""
    module, image = guest
    disk = tmp_path / f"vm.{fmt}"
    created = subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(disk), f"{THIN_MIB}M"], capture_output=True
    )
    assert created.returncode == 0, created.stderr
    dest = tmp_path / f"moved.{fmt}"
    with mounted(disk, tmp_path / "mnt") as mount:
        with _thin_guest(module, image, mount, tmp_path, fmt) as run:
            run.wait_step("filled", 300)
            _move_to(mount, dest, 16 << 20, "--keep-source")
            run.resume()
            run.wait_step("idle-discarded", 120)  # (not idle here: the move runs)
            run.resume()
            run.wait_step("move-discarded", 120)
            status = mount.status()
            assert status["phase"] == "mirroring", "the discards did not fall in the move"
            if fmt == "qcow2":
                assert status["discarded_bytes"] > 0
            assert fusedisk("rate", mount.mountpoint, "0").returncode == 0
            run.resume()
            result = run.wait()
        _check_verified(result)
        status = mount.wait_phase("done", "failed")
        assert status["phase"] == "done", status["error"]
    check = subprocess.run(["qemu-img", "check", "-f", fmt, str(dest)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", fmt, str(disk), str(dest)],
        capture_output=True,
        text=True,
    )
    assert "Images are identical." in compare.stdout, compare.stdout + compare.stderr
