"""Engine tests of a destination that fails, hangs or vanishes (issue: network destinations).

No mount: memory files whose hooks raise (ENOTCONN, EIO) or block on a threading.Event, as a
remote filesystem does when its server dies or stalls.  Each test checks the two promises: the
move fails back (or ends) with the error named, and the guest's I/O is never held longer than
the destination's deadline; nothing raises out of the disk's nursery (disk_on would re-raise it).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing

from fusedisk.move import Move, Phase
from tests.fakes import MemoryFile, fail_with
from tests.test_engine import WAIT, MiB, disk_on, finished, image

DEADLINE = 0.2
MARGIN = 0.3  # scheduling slack on a busy machine, on top of the deadline


def raise_errno(code: int) -> Callable[..., None]:
    def fault(*args: object) -> None:
        raise OSError(code, f"planted: {errno.errorcode[code]}")

    return fault


def hang_until(released: threading.Event) -> Callable[..., None]:
    def stuck(*args: object) -> None:
        released.wait(WAIT)

    return stuck


async def copied_one_chunk(move: Move) -> None:
    """Wait for the copier's first chunk (then, throttled, it waits seconds for the next)."""
    with trio.fail_after(WAIT):
        while move.cursor == 0:
            await trio.sleep(0.005)


async def timed(operation: Callable[[], object]) -> float:
    started = trio.current_time()
    await operation()  # type: ignore[misc]
    return trio.current_time() - started


async def test_a_hung_destination_write_costs_the_move_not_the_write() -> None:
    src = image(2 * MiB)
    released = threading.Event()
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=64 * 1024, dest_timeout=DEADLINE)
        await copied_one_chunk(move)
        dst = storage.files["/dst"]
        dst.on_write = hang_until(released)  # the remote stalls: its write never returns
        took = await timed(lambda: disk.write(4096, b"guest"))
        assert DEADLINE <= took < DEADLINE + MARGIN
        assert src.data[4096:4101] == b"guest"  # on the source: the guest's write succeeded
        await finished(move)
        assert move.phase is Phase.FAILED
        assert "write at offset 4096" in (move.error or "")
        assert "did not complete within 0.2 s" in (move.error or "")
        # Mirroring is off: the next writes do not wait at all.
        assert await timed(lambda: disk.write(0, b"next")) < 0.1
        assert "/dst" not in storage.files  # removed (by path; the stuck write holds the file)
        assert not dst.closed, "closed under a write still in flight: its fd could be reused"
        released.set()  # the stuck syscall returns at last: the worker closes the file, ends
        with trio.fail_after(WAIT):
            while not dst.closed:
                await trio.sleep(0.01)


async def test_a_hung_destination_flush_returns_within_the_deadline() -> None:
    src = image(2 * MiB)
    released = threading.Event()
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=64 * 1024, dest_timeout=DEADLINE)
        storage.files["/dst"].on_fsync = hang_until(released)
        await disk.write(0, b"flush me")
        took = await timed(disk.flush)
        assert took < DEADLINE + MARGIN
        assert src.fsyncs == 1  # the source's flush happened: the guest's data is durable
        await finished(move)
        assert move.phase is Phase.FAILED and "flush" in (move.error or "")
        released.set()


async def test_writes_queued_behind_a_hung_call_are_answered_at_once_on_failure() -> None:
    """Writes arriving one after another behind one stuck call: when the first misses the
    deadline, every other is answered at once (the destination, given up, answers all its
    waiters), not each at its own deadline, a second later."""
    deadline = 1.0
    src = image(2 * MiB)
    released = threading.Event()
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=64 * 1024, dest_timeout=deadline)
        await copied_one_chunk(move)
        storage.files["/dst"].on_write = hang_until(released)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(disk.write, i * 8192, b"w" * 100)
                await trio.sleep(0.05)  # the last arrives 0.8 s after the first
        assert trio.current_time() - started < deadline + MARGIN
        assert all(src.data[i * 8192 : i * 8192 + 100] == b"w" * 100 for i in range(16))
        await finished(move)
        released.set()


async def test_overlapping_mirrored_writes_land_in_the_guests_order() -> None:
    """A slow destination, many overlapping writes in flight at once: the destination ends up
    equal to the source, byte for byte (one FIFO thread keeps the guest's order)."""
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=16 * MiB, dest_timeout=1.0)
        dst = storage.files["/dst"]
        never = threading.Event()

        def slowly(offset: int, length: int) -> None:
            never.wait(0.0005)

        dst.on_write = slowly
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(disk.write, (i % 7) * 1000, bytes([i]) * 3000)
                if i % 10 == 0:
                    await trio.sleep(0)
        await finished(move)
        assert move.phase is Phase.DONE, move.error
        assert dst.data == src.data
        assert disk.primary is dst


