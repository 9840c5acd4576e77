"""Engine tests with no mount: memory and fault-injecting files, interleavings forced.

A copier thread is stopped at an exact point with a threading.Event in a file hook, and a guest
operation is started while it waits; trio.testing.wait_all_tasks_blocked() then tells us the
operation is blocked (not merely slow).
"""

from __future__ import annotations

import errno
import itertools
import random
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from fusedisk import move as move_module
from fusedisk.backend import PAGE
from fusedisk.engine import Disk
from fusedisk.move import Move, Phase
from fusedisk.syncmap import RangeLocks
from tests.fakes import MemoryFile, MemoryStorage, fail_with

MiB = 1 << 20
WAIT = 10.0  # seconds: every wait here has an end


def image(size: int = 4 * MiB, seed: int = 1) -> MemoryFile:
    return MemoryFile("/src", random.Random(seed).randbytes(size))


@asynccontextmanager
async def disk_on(src: MemoryFile) -> AsyncIterator[tuple[Disk, MemoryStorage]]:
    storage = MemoryStorage(src)
    async with trio.open_nursery() as nursery:
        yield Disk(src, storage, nursery), storage


async def finished(move: Move) -> None:
    with trio.fail_after(WAIT):
        await move.finished_event.wait()


def without_range_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control case of a race test: nothing waits for a range the copier holds."""

    async def no_wait(self: RangeLocks, start: int, end: float) -> None:
        pass

    monkeypatch.setattr(RangeLocks, "wait_unlocked", no_wait)


class Gate:
    """Stops a copier thread at a hook until the test lets it go."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.reached = threading.Event()
        self.proceed = threading.Event()

    def __call__(self, offset: int, length: int) -> None:
        if offset <= self.offset < offset + length and not self.reached.is_set():
            self.reached.set()
            assert self.proceed.wait(WAIT), "test never released the copier"

    async def wait_reached(self) -> None:
        assert await trio.to_thread.run_sync(self.reached.wait, WAIT)


async def write_while_the_copy_is_stopped(disk: Disk, gate: Gate, locks_enabled: bool) -> None:
    """Once the copier is stopped at ``gate`` between its read and its write, write b"N" * 5000
    at offset 100: with the range locks the write waits for the held range (checked), without
    them it lands on both files at once; then let the copier go on."""
    await gate.wait_reached()
    write_done = trio.Event()

    async def guest_write() -> None:
        await disk.write(100, b"N" * 5000)
        write_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guest_write)
        if locks_enabled:  # it waits for the held range, never reaching the destination
            await trio.testing.wait_all_tasks_blocked()
            assert not write_done.is_set()
        else:
            with trio.fail_after(WAIT):
                await write_done.wait()
        gate.proceed.set()


# ---- plain service, no move ---------------------------------------------------------------


async def test_read_write_truncate_without_a_move() -> None:
    src = image(MiB)
    model = bytearray(src.data)
    async with disk_on(src) as (disk, _):
        await disk.write(5, b"hello")
        model[5:10] = b"hello"
        await disk.write(MiB + 100, b"grow")  # past the end: a hole, then the bytes
        model.extend(bytes(MiB + 100 - len(model)))
        model += b"grow"
        assert await disk.read(0, len(model) + 50) == bytes(model)
        await disk.truncate(7)
        assert await disk.read(0, 100) == bytes(model[:7])
        await disk.flush()
        assert src.fsyncs == 1 and disk.flushes == 1
        assert disk.status()["phase"] == "idle"


# ---- the move's happy path and its accounting -----------------------------------------------


async def test_idle_move_copies_each_byte_once_and_keeps_holes() -> None:
    src = MemoryFile("/src", bytes(3 * MiB), sparse=True)
    src.pwrite(b"x" * 10000, MiB + 5)  # data in pages of the second MiB only
    expected = bytes(src.data)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst")
        await finished(move)
        assert move.phase is Phase.DONE, move.error
        dst = storage.files["/dst"]
        assert disk.primary is dst and bytes(dst.data) == expected
        assert "/src" not in storage.files and src.closed
        assert move.copied_bytes == 3 * PAGE  # the pages holding data, nothing else
        assert move.hole_bytes == 3 * MiB - 3 * PAGE
        assert move.copied_bytes + move.synced_by_writes_bytes + move.hole_bytes == 3 * MiB
        assert dst.allocated.count(1) == 3  # the destination stays sparse
        # The journal said "mirroring", then "switched", then was cleared.
        assert [r["phase"] for r in storage.journal_history] == ["mirroring", "switched"]
        assert storage.journal == {} and storage.partial == set()


