"""A resumed move compares the regions its checkpoint marked instead of copying them
(fusedisk.compare): engine tests with in-memory files that count what reaches the destination.

What they hold it to: a page that differs is written; a page that is equal is never written;
pages a mirrored write already synced are not even compared; a guest write racing the
comparison is never overwritten by the stale page the comparison read (forced: the copier is
stopped between comparing and writing); the accounting counts every byte once.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from fusedisk.backend import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE
from fusedisk.compare import Compared
from fusedisk.engine import Disk
from fusedisk.intent import marked_runs
from fusedisk.move import Move, Phase
from tests.fakes import MemoryFile, MemoryStorage
from tests.test_engine import WAIT, Gate, MiB, finished, without_range_locks
from tests.test_resume import checkpoint_record, resumed_to_the_end

SIZE = 8 * MiB
CURSOR = 6 * MiB
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
MARKS = [1, 3]  # compared: [1, 2) and [3, 4) MiB; the rest below the cursor is trusted


def crashed_pair(seed: int = 7) -> tuple[MemoryFile, MemoryFile]:
    """Files as a crash leaves them: equal below the cursor, the destination empty past it."""
    data = random.Random(seed).randbytes(SIZE)
    src = MemoryFile("/src", data)
    dst = MemoryFile("/dst", data[:CURSOR] + bytes(SIZE - CURSOR))
    return src, dst


def writes_to(file: MemoryFile) -> list[tuple[int, int]]:
    """Every pwrite that reaches ``file`` from now on, as (offset, length)."""
    seen: list[tuple[int, int]] = []
    file.on_write = lambda offset, length: seen.append((offset, length))
    return seen


def assert_accounted(move: Move) -> None:
    skipped = move.synced_by_writes_bytes + move.hole_bytes + move.found_equal_bytes
    assert move.copied_bytes + skipped == SIZE, move.status(SIZE)


def test_compared_pieces_cut_a_run_at_the_compared_ranges() -> None:
    compared = Compared([(MiB, 2 * MiB), (3 * MiB, 4 * MiB)])
    assert list(compared.pieces(0, MiB)) == [(0, MiB, False)]
    assert list(compared.pieces(MiB // 2, 3 * MiB + 5)) == [
        (MiB // 2, MiB, False),
        (MiB, 2 * MiB, True),
        (2 * MiB, 3 * MiB, False),
        (3 * MiB, 3 * MiB + 5, True),
    ]
    assert list(compared.pieces(3 * MiB + 5, 5 * MiB)) == [
        (3 * MiB + 5, 4 * MiB, True),
        (4 * MiB, 5 * MiB, False),
    ]
    assert list(Compared([]).pieces(0, 10)) == [(0, 10, False)]
    assert marked_runs(SIZE, CURSOR, MiB, {1, 2, 4, 7}) == [(MiB, 3 * MiB), (4 * MiB, 5 * MiB)]
    assert marked_runs(SIZE, 4 * MiB + 10, MiB, {4}) == [(4 * MiB, 4 * MiB + 10)]


async def test_the_pages_that_differ_are_written_and_no_other() -> None:
    """In the marked regions: two pages the guest wrote on the source only, one page that
    reached the destination alone, and a write straddling two pages: those five pages are
    written, each once, and nothing else in the marked regions; past the cursor, all."""
    src, dst = crashed_pair()
    src.data[MiB + 10 : MiB + 20] = b"s" * 10  # page 256
    src.data[MiB + 9 * PAGE - 3 : MiB + 9 * PAGE + 3] = b"t" * 6  # pages 264 and 265
    dst.data[3 * MiB + 5 * PAGE] = dst.data[3 * MiB + 5 * PAGE] ^ 1  # page 773, destination only
    src.data[4 * MiB - 1] = src.data[4 * MiB - 1] ^ 1  # the last page of region 3
    written = writes_to(dst)
    _, move = await resumed_to_the_end(src, dst, CURSOR, MARKS)
    assert dst.data == src.data
    below = sorted(w for w in written if w[0] < CURSOR)
    assert below == [
        (MiB, PAGE),
        (MiB + 8 * PAGE, 2 * PAGE),
        (3 * MiB + 5 * PAGE, PAGE),
        (4 * MiB - PAGE, PAGE),
    ]
    assert move.compared_bytes == 2 * MiB
    assert move.found_equal_bytes == 2 * MiB - 5 * PAGE
    assert move.copied_bytes == 5 * PAGE + SIZE - CURSOR
    assert_accounted(move)


@pytest.mark.parametrize("dest_timeout", [0, 1.0], ids=["inline", "threaded"])
async def test_equal_pages_are_never_written_and_synced_ones_never_compared(
    dest_timeout: float,
) -> None:
    """Marked regions whose pages all still agree cost reads, not one destination write; and
    whole pages a mirrored write covered after the remount are skipped, not compared."""
    src, dst = crashed_pair()
    gate = Gate(offset=MiB)  # the copier, comparing region 1, stops at its read of the dest
    dst.on_read = gate
    async with trio.open_nursery() as nursery:
        disk = Disk(src, MemoryStorage(src, dst), nursery)
        move = await disk.resume_move(checkpoint_record(CURSOR, MARKS), dest_timeout=dest_timeout)
        await gate.wait_reached()
        await disk.write(3 * MiB + 4 * PAGE, b"w" * 3 * PAGE)  # whole pages, region 3
        written = writes_to(dst)  # from here: the copier's writes, no guest's
        gate.proceed.set()
        await finished(move)
    assert move.phase is Phase.DONE, move.error
    assert dst.data == src.data
    assert [w for w in written if w[0] < CURSOR] == [], "an equal page was written"
    assert move.compared_bytes == move.found_equal_bytes == 2 * MiB - 3 * PAGE
    assert move.copied_bytes == SIZE - CURSOR
    assert_accounted(move)


@pytest.mark.parametrize("dest_timeout", [0, 1.0], ids=["inline", "threaded"])
@pytest.mark.parametrize("locks_enabled", [True, False], ids=["locked", "control"])
async def test_a_write_racing_the_comparison_is_not_overwritten(
    locks_enabled: bool, dest_timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copier has read a differing page of both files and is about to write the source's
    (old) bytes; a guest write to that page arrives.  With the range locks it waits and lands
    last; without them (the control case, proving the test can fail) the comparison's stale
    page overwrites the guest's write on the destination."""
    if not locks_enabled:
        without_range_locks(monkeypatch)
    src, dst = crashed_pair()
    page = MiB + 16 * PAGE
    src.data[page + 1] = src.data[page + 1] ^ 1  # written on the source only, then the crash
    gate = Gate(offset=page)  # stops the copier's write of that page, after comparing
    dst.on_write = gate
    async with trio.open_nursery() as nursery:
        disk = Disk(src, MemoryStorage(src, dst), nursery)
        move = await disk.resume_move(checkpoint_record(CURSOR, MARKS), dest_timeout=dest_timeout)
        await gate.wait_reached()
        write_done = trio.Event()

        async def guest_write() -> None:
            await disk.write(page + 100, b"N" * 100)
            write_done.set()

        async with trio.open_nursery() as writers:
            writers.start_soon(guest_write)
            if locks_enabled:  # it waits for the held range, reaching neither file
                await trio.testing.wait_all_tasks_blocked()
                assert not write_done.is_set()
            else:  # it lands on both files while the copier is stopped before its write
                with trio.fail_after(WAIT):
                    await write_done.wait()
            gate.proceed.set()
        await finished(move)
    assert move.phase is Phase.DONE, move.error
    if locks_enabled:
        assert dst.data[page + 100 : page + 200] == b"N" * 100
        assert dst.data == src.data
        assert_accounted(move)
    else:
        assert dst.data[page + 100 : page + 200] != b"N" * 100, "the stale overwrite"