@pytest.mark.parametrize("code", [errno.ENOTCONN, errno.EIO])
@pytest.mark.parametrize("dest_timeout", [0.0, DEADLINE], ids=["inline", "worker"])
async def test_closing_and_removing_a_dead_destination_fail_back_cleanly(
    code: int, dest_timeout: float
) -> None:
    """The remote died: write, close and unlink all fail.  The move fails back and says where
    the partial file may remain; the disk's nursery sees no exception; the source serves."""
    src = image(2 * MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=64 * 1024, dest_timeout=dest_timeout)
        dst = storage.files["/dst"]
        dst.on_write = fail_with(code)
        dst.on_close = raise_errno(code)
        storage.on_remove = raise_errno(code)
        await disk.write(0, b"still fine")
        await finished(move)
        assert move.phase is Phase.FAILED
        assert "/dst" in (move.error or "") and "may remain" in (move.error or "")
        assert src.data[:10] == b"still fine"
        assert await disk.read(0, 10) == b"still fine"
        assert storage.journal == {}  # the journal beside the source is cleared


async def test_a_destination_that_hangs_on_remove_is_left_behind_within_the_deadline() -> None:
    src = image(MiB)
    released = threading.Event()
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=64 * 1024, dest_timeout=DEADLINE)
        storage.on_remove = hang_until(released)
        move.cancel()
        with trio.fail_after(DEADLINE + MARGIN):
            await move.finished_event.wait()
        assert move.phase is Phase.CANCELLED and "may remain" in (move.error or "")
        assert "did not complete within" in (move.error or "")
        released.set()


async def test_a_hung_copy_fails_the_move_back_within_the_deadline() -> None:
    src = image(2 * MiB)
    released = threading.Event()
    src.on_copy_read = hang_until(released)  # the copier's chunk never reaches the remote
    async with disk_on(src) as (disk, _):
        move = await disk.start_move("/dst", dest_timeout=DEADLINE)
        with trio.fail_after(DEADLINE + MARGIN):
            await move.finished_event.wait()
        assert move.phase is Phase.FAILED and "copying" in (move.error or "")
        # A guest write to the range the copier held waits at most the deadline, too.
        assert await timed(lambda: disk.write(0, b"x")) < 0.1
        released.set()


async def test_a_destination_dying_after_the_switch_leaves_the_disk_on_it() -> None:
    """Too late to fail back: the destination is the disk.  Removing its marker fails; the move
    is done all the same and says so."""
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        storage.on_mark_complete = raise_errno(errno.ENOTCONN)
        move = await disk.start_move("/dst", dest_timeout=DEADLINE)
        await finished(move)
        assert move.phase is Phase.DONE
        assert disk.primary is storage.files["/dst"]
        assert "switched, but the destination did not answer" in (move.error or "")
        assert "/src" not in storage.files  # the source was still deleted


async def test_a_hung_flush_at_the_switch_fails_back_within_the_deadline() -> None:
    src = image(MiB)
    released = threading.Event()
    flushes = 0

    def hang_on_the_last_flush() -> None:
        nonlocal flushes
        flushes += 1
        if flushes > 1:  # the converging flush passes; the one inside the hold hangs
            released.wait(WAIT)

    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=4 * MiB, dest_timeout=DEADLINE)
        dst: MemoryFile = storage.files["/dst"]
        dst.on_fsync = hang_on_the_last_flush
        await finished(move)
        assert move.phase is Phase.FAILED, move.error
        assert disk.primary is src and move.switch_pause_ms is None
        assert "flush" in (move.error or "")
        released.set()


async def test_the_copier_and_guest_writes_go_on_while_a_flush_waits_for_the_disk() -> None:
    """A guest flush whose destination fsync takes long (a slow disk): the copier's chunks do
    not queue behind it (flushes have a lane of their own), so the range the copier holds while
    a chunk waits is never held for a flush's time, and a guest write there goes through."""
    src = image(8 * MiB)
    released = threading.Event()
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move(
            "/dst", rate_limit=4 * MiB, dest_timeout=WAIT, flush_while_copying=False
        )
        storage.files["/dst"].on_fsync = hang_until(released)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disk.flush)
            await trio.sleep(0.05)  # the flush is in the destination's fsync now
            cursor = move.cursor
            with trio.fail_after(WAIT / 2):
                while move.cursor < cursor + 2 * MiB:  # two more chunks copied meanwhile
                    await trio.sleep(0.01)
                await disk.write(move.cursor, b"guest")  # where the copier is at work
            assert not released.is_set()
            released.set()
        await finished(move)
        assert move.phase is Phase.DONE, move.error
        assert storage.files["/dst"].data == src.data