async def test_keep_source() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", keep_source=True)
        await finished(move)
        assert move.phase is Phase.DONE and "/src" in storage.files
        assert storage.files["/dst"].data == src.data


async def test_second_move_is_refused_while_one_runs() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, _):
        move = await disk.start_move("/dst", rate_limit=64 * 1024)
        with pytest.raises(Exception, match="already mirroring"):
            await disk.start_move("/other")
        move.cancel()
        await finished(move)
        assert move.phase is Phase.CANCELLED


# ---- forced interleavings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locks_enabled", "dest_timeout"),
    [(True, 0.0), (False, 0.0), (True, 1.0), (False, 1.0)],
    ids=["inline-with-locks", "inline-without-locks", "worker-with-locks", "worker-without-locks"],
)
async def test_copy_racing_a_write_to_the_same_block(
    locks_enabled: bool, dest_timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copier reads old bytes, a guest write to the same block arrives, then the copier
    writes.  With the range locks the write waits and lands last; without them (the control
    case, proving this test can fail) the copier's stale bytes overwrite the guest's, whether
    the destination is written inline or by its worker threads (writes have a lane of their
    own, so they overtake a stopped copy)."""
    if not locks_enabled:
        without_range_locks(monkeypatch)
    src = image(2 * MiB)
    gate = Gate(offset=0)
    src.on_copy_read = gate
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", dest_timeout=dest_timeout)
        await write_while_the_copy_is_stopped(disk, gate, locks_enabled)
        await finished(move)
    dst = storage.files["/dst"]
    assert move.phase is Phase.DONE
    if locks_enabled:
        assert dst.data[100:5100] == b"N" * 5000
        assert dst.data == src.data
    else:
        assert dst.data[100:5100] != b"N" * 5000, "the stale overwrite the locks prevent"


async def test_partial_page_writes_ahead_of_and_behind_the_copy() -> None:
    src = image(3 * MiB)
    gate = Gate(offset=MiB)  # stop the copier in its second chunk, [1 MiB, 2 MiB)
    src.on_copy_read = gate
    async with disk_on(src) as (disk, storage):
        # Inline: the copier's copy runs in another thread while writes go on (with the
        # destination's worker, writes would queue behind the stopped copy).
        move = await disk.start_move("/dst", dest_timeout=0)
        await gate.wait_reached()
        await disk.write(10, b"behind")  # below the cursor: mirrored, stays in sync
        await disk.write(2 * MiB + MiB // 2 + 7, b"ahead")  # partial page ahead: copied later
        gate.proceed.set()
        await finished(move)
        dst = storage.files["/dst"]
        assert dst.data == src.data
        assert dst.data[10:16] == b"behind"
        assert dst.data[2 * MiB + MiB // 2 + 7 :][:5] == b"ahead"
        assert move.synced_by_writes_bytes == 0  # neither write covered a whole page
        assert move.copied_bytes == 3 * MiB


async def test_full_pages_written_ahead_are_not_copied() -> None:
    src = image(4 * MiB)
    gate = Gate(offset=0)
    src.on_copy_read = gate
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", dest_timeout=0)  # inline, as above
        await gate.wait_reached()
        await disk.write(2 * MiB + 3 * PAGE, b"W" * (10 * PAGE))  # whole pages, ahead
        await disk.write(4 * MiB - 3, b"end")  # the last 3 bytes: a partial page, copied
        gate.proceed.set()
        await finished(move)
        assert storage.files["/dst"].data == src.data
        assert move.synced_by_writes_bytes == 10 * PAGE
        assert move.copied_bytes == 4 * MiB - 10 * PAGE
        copied = sorted(src.copied_ranges)
        for (a, n), (b, _) in itertools.pairwise(copied):
            assert a + n <= b, "a byte was copied twice"


async def test_write_and_flush_during_the_switch_wait_then_land_on_the_destination() -> None:
    """A flush is in flight when the switch holds I/O: the switch waits for it to drain; a write
    arriving meanwhile is held, then goes to the destination alone."""
    src = image(MiB)
    flushing = threading.Event()
    release_flush = threading.Event()

    def slow_fsync() -> None:
        flushing.set()
        assert release_flush.wait(WAIT)

    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=4 * MiB)  # ~0.25 s of copying
        src.on_fsync = slow_fsync
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disk.flush)
            assert await trio.to_thread.run_sync(flushing.wait, WAIT)
            with trio.fail_after(WAIT):
                while disk._resume is None:  # the switch is holding I/O, draining the flush
                    await trio.sleep(0.01)
            assert move.phase.value == "switching" and not move.switched
            write_done = trio.Event()

            async def guest_write() -> None:
                await disk.write(0, b"after")
                write_done.set()

            nursery.start_soon(guest_write)
            await trio.testing.wait_all_tasks_blocked()
            assert not write_done.is_set()  # held
            src.on_fsync = None
            release_flush.set()
        await finished(move)
        dst = storage.files["/dst"]
        assert move.phase is Phase.DONE and dst.data[:5] == b"after"
        assert src.data[:5] != b"after"  # after the switch, the old source is not written
        assert move.switch_pause_ms is not None


async def test_the_switch_pause_says_where_the_held_time_went() -> None:
    """Each step of the hold is timed, from the moment new I/O is held (the drain counts: the
    guest waits there too), and the steps add up to the pause."""
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", dest_timeout=1.0)
        dst = storage.files["/dst"]
        dst.on_fsync = lambda: time.sleep(0.03)  # a slow flush
        released = threading.Event()  # a guest write in flight as the hold begins

        def hold_the_guests_write(offset: int, length: int) -> None:
            if offset == 4096:
                released.wait(WAIT)

        dst.on_write = hold_the_guests_write

        async def step(name: str) -> None:
            with trio.fail_after(WAIT):
                while move.step != name:
                    await trio.sleep(0.001)

        async def guest() -> None:
            await step("flushing destination")
            await disk.write(4096, b"in flight")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest)
            await step("holding I/O")
            await trio.sleep(0.05)
            released.set()
            await finished(move)
        assert move.phase is Phase.DONE, move.error
        steps = move.switch_steps_ms
        assert list(steps) == ["drain", "check", "flush", "record", "release"]
        assert steps["drain"] >= 50 and steps["flush"] >= 30
        assert move.switch_pause_ms is not None
        assert sum(steps.values()) == pytest.approx(move.switch_pause_ms, abs=0.01)


async def test_flush_during_mirroring_flushes_both() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=MiB)
        await disk.write(0, b"x")
        await disk.flush()
        dst = storage.files["/dst"]
        assert src.fsyncs == 1 and dst.fsyncs == 1
        move.cancel()
        await finished(move)


async def test_growth_and_shrink_during_the_pass() -> None:
    src = image(2 * MiB)
    gate = Gate(offset=MiB)
    src.on_copy_read = gate
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst")
        await gate.wait_reached()
        async with trio.open_nursery() as nursery:
            # The shrink below the held chunk waits for it; growth past it does not.
            nursery.start_soon(disk.truncate, MiB + 100)
            await trio.testing.wait_all_tasks_blocked()
            assert src.size() == 2 * MiB
            gate.proceed.set()
        await disk.write(3 * MiB, b"grown")
        await finished(move)
        dst = storage.files["/dst"]
        assert move.phase is Phase.DONE
        assert dst.size() == 3 * MiB + 5 and dst.data == src.data


# ---- failures before the switch fail back --------------------------------------------------


async def test_destination_write_error_while_mirroring_fails_back_and_guest_succeeds() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=256 * 1024)
        storage.files["/dst"].on_write = fail_with(errno.EIO)
        assert await disk.write(0, b"guest") == 5  # no error for the guest
        await finished(move)
        assert move.phase is Phase.FAILED and "destination write" in (move.error or "")
        assert src.data[:5] == b"guest" and disk.primary is src
        assert "/dst" not in storage.files and storage.journal == {} and not storage.partial
        await disk.write(5, b"more")  # the source keeps serving
        assert src.data[:9] == b"guestmore"


async def test_destination_full_during_copy_fails_back() -> None:
    src = image(2 * MiB)
    original = bytes(src.data)
    async with disk_on(src) as (disk, storage):

        def dest_fills_up(path: str) -> None:
            pass

        storage.on_create = dest_fills_up
        move = await disk.start_move("/dst")
        storage.files["/dst"].on_write = lambda off, n: (
            fail_with(errno.ENOSPC)(off, n) if off >= MiB else None
        )
        await finished(move)
        assert move.phase is Phase.FAILED and "No space" in (move.error or "")
        assert bytes(src.data) == original and "/dst" not in storage.files


@pytest.mark.parametrize("where", ["before-hold", "in-hold", "journal"])
async def test_destination_error_during_the_switch_fails_back(where: str) -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        calls = 0

        def failing_fsync() -> None:
            nonlocal calls
            calls += 1
            if (where == "before-hold" and calls == 1) or (where == "in-hold" and calls == 2):
                raise OSError(errno.EIO, "I/O error")

        def failing_journal(record: dict[str, object]) -> None:
            if record["phase"] == "switched":
                raise OSError(errno.EROFS, "read-only")

        storage.on_create = lambda path: None
        move = await disk.start_move("/dst")
        storage.files["/dst"].on_fsync = failing_fsync
        if where == "journal":
            storage.on_journal = failing_journal
        await finished(move)
        assert move.phase is Phase.FAILED, move.error
        assert disk.primary is src and "/dst" not in storage.files and not move.switched
        await disk.write(0, b"still served")
        assert src.data.startswith(b"still served")


async def test_verify_mismatch_fails_back() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", verify=True)
        dst = storage.files["/dst"]

        def corrupt_before_verify_reads(offset: int, length: int) -> None:
            dst.data[PAGE] ^= 0xFF  # corruption behind the engine's back, after the pass

        dst.on_read = corrupt_before_verify_reads  # only the verifier reads the destination
        await finished(move)
        assert move.phase is Phase.FAILED and "differ at offset 0" in (move.error or "")
        assert disk.primary is src and "/dst" not in storage.files


@pytest.mark.parametrize("dest_timeout", [0.0, 1.0], ids=["inline", "worker"])
async def test_verify_passes_under_writes(dest_timeout: float) -> None:
    """Guest writes land while verify runs, forced at each chunk it compares: one into that
    chunk (it must wait: landing between the reads of the two files, it would make their
    digests differ), one into a chunk not yet verified and one into a chunk verified already.

    The writes are issued from the hook on verify's second read of each chunk (in its thread),
    and that read goes on only once each has landed or is blocked."""
    size, chunk = 3 * MiB, move_module.CHUNK
    src = image(size)
    token = trio.lowlevel.current_trio_token()
    model = bytearray(src.data)
    while_verifying: list[int] = []  # writes issued while move.step == "verifying"
    reads: dict[str, list[tuple[int, int]]] = {"source": [], "destination": []}
    async with disk_on(src) as (disk, storage), trio.open_nursery() as writers:
        move = await disk.start_move("/dst", verify=True, dest_timeout=dest_timeout)

        async def guest_write(offset: int, fill: int) -> None:
            if move.step == "verifying":
                while_verifying.append(offset)
            data = bytes([fill]) * 3000
            model[offset : offset + len(data)] = data  # in the order issued: none overlap
            await disk.write(offset, data)

        async def write_while_verifying(offset: int) -> None:
            n = offset // chunk
            writers.start_soon(guest_write, offset + 4000 * n + 7, 0x40 + n)  # this chunk
            for other in (offset + chunk, offset - chunk):  # not yet verified, verified
                if 0 <= other < size:
                    await guest_write(other + 20000 + 4000 * n, 0x50 + n)
            # Let the write into this chunk land, or block on the range verify holds.
            await trio.testing.wait_all_tasks_blocked()

        def on_read(which: str, other: str, offset: int, length: int) -> None:
            if move.step != "verifying":
                return  # the copy pass reads the source too
            reads[which].append((offset, length))
            if (offset, length) in reads[other]:  # the other file's digest is taken
                trio.from_thread.run(write_while_verifying, offset, trio_token=token)

        src.on_read = partial(on_read, "source", "destination")
        storage.files["/dst"].on_read = partial(on_read, "destination", "source")
        await finished(move)
    assert move.phase is Phase.DONE, move.error
    assert move.verified_bytes == size
    chunks = [(offset, min(chunk, size - offset)) for offset in range(0, size, chunk)]
    assert reads == {"source": chunks, "destination": chunks}  # all of both compared
    assert len(while_verifying) == 3 * len(chunks) - 2, while_verifying
    assert storage.files["/dst"].data == model  # every write, through verify and the switch


async def test_source_write_error_reaches_the_guest_and_fails_back() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=256 * 1024)
        src.on_write = fail_with(errno.EIO)
        with pytest.raises(OSError) as raised:
            await disk.write(0, b"lost?")
        assert raised.value.errno == errno.EIO
        await finished(move)
        assert move.phase is Phase.FAILED and "source write" in (move.error or "")
        assert "/dst" not in storage.files


async def test_cancel_fails_back_and_removes_the_destination() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=128 * 1024)
        await disk.write(3, b"during")
        move.cancel()
        await finished(move)
        assert move.phase is Phase.CANCELLED and disk.primary is src
        assert src.data[3:9] == b"during" and "/dst" not in storage.files
        # A new move can start after a cancelled one.
        again = await disk.start_move("/dst")
        await finished(again)
        assert again.phase is Phase.DONE


async def test_rate_limit_is_honoured_and_changeable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copier never runs ahead of the limit by more than the chunk it copies before it
    sleeps, and a changed limit takes effect at once: raised, the copy goes faster than the old
    limit allows; lifted (0), the rest is copied flat out.

    The image is 16 times what the first limit allows in each measured span, in 64 KiB chunks:
    a copier that ignores a limit copies all of it (or most) in a span, far past the bound."""
    monkeypatch.setattr(move_module, "CHUNK", 64 * 1024)
    src = image(32 * MiB)
    span = 0.25  # seconds measured under each limit
    async with disk_on(src) as (disk, storage):
        started = trio.current_time()
        move = await disk.start_move("/dst", rate_limit=1 * MiB)
        await trio.sleep(span)
        slow = move.copied_bytes
        elapsed = trio.current_time() - started
        assert 0 < slow <= 1 * MiB * elapsed + move_module.CHUNK, (slow, elapsed)

        move.set_rate_limit(4 * MiB)
        changed = trio.current_time()
        await trio.sleep(span)
        faster = move.copied_bytes - slow
        elapsed = trio.current_time() - changed
        assert faster <= 4 * MiB * elapsed + move_module.CHUNK, (faster, elapsed)
        # More than the old limit allows: the new one is in force (ignored, this is ~0.3 MiB).
        assert faster > 1 * MiB * elapsed + move_module.CHUNK, (faster, elapsed)

        move.set_rate_limit(0)
        lifted = trio.current_time()
        await finished(move)
        assert move.phase is Phase.DONE, move.error
        # The rest (about 30 MiB) at the previous limit would take over 7 s.
        assert trio.current_time() - lifted < 3.0
        assert storage.files["/dst"].data == src.data


async def test_illegal_transition_is_refused() -> None:
    move = Move("/a", "/b", rate_limit=0, keep_source=False, verify=False)
    with pytest.raises(Exception, match="illegal move transition idle -> done"):
        move.set_phase(Phase.DONE)


async def test_a_deleted_destination_never_becomes_the_disk() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=4 * MiB)
        storage.files["/dst"].deleted = True  # someone unlinked it mid-copy
        await finished(move)
        assert move.phase is Phase.FAILED and "deleted" in (move.error or "")
        assert disk.primary is src


