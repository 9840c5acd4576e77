"""The destination's native write lane (fusedisk/_lane.c), on real files.

First the lane alone: it runs what it is given in the order given, names each failure by its
errno and goes on, and owns a descriptor of its own, which it closes when it ends (so a write
that returns late never lands in a file that reused the number).  Then through the engine:
a move whose mirrored writes overlap, with either lane; and a destination on a FUSE filesystem
whose server is stopped (SIGSTOP of tests/lossyfs.py), so the lane's write is stuck in the
kernel: the guest's write returns within the deadline, the move fails back, the next move does
not wait for the stuck one, and once the server goes on the lane ends and lets the file go.
Last, the copier racing a guest write to the same block, forced, with the native lane writing
the guest's half (and a control without the range locks that shows the stale overwrite).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from fusedisk._lane import Lane
from fusedisk.backend import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ImageFile, PosixFile
from fusedisk.engine import Disk
from fusedisk.move import Phase
from fusedisk.storage import PosixStorage
from tests.lossy import Lossy, lossy_mount
from tests.test_engine import WAIT, Gate, MiB, without_range_locks, write_while_the_copy_is_stopped

DEADLINE = 0.5
MARGIN = 0.5  # scheduling slack on a busy machine, on top of the deadline


def reap(lane: Lane, count: int) -> list[tuple[object, int]]:
    """The next ``count`` finished operations, waiting for the lane's eventfd between reaps."""
    done: list[tuple[object, int]] = []
    while len(done) < count:
        readable, _, _ = select.select([lane.fileno()], [], [], WAIT)
        assert readable, f"{len(done)} of {count} operations finished within {WAIT} s"
        done += lane.reap()
    assert len(done) == count, done
    return done


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@contextmanager
def opened(path: Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def test_overlapping_writes_land_in_the_order_submitted(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(bytes(64 * 1024))
    expected = bytearray(64 * 1024)
    with opened(path) as fd:
        lane = Lane(fd)
        for i in range(2000):
            offset, data = (i * 1237) % 60000, bytes([i % 251]) * (1 + i % 4000)
            lane.pwrite(i, data, offset)
            expected[offset : offset + len(data)] = data
        lane.barrier("everything before")
        done = reap(lane, 2001)
    assert [token for token, _ in done] == [*range(2000), "everything before"]
    assert all(code == 0 for _, code in done)
    assert path.read_bytes() == expected


def test_truncates_and_fallocates_keep_their_place_among_the_writes(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"")
    with opened(path) as fd:
        lane = Lane(fd)
        lane.pwrite("a", b"a" * 8192, 0)
        lane.fallocate("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        lane.truncate("shrink", 6000)
        lane.pwrite("b", b"b" * 100, 7000)
        assert reap(lane, 4) == [("a", 0), ("punch", 0), ("shrink", 0), ("b", 0)]
    assert path.read_bytes() == bytes(4096) + b"a" * 1904 + bytes(1000) + b"b" * 100


def test_a_failed_operation_is_named_by_its_errno_and_the_lane_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"x" * 4096)
    with opened(path, os.O_RDONLY) as fd:
        lane = Lane(fd)
        lane.pwrite("write", b"y" * 10, 0)
        lane.truncate("truncate", 0)
        lane.barrier("after")
        (_, write), (_, truncate), after = reap(lane, 3)
    assert write == errno.EBADF
    assert truncate in (errno.EBADF, errno.EINVAL)  # ftruncate(2): either, for a read-only fd
    assert after == ("after", 0)
    assert path.read_bytes() == b"x" * 4096


def test_the_lane_writes_through_a_descriptor_of_its_own_and_closes_it(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(bytes(4096))
    before = open_fds()
    with opened(path) as fd:
        lane = Lane(fd)
        assert len(open_fds() - before) == 3  # the caller's, the lane's duplicate, the eventfd
    lane.pwrite("after the caller closed its own", b"z" * 4096, 0)
    assert reap(lane, 1) == [("after the caller closed its own", 0)]
    assert path.read_bytes() == b"z" * 4096
    lane.stop()
    assert lane.join(WAIT)
    assert len(open_fds() - before) == 1  # the eventfd, until the lane object goes
    del lane
    assert open_fds() - before == set()


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[Lossy]:
    with lossy_mount(tmp_path / "lossy") as lossy:
        try:
            yield lossy
        finally:
            lossy.process.send_signal(signal.SIGCONT)  # a failed test must not leave it stopped


@pytest.mark.mount
def test_a_write_stuck_in_the_kernel_holds_back_nothing_after_stop(lossy: Lossy) -> None:
    """The worker's write blocks in the kernel (the FUSE server is stopped): stop() drops what
    is queued behind it at once; once the write returns, the worker ends, runs nothing more,
    and closes its descriptor."""
    path = lossy.path / "image"
    path.write_bytes(bytes(3 * 4096))
    fd = os.open(path, os.O_RDWR)  # closed once the server goes on: a FUSE close asks it
    lane = Lane(fd)
    lossy.process.send_signal(signal.SIGSTOP)
    lane.pwrite("stuck", b"1" * 4096, 0)
    lane.pwrite("queued", b"2" * 4096, 4096)
    wait_for_a_thread_writing(path)
    lane.stop()
    assert not lane.join(0.2), "the worker ended inside a write that cannot return"
    lossy.process.send_signal(signal.SIGCONT)
    assert lane.join(WAIT)
    os.close(fd)
    assert lane.reap() == [("stuck", 0)]  # the one it was in; the queued one never ran
    assert path.read_bytes() == b"1" * 4096 + bytes(2 * 4096)


PWRITE64 = 18  # x86-64's syscall number


def wait_for_a_thread_writing(path: Path) -> None:
    """Return once one of this process's threads is blocked in pwrite64(2) to ``path``
    (/proc/self/task/TID/syscall: the syscall's number and arguments, the first the fd)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):
                number, fd, *_ = Path(f"/proc/self/task/{task}/syscall").read_text().split()
                if int(number) == PWRITE64 and int(fd, 16) in map(int, fds_on(path)):
                    return
        time.sleep(0.001)
    raise AssertionError(f"no thread blocked writing to {path} within {WAIT} s")


def fds_on(path: Path) -> list[str]:
    """This process's descriptors open on ``path``."""
    named = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):  # or "(deleted)"
                named.append(fd)
        except FileNotFoundError:
            pass
    return named


@pytest.mark.parametrize("lane", ["native thread", "python thread"])
async def test_overlapping_mirrored_writes_through_either_lane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lane: str
) -> None:
    """Many overlapping guest writes in flight during a move with a deadline: the destination
    ends up equal to the source, byte for byte."""
    if lane == "python thread":
        monkeypatch.setenv("FUSEDISK_DEST_LANE", "threads")
    source, dest = tmp_path / "source.img", tmp_path / "dest.img"
    source.write_bytes(os.urandom(4 * MiB))
    async with trio.open_nursery() as nursery:
        disk = Disk(PosixFile.open(str(source)), PosixStorage(), nursery)
        move = await disk.start_move(str(dest), rate_limit=8 * MiB, dest_timeout=1.0)
        assert move.status(total=4 * MiB)["dest_writes"] == lane
        async with trio.open_nursery() as writers:
            for i in range(300):
                writers.start_soon(
                    disk.write, (i % 7) * 1000 + (i % 3) * MiB, bytes([i % 256]) * 3000
                )
                if i % 10 == 0:
                    await trio.sleep(0)
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
        assert move.phase is Phase.DONE, move.error
        assert dest.read_bytes() == disk.primary.pread(4 * MiB, 0)
        assert not source.exists()
        disk.primary.close()
        nursery.cancel_scope.cancel()


@pytest.mark.mount
async def test_a_write_stuck_in_the_kernel_costs_the_move_not_the_guest(
    tmp_path: Path, lossy: Lossy
) -> None:
    source, dest = tmp_path / "source.img", lossy.path / "dest.img"
    source.write_bytes(os.urandom(2 * MiB))
    async with trio.open_nursery() as nursery:
        disk = Disk(PosixFile.open(str(source)), PosixStorage(), nursery)
        move = await disk.start_move(str(dest), rate_limit=64 * 1024, dest_timeout=DEADLINE)
        assert move.status(total=2 * MiB)["dest_writes"] == "native thread"
        lossy.process.send_signal(signal.SIGSTOP)
        started = trio.current_time()
        await disk.write(4096, b"guest")
        assert trio.current_time() - started < DEADLINE + MARGIN
        assert disk.primary.pread(5, 4096) == b"guest"
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
        assert move.phase is Phase.FAILED
        assert "did not complete within 0.5 s" in (move.error or ""), move.error
        # The next move, to local storage, does not wait behind the stuck write.
        other = await disk.start_move(str(tmp_path / "other.img"), dest_timeout=1.0)
        with trio.fail_after(WAIT):
            await other.finished_event.wait()
        assert other.phase is Phase.DONE, other.error
        assert fds_on(dest), "let go of while a write into it was still in the kernel"
        lossy.process.send_signal(signal.SIGCONT)
        with trio.fail_after(WAIT):
            while fds_on(dest):  # the stuck write returns: the lane ends and closes its own
                await trio.sleep(0.01)
        assert disk.primary.pread(5, 4096) == b"guest"
        disk.primary.close()
        nursery.cancel_scope.cancel()


class GatedSource(PosixFile):
    """A real source whose copier copy stops between its read and its write (copy_to runs in
    the copier's thread), at the chunk holding the gate's offset.  The destination stays a
    plain PosixFile, so its mirrored writes go through the native lane."""

    gate: Gate

    def copy_to(self, dst: ImageFile, offset: int, length: int) -> int:
        data = self.pread(length, offset)
        self.gate(offset, length)
        dst.pwrite(data, offset)
        return len(data)


@pytest.mark.parametrize("locks_enabled", [True, False], ids=["with-locks", "without-locks"])
async def test_copy_racing_a_write_through_the_native_lane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locks_enabled: bool
) -> None:
    """The copier reads old bytes, a guest write to the same block arrives, then the copier
    writes.  With the range locks the guest's write waits and lands last, through the native
    lane; without them (the control case, proving the test can fail) it lands at once and the
    copier's stale bytes overwrite it."""
    if not locks_enabled:
        without_range_locks(monkeypatch)
    source, dest = tmp_path / "source.img", tmp_path / "dest.img"
    source.write_bytes(os.urandom(2 * MiB))
    image = GatedSource(str(source), os.open(source, os.O_RDWR))
    image.gate = Gate(offset=0)
    async with trio.open_nursery() as nursery:
        disk = Disk(image, PosixStorage(), nursery)
        move = await disk.start_move(str(dest), dest_timeout=1.0)
        assert move.dest_writes == "native thread"
        await write_while_the_copy_is_stopped(disk, image.gate, locks_enabled)
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
        assert move.phase is Phase.DONE, move.error
        moved = dest.read_bytes()
        disk.primary.close()
        nursery.cancel_scope.cancel()
    if locks_enabled:
        assert moved[100:5100] == b"N" * 5000
    else:
        assert moved[100:5100] != b"N" * 5000, "the stale overwrite the locks prevent"
