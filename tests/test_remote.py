"""Moves to a real network destination: sshfs from a private sshd on 127.0.0.1 (tests/remote.py).

A guest stand-in writes (O_DIRECT, fsync every few writes) through a real fusedisk mount while
its disk moves to the remote; the remote is then stopped (SIGSTOP of its sshd session, as a
stalled network or server) or killed.  The promise checked each time: the destination costs the
move, never the disk.  The writer sees no error and waits at most the deadline (plus scheduling
slack) for any write or fsync; the move fails back and says why; the source serves on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mounted, fusedisk, mounted
from tests.remote import Remote, private_sshd, sshfs_mount
from tests.test_live_move import (
    SLOW,
    TERMINAL,
    MiB,
    Writer,
    assert_serving,
    finish,
    image_pair,
    migrate,
    read_direct,
    wait_status,
    wait_until,
    writing,
)

pytestmark = pytest.mark.mount

DEADLINE = 1.0  # fusedisk's default --dest-timeout
SLACK = 1.0  # scheduling on a busy 2-core machine, on top of the deadline
SIZE = 16 * MiB


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    with (
        private_sshd(tmp_path / "sshd") as sshd,
        sshfs_mount(sshd, tmp_path / "served", tmp_path / "remote") as mount,
    ):
        yield mount


def guest(m: Mounted, model: bytearray, seed: int) -> Writer:
    return Writer(m.file, model, seed=seed, direct=True, max_length=64 * 1024, fsync_every=4)


def test_a_move_to_a_remote_under_a_writer_completes(tmp_path: Path, remote: Remote) -> None:
    source, model = image_pair(tmp_path, SIZE)
    dest = remote.mountpoint / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        with writing(guest(m, model, seed=1)) as writer:
            migrate(m, dest, "--rate", SLOW)
            writer.wait_writes(40)
            status = finish(m)
            writer.wait_writes(writer.writes + 20)  # now on the remote alone
        assert writer.errors == []
        assert status["phase"] == "done", status
        assert status["dest_timeout"] == DEADLINE, "every destination gets the deadline"
        # sshfs queues written data until a flush: the copier flushes as it goes.
        assert (status["dest_writes"], status["flush_while_copying"]) == ("native thread", True)
        assert status["mirrored_bytes"] > 0, "no write overlapped the move"
        assert status["image"] == str(dest) and not source.exists()
        assert_serving(m, model, dest)
        assert (remote.remote_dir / "disk.img").read_bytes() == bytes(model)  # on the server


@pytest.mark.parametrize("fault", ["stopped", "killed"])
def test_a_remote_that_stalls_or_dies_mid_move_costs_only_the_move(
    tmp_path: Path, remote: Remote, fault: str
) -> None:
    source, model = image_pair(tmp_path, SIZE)
    dest = remote.mountpoint / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        with writing(guest(m, model, seed=2)) as writer:
            migrate(m, dest, "--rate", SLOW)
            writer.wait_writes(20)
            assert m.status()["phase"] == "mirroring"
            broken = time.monotonic()
            remote.stop() if fault == "stopped" else remote.kill()
            status = wait_status(m, lambda s: s["phase"] in TERMINAL, "the move to end")
            failed_after = time.monotonic() - broken
            writer.wait_writes(writer.writes + 20)  # the guest goes on, on the source
        assert writer.errors == []
        assert status["phase"] == "failed", status
        assert "destination" in status["error"], status
        # Mirroring stops within the deadline; removing the partial file from a stalled remote
        # may take one more before the move reports it failed back.
        assert failed_after < 2 * DEADLINE + SLACK, f"failed back after {failed_after:.2f} s"
        print(
            f"{fault}: failed back after {failed_after:.2f} s; worst write "
            f"{writer.worst_write:.3f} s, worst fsync {writer.worst_fsync:.3f} s: {status['error']}"
        )
        assert writer.worst_write < DEADLINE + SLACK, f"a write waited {writer.worst_write} s"
        assert writer.worst_fsync < DEADLINE + SLACK, f"a flush waited {writer.worst_fsync} s"
        assert_serving(m, model, source)
        assert m.status()["io_error"] is None
    remote.cont()


def test_a_remote_that_dies_after_the_switch_is_the_disk(tmp_path: Path, remote: Remote) -> None:
    """Too late to fail back: the disk is on the remote.  Its death reaches the guest as errors
    (nothing else could be true), the daemon serves on, and the status says what happened."""
    source, model = image_pair(tmp_path, SIZE)
    dest = remote.mountpoint / "disk.img"
    # Exit status 1: the final flush at unmount fails, and the daemon says so.
    with mounted(source, tmp_path / "mnt", exit_code=1) as m:
        migrate(m, dest)
        status = finish(m)
        assert status["phase"] == "done" and status["image"] == str(dest), status
        assert read_direct(m.file) == bytes(model)
        remote.kill()
        fd = os.open(m.file, os.O_RDWR)
        try:
            with pytest.raises(OSError):  # (reads may still come from sshfs's page cache)
                os.pwrite(fd, b"after the remote died", 0)
                os.fsync(fd)
        finally:
            os.close(fd)
        status = m.status()  # the daemon answers: it did not die with the remote
        assert status["phase"] == "done" and status["image"] == str(dest)
        assert str(dest) in status["io_error"], status
    assert "final flush" in m.log.read_text() and "may be lost" in m.log.read_text()


def test_recovery_with_an_unreachable_destination_serves_the_source(
    tmp_path: Path, remote: Remote
) -> None:
    """The daemon is killed mid-move, then the remote stalls.  Mounting again settles the move
    on the source, and says the destination is unreachable and where its partial file may be."""
    source, model = image_pair(tmp_path, SIZE)
    dest = remote.mountpoint / "disk.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert fusedisk("mount", source, mnt).returncode == 0
        pid = json.loads((mnt / ".status").read_text())["pid"]
        started = fusedisk("migrate", mnt, dest, "--rate", SLOW, "--detach")
        assert started.returncode == 0, started.stderr
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon to die")
        remote.stop()
        cleared = fusedisk("unmount", mnt)  # the stale mount
        assert cleared.returncode == 0, cleared.stderr
        began = time.monotonic()
        again = fusedisk("mount", source, mnt, timeout=60)
        took = time.monotonic() - began
        assert again.returncode == 0, again.stderr
        line = again.stderr.strip()
        assert "unreachable" in line and str(dest) in line and "may remain" in line, line
        assert f"serving {source}" in line, line
        assert took < 15, f"recovery took {took:.1f} s"
        status = json.loads((mnt / ".status").read_text())
        assert status["image"] == str(source) and status["phase"] == "idle"
        assert read_direct(mnt / "disk.img") == bytes(model)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
        remote.cont()
