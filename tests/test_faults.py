"""Destination faults and load through a real mount: each fault fails the move back and the
writer (the guest's stand-in) sees no error; many concurrent fio jobs lose or tear nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.mounting import fusedisk, mounted
from tests.test_live_move import (
    MOVE_TIMEOUT,
    TERMINAL,
    Writer,
    assert_serving,
    image_pair,
    migrate,
    wait_status,
    writing,
)

pytestmark = pytest.mark.mount
MiB = 1 << 20


def _fails_back_under_a_writer(tmp_path: Path, dest: Path, fault: str) -> None:
    size = 16 * MiB
    source, model = image_pair(tmp_path, size)
    with mounted(source, tmp_path / "mnt") as m:
        with writing(Writer(m.file, model, seed=7, max_length=64 * 1024)) as writer:
            migrate(m, dest, "--rate", "2M")
            wait_status(m, lambda s: s["progress_bytes"] >= 2 * MiB, "the pass to get going")
            if fault == "deleted":
                dest.unlink()
            else:
                # A filesystem cannot be remounted read-only under a file open for writing
                # (EBUSY); an immutable file refuses writes through open descriptors alike.
                subprocess.run(["chattr", "+i", str(dest)], check=True)
            try:
                fusedisk("rate", m.mountpoint, "0")  # speed it up, if it has not failed yet
                status = m.wait_phase(*TERMINAL, timeout=MOVE_TIMEOUT)
                writer.wait_writes(writer.writes + 20)  # the writer goes on, on the source
            finally:
                subprocess.run(["chattr", "-i", str(dest)], capture_output=True)
        assert writer.errors == []
        assert status["phase"] == "failed", status
        assert status["image"] == str(source)
        assert_serving(m, model, source)
    if fault == "deleted":
        assert not dest.exists()
    else:  # an immutable file cannot be removed either: the fail-back says so
        assert "may remain" in status["error"] and str(dest) in status["error"], status


def test_destination_deleted_mid_copy_fails_back(tmp_path: Path) -> None:
    """An unlinked destination still accepts writes; it must never become the disk."""
    _fails_back_under_a_writer(tmp_path, tmp_path / "dst" / "moved.img", "deleted")


def test_destination_turning_read_only_mid_copy_fails_back(tmp_path: Path) -> None:
    _fails_back_under_a_writer(tmp_path, tmp_path / "dst" / "moved.img", "read-only")


def test_many_concurrent_fio_jobs_with_mixed_sizes_through_a_move(tmp_path: Path) -> None:
    """Four fio jobs, each on its own quarter of the disk, mixed request sizes, verifying."""
    size = 64 * MiB
    source, _ = image_pair(tmp_path, size)
    dest = tmp_path / "dst" / "moved.img"
    with mounted(source, tmp_path / "mnt") as m:
        fio = [
            "fio", f"--filename={m.file}", "--direct=1", "--ioengine=libaio", "--iodepth=8",
            "--verify_state_save=0", "--group_reporting",
            # Four writers, each on its own quarter, mixed sizes, each verifying what it wrote.
            "--name=writers", "--rw=randwrite", "--bssplit=4k/50:16k/20:64k/20:1m/10",
            "--numjobs=4", f"--size={size // 4}", f"--offset_increment={size // 4}",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--rate_iops=300",
            # And a reader over the whole disk at the same time.
            "--name=reader", "--rw=randread", "--bs=4k", "--numjobs=1", "--offset=0",
            f"--size={size}", "--offset_increment=0", "--rate_iops=500", "--time_based",
            "--runtime=6",
        ]  # fmt: skip
        with open(tmp_path / "fio.out", "wb") as log:
            load = subprocess.Popen(fio, stdout=log, stderr=log, cwd=tmp_path)
        try:
            migrate(m, dest, "--rate", "16M")
            status = m.wait_phase(*TERMINAL, timeout=MOVE_TIMEOUT)
            assert load.poll() is None, "fio ended before the move: nothing concurrent to test"
            assert load.wait(timeout=300) == 0, (tmp_path / "fio.out").read_text()
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        report = (tmp_path / "fio.out").read_text()
        assert "err= 0" in report and "verify:" not in report, report
        assert status["phase"] == "done" and status["mirrored_bytes"] > 0, status
        writers = fio[: fio.index("--name=reader")]
        verify = subprocess.run(
            [*writers, "--verify_only"], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert verify.returncode == 0 and "err= 0" in verify.stdout, verify.stdout
