"""The destination's writer process (fusedisk.writer): real files and a real process, no mount.

A process is stopped (SIGSTOP) to play a write stuck in the kernel, and killed to play one that
dies; the daemon is a subprocess of the test when the test must kill it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusedisk.backend import PosixFile
from fusedisk.destination import Destination, FileCall
from fusedisk.engine import Disk
from fusedisk.move import Move, Phase
from fusedisk.storage import PosixStorage
from tests.test_engine import WAIT, MiB, finished

DEADLINE = 0.3
MARGIN = 0.5  # scheduling slack on a busy machine, on top of the deadline


def writer_pid(destination: Destination) -> int:
    assert destination._writer is not None, "a deadline on a real file runs a writer process"
    return destination._writer._process.pid


def gone(pid: int) -> bool:
    """The process has ended (a zombie counts: it runs nothing and holds no file)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_gone(pid: int) -> None:
    with trio.fail_after(WAIT):
        while not gone(pid):
            await trio.sleep(0.01)


@asynccontextmanager
async def disk_moving(tmp_path: Path) -> AsyncIterator[tuple[Disk, Move, Path]]:
    """A disk on a real 4 MiB file, moving (slowly) to another, with a 0.3 s deadline."""
    source, dest = tmp_path / "disk.img", tmp_path / "moved.img"
    source.write_bytes(os.urandom(4 * MiB))
    image = PosixFile.open(str(source))
    try:
        async with trio.open_nursery() as nursery:
            disk = Disk(image, PosixStorage(), nursery)
            move = await disk.start_move(str(dest), rate_limit=256 * 1024, dest_timeout=DEADLINE)
            yield disk, move, dest
    finally:
        image.close()


async def test_writes_land_in_their_order_and_are_answered_in_it(tmp_path: Path) -> None:
    path = tmp_path / "dest.img"
    path.write_bytes(bytes(64 * 1024))
    file = PosixFile.open(str(path))
    destination = Destination(file, deadline=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(destination.watch, lambda why: pytest.fail(why))
        # Overlapping writes, each a different byte over a moving window: only the order in
        # which they were submitted leaves the expected bytes.
        expected = bytearray(64 * 1024)
        calls = []
        for n in range(1, 200):
            offset = (n * 313) % (60 * 1024)
            data = bytes([n % 251]) * 4096
            expected[offset : offset + 4096] = data
            calls.append(destination.submit(FileCall("pwrite", data, offset), f"write {n}"))
        calls.append(destination.submit(FileCall("truncate", 80 * 1024), "grow"))
        for call in calls:
            await destination.wait(call)
        await destination.wait_writes()
        await destination.run(lambda f: f.fsync(True), "flush")
        assert path.read_bytes() == bytes(expected) + bytes(16 * 1024)
        pid = writer_pid(destination)
        assert destination.release() is file
        await wait_gone(pid)  # an idle writer ends as soon as it is let go
        nursery.cancel_scope.cancel()
    file.close()


async def test_a_stopped_writer_costs_the_move_not_the_guest_write(tmp_path: Path) -> None:
    async with disk_moving(tmp_path) as (disk, move, dest):
        assert disk.mirror is not None
        pid = writer_pid(disk.mirror)
        os.kill(pid, signal.SIGSTOP)  # a write stuck in the kernel, as on a hung NFS server
        started = trio.current_time()
        await disk.write(8192, b"w" * 4096)
        took = trio.current_time() - started
        await finished(move)
        assert took <= DEADLINE + MARGIN, f"the guest's write waited {took:.2f} s"
        assert move.phase is Phase.FAILED, move.status(0)
        assert "did not complete within" in (move.error or ""), move.error
        assert disk.primary.pread(4096, 8192) == b"w" * 4096  # the source has it
        await wait_gone(pid)  # killed, though stopped: it can never write late
        assert not dest.exists()


async def test_a_writer_that_dies_fails_the_move_back(tmp_path: Path) -> None:
    async with disk_moving(tmp_path) as (disk, move, dest):
        assert disk.mirror is not None
        os.kill(writer_pid(disk.mirror), signal.SIGKILL)
        await disk.write(0, b"k" * 4096)
        await finished(move)
        assert move.phase is Phase.FAILED, move.status(0)
        assert "writer process ended" in (move.error or ""), move.error
        assert disk.primary.pread(4096, 0) == b"k" * 4096
        await disk.write(4096, b"l" * 4096)  # the disk goes on, from the source alone
        assert not dest.exists()


# The daemon, played by a subprocess: mirrors a write to DEST through a writer process, says
# the writer's pid, then (the test has stopped the writer) queues writes of b"late!" and waits
# to be killed.
DAEMON = textwrap.dedent(
    """
    import fcntl, os, sys, trio
    from fusedisk.backend import PosixFile
    from fusedisk.destination import Destination, FileCall

    async def main():
        file = PosixFile.open(sys.argv[1])
        fcntl.flock(file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as PosixStorage locks it
        destination = Destination(file, deadline=60.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(destination.watch, print)
            await destination.wait(destination.submit(FileCall("pwrite", b"early", 0), "early"))
            print(destination._writer._process.pid, flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the test stopped the writer
            for n in range(100):
                destination.submit(FileCall("pwrite", b"late!", 5 * n), "late")
            print("queued", flush=True)

    trio.run(main)
    """
)


def test_a_dead_daemons_writer_dies_with_it_and_its_queued_writes_never_land(
    tmp_path: Path,
) -> None:
    """What the dead daemon had queued must not land after it: a recovery may have resumed the
    move by then.  (A writer stuck in the kernel, which no signal ends, keeps the destination's
    lock, which recovery needs to resume: PosixStorage.open.)"""
    dest = tmp_path / "dest.img"
    dest.write_bytes(bytes(4096))
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(dest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        pid = int(daemon.stdout.readline())
        os.kill(pid, signal.SIGSTOP)  # the queued writes wait in its socket
        daemon.stdin.write("go\n")
        daemon.stdin.flush()
        assert daemon.stdout.readline() == "queued\n"
        daemon.kill()
        daemon.wait(WAIT)
        time.sleep(0.2)
        os.kill(pid, signal.SIGCONT)  # a writer still alive would now run what was queued
        deadline = time.monotonic() + WAIT
        while not gone(pid):
            assert time.monotonic() < deadline, "the writer outlived its daemon"
            time.sleep(0.01)
        assert dest.read_bytes()[:5] == b"early", "writes queued by the dead daemon landed"
        with open(dest, "rb+") as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nothing holds it any more
    finally:
        daemon.kill()
        daemon.wait(WAIT)