async def test_source_read_error_reaches_the_guest_and_fails_back() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=256 * 1024)
        src.on_read = fail_with(errno.EIO)
        with pytest.raises(OSError) as raised:
            await disk.read(0, 4096)
        assert raised.value.errno == errno.EIO
        src.on_read = None
        await finished(move)
        assert move.phase is Phase.FAILED and "source read" in (move.error or "")
        assert "/dst" not in storage.files


async def test_a_fail_back_holds_no_guest_io_while_the_destination_hangs() -> None:
    """An inline destination (no deadline) whose fsync never returns: a failing mirrored write
    fails the move back, and the fail-back holds no guest I/O: the source serves on at once."""
    src = image(2 * MiB)  # two chunks: the throttled copier waits seconds before the second
    hang = threading.Event()
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=128 * 1024, dest_timeout=0)
        dst = storage.files["/dst"]
        dst.on_fsync = lambda: (hang.wait(WAIT), None)[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disk.flush)  # stuck in the destination's fsync
            await trio.sleep(0.05)
            dst.on_write = fail_with(errno.EIO)
            await disk.write(0, b"x")  # fails the move back
            started = trio.current_time()
            with trio.fail_after(5):
                await move.finished_event.wait()
                await disk.write(1, b"y")  # served again
            assert trio.current_time() - started < 0.5
            assert move.phase is Phase.FAILED and src.data[:2] == b"xy"
            hang.set()
