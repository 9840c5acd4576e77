"""Discard, write zeroes, preallocation and SEEK_DATA/SEEK_HOLE in the engine (issue 10).

No mount: memory files that punch, zero and allocate as Linux does, with hooks to fail an
operation or stop the copier between its read and its write.  For the move a discard is a write
(DESIGN.md): the same range-lock guard, the same write-intent record, the same sync map.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

import pytest
import trio
import trio.testing

from fusedisk.backend import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, PAGE
from fusedisk.engine import Disk
from fusedisk.move import Phase
from tests.fakes import MemoryFile, MemoryStorage
from tests.test_engine import WAIT, Gate, MiB, disk_on, finished, image, without_range_locks
from tests.test_resume import checkpoint_record

PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE


def refuse(code: int, modes: set[int]) -> Any:
    def hook(mode: int, offset: int, length: int) -> None:
        if mode in modes:
            raise OSError(code, os.strerror(code))

    return hook


async def test_each_mode_on_the_serving_file_and_seek_finds_what_it_left() -> None:
    src = image(4 * MiB)
    model = bytearray(src.data)
    async with disk_on(src) as (disk, _):
        await disk.fallocate(PUNCH, MiB, MiB)  # whole pages: a hole
        model[MiB : 2 * MiB] = bytes(MiB)
        await disk.fallocate(PUNCH, 3 * MiB + 10, 100)  # inside one page: zeroed, allocated
        model[3 * MiB + 10 : 3 * MiB + 110] = bytes(100)
        await disk.fallocate(PUNCH, 4 * MiB - PAGE, 10 * PAGE)  # past the end: size kept
        model[4 * MiB - PAGE :] = bytes(PAGE)
        await disk.fallocate(ZERO | FALLOC_FL_KEEP_SIZE, 5, 10)
        model[5:15] = bytes(10)
        await disk.fallocate(ZERO, 4 * MiB - 100, 200)  # grows the disk by 100 bytes
        model[4 * MiB - 100 :] = bytes(200)
        await disk.fallocate(0, 5 * MiB, MiB)  # preallocates, growing it; changes no byte
        model.extend(bytes(6 * MiB - len(model)))
        assert await disk.read(0, 7 * MiB) == bytes(model)

        assert await disk.seek(0, os.SEEK_HOLE) == MiB
        assert await disk.seek(MiB, os.SEEK_DATA) == 2 * MiB
        # The last page, punched, then zeroed with the growth: allocated again.
        assert await disk.seek(2 * MiB, os.SEEK_HOLE) == 4 * MiB + PAGE
        assert await disk.seek(4 * MiB + PAGE, os.SEEK_DATA) == 5 * MiB
        assert await disk.seek(5 * MiB + 1, os.SEEK_HOLE) == 6 * MiB  # the end is a hole
        for offset, whence in [(6 * MiB, os.SEEK_DATA), (6 * MiB + 1, os.SEEK_HOLE)]:
            with pytest.raises(OSError) as past_the_end:
                await disk.seek(offset, whence)
            assert past_the_end.value.errno == errno.ENXIO
        with pytest.raises(OSError) as bad:
            await disk.seek(0, os.SEEK_END)
        assert bad.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("locks_enabled", "dest_timeout"),
    [(True, 0.0), (False, 0.0), (True, 1.0), (False, 1.0)],
    ids=["inline-with-locks", "inline-without-locks", "worker-with-locks", "worker-without-locks"],
)
@pytest.mark.parametrize("mode", [PUNCH, ZERO], ids=["punch", "zero"])
async def test_copy_racing_a_discard_of_the_same_block(
    locks_enabled: bool, dest_timeout: float, mode: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copier has read the old bytes of its chunk; the guest discards part of it; then the
    copier writes.  With the range locks the discard waits and lands last, so the destination
    reads zeros there as the source does; without them (the control case, proving the test can
    fail) the copier's old bytes come back over the discarded range on the destination."""
    if not locks_enabled:
        without_range_locks(monkeypatch)
    src = image(2 * MiB)
    gate = Gate(offset=0)
    src.on_copy_read = gate
    start, length = PAGE + 100, 5 * PAGE  # partial pages at both ends, whole ones between
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", dest_timeout=dest_timeout)
        await gate.wait_reached()
        discarded = trio.Event()

        async def guest_discard() -> None:
            await disk.fallocate(mode, start, length)
            discarded.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest_discard)
            if locks_enabled:  # it waits for the held range: the source is untouched yet
                await trio.testing.wait_all_tasks_blocked()
                assert not discarded.is_set() and any(src.data[start : start + length])
            else:
                with trio.fail_after(WAIT):
                    await discarded.wait()
            gate.proceed.set()
        await finished(move)
    dst = storage.files["/dst"]
    assert move.phase is Phase.DONE, move.error
    assert src.data[start : start + length] == bytes(length)
    if locks_enabled:
        assert dst.data == src.data
        assert move.discarded_bytes == length
    else:
        assert dst.data[start : start + length] != bytes(length), "the stale overwrite"