async def test_a_source_hole_in_a_marked_region_stays_a_hole_and_zeros_are_equal() -> None:
    """Where the source is a hole in a marked region, the destination is punched before the
    move mirrors (a page that reached it alone does not survive) and the copier skips it; a
    page of zeros on the source against a hole on the destination is equal: not written."""
    src = MemoryFile("/src", bytes(SIZE), sparse=True)
    src.pwrite(b"d" * (CURSOR - MiB), 0)  # data to 5 MiB; a hole in [5, 8) MiB
    src.fallocate(PUNCH, MiB + 8 * PAGE, 8 * PAGE)  # a hole in region 1
    dst = MemoryFile("/dst", bytes(SIZE), sparse=True)
    dst.pwrite(bytes(src.data[: CURSOR - MiB]), 0)
    dst.pwrite(b"only on the destination", MiB + 9 * PAGE)  # in the source's hole
    src.pwrite(bytes(PAGE), 3 * MiB)  # zeros as data on the source,
    dst.fallocate(PUNCH, 3 * MiB, PAGE)  # a hole on the destination
    written = writes_to(dst)
    _, move = await resumed_to_the_end(src, dst, CURSOR, MARKS)
    assert dst.data == src.data
    assert not any(dst.allocated[(MiB + 8 * PAGE) // PAGE : (MiB + 16 * PAGE) // PAGE])
    assert written == [], "a page was written where both files agree"
    assert move.hole_bytes == 8 * PAGE + SIZE - (CURSOR - MiB)
    assert move.found_equal_bytes == 2 * MiB - 8 * PAGE
    assert_accounted(move)