async def test_a_discard_ahead_of_the_copy_is_in_sync_and_never_copied() -> None:
    """Whole pages discarded or zeroed ahead of the copier are in sync on both files: the pass
    skips them (partial pages it copies: it reads the zeros from the source), so the punched
    ones stay holes on the destination.  (The copier looks each extent of the source up once:
    a range punched inside one it has found is skipped because the sync map marks it, not
    because it is a hole; copied, its zeros would allocate it on the destination.)  Preallocating
    changes no byte, so it syncs nothing: the data there is still copied."""
    src = image(4 * MiB)
    gate = Gate(offset=0)
    src.on_copy_read = gate
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", dest_timeout=0)
        await gate.wait_reached()
        await disk.fallocate(PUNCH, 2 * MiB, 8 * PAGE)
        await disk.fallocate(ZERO | FALLOC_FL_KEEP_SIZE, 3 * MiB + 100, 4 * PAGE)  # 3 whole
        await disk.fallocate(FALLOC_FL_KEEP_SIZE, MiB, MiB)  # over data: copied all the same
        await disk.fallocate(0, 4 * MiB, MiB)  # grows the disk: the copier goes on to its end
        gate.proceed.set()
        await finished(move)
        dst = storage.files["/dst"]
        assert move.phase is Phase.DONE, move.error
        assert dst.data == src.data and dst.size() == 5 * MiB
        # In sync by the map (or, for the punched ones, holes the copier found): skipped.
        assert move.synced_by_writes_bytes + move.hole_bytes == 11 * PAGE
        assert move.copied_bytes + move.synced_by_writes_bytes + move.hole_bytes == 5 * MiB
        assert move.discarded_bytes == 12 * PAGE
        copied = [(a, a + n) for a, n in src.copied_ranges]
        assert not any(a < 2 * MiB + 8 * PAGE and 2 * MiB < b for a, b in copied)
        assert dst.allocated[2 * MiB // PAGE : 2 * MiB // PAGE + 8] == bytes(8)  # still holes


async def test_a_discard_behind_the_copy_frees_the_destination_too() -> None:
    src = image(3 * MiB)
    gate = Gate(offset=2 * MiB)  # the copier is in its third chunk: the first two are copied
    src.on_copy_read = gate
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", dest_timeout=0)
        await gate.wait_reached()
        dst = storage.files["/dst"]
        assert dst.allocated[: MiB // PAGE].count(1) == MiB // PAGE
        await disk.fallocate(PUNCH, 0, MiB)
        assert dst.allocated[: MiB // PAGE].count(1) == 0  # mirrored at once
        gate.proceed.set()
        await finished(move)
        assert move.phase is Phase.DONE, move.error
        assert dst.data == src.data and dst.allocated[: MiB // PAGE].count(1) == 0


async def test_a_destination_failing_a_discard_fails_the_move_back() -> None:
    src = image(MiB)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=256 * 1024)
        storage.files["/dst"].on_fallocate = refuse(errno.EIO, {PUNCH})
        await disk.fallocate(PUNCH, 0, 2 * PAGE)  # no error for the guest: the source has it
        await finished(move)
        assert move.phase is Phase.FAILED and "destination fallocate" in (move.error or "")
        assert src.data[: 2 * PAGE] == bytes(2 * PAGE) and disk.primary is src
        assert "/dst" not in storage.files


async def test_a_refused_mode_is_the_callers_error_and_the_move_goes_on() -> None:
    """The source's filesystem has no ZERO_RANGE (QEMU probes it, then punches instead): the
    caller gets EOPNOTSUPP, neither file changes, and the move is not failed for it."""
    src = image(2 * MiB)
    src.on_fallocate = refuse(errno.EOPNOTSUPP, {ZERO, ZERO | FALLOC_FL_KEEP_SIZE})
    before = bytes(src.data)
    async with disk_on(src) as (disk, storage):
        move = await disk.start_move("/dst", rate_limit=4 * MiB)
        dst = storage.files["/dst"]
        asked: list[int] = []
        dst.on_fallocate = lambda mode, offset, length: asked.append(mode)
        with pytest.raises(OSError) as refused:
            await disk.fallocate(ZERO | FALLOC_FL_KEEP_SIZE, 0, MiB)
        assert refused.value.errno == errno.EOPNOTSUPP
        assert asked == [] and bytes(src.data) == before
        await disk.fallocate(PUNCH, 0, MiB)  # what QEMU does next
        assert asked == [PUNCH]
        move.set_rate_limit(0)
        await finished(move)
        assert move.phase is Phase.DONE, move.error
        assert dst.data == src.data and disk.io_error is None


async def test_a_discard_below_the_checkpoint_waits_for_its_mark() -> None:
    """As a write: below the recorded cursor, a discard reaches neither file before a record
    marking its region is durable (else a crash could leave the files differing there, and a
    resumed move trust it)."""
    data = random.Random(3).randbytes(5 * MiB)
    src, dst = MemoryFile("/src", data), MemoryFile("/dst", data)
    storage = MemoryStorage(src, dst)
    seen: list[tuple[list[int], bool]] = []

    def on_journal(record: dict[str, Any]) -> None:
        marks = record.get("checkpoint", {}).get("marks", [])
        seen.append((marks, not any(src.data[MiB : MiB + PAGE])))

    storage.on_journal = on_journal
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        src.on_copy_read = lambda offset, length: trio.from_thread.run(release.wait)
        move = await disk.resume_move(checkpoint_record(3 * MiB, []), dest_timeout=0)
        await disk.fallocate(PUNCH, MiB, PAGE)
        assert seen == [([1], False)], "the mark was written after the discard, or not at all"
        assert dst.data[MiB : MiB + PAGE] == bytes(PAGE)
        release.set()
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error
    assert dst.data == src.data
