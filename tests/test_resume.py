"""Resuming a move after a crash: the write-intent record (fusedisk.intent) and recovery.

Engine tests with in-memory files force the orders that matter: a write below the checkpoint
reaches neither file before its region is durably marked; a checkpoint's record marks the
regions written while it flushed; a resumed move copies what the record does not trust and
nothing else.  Recovery tests on real files: what is resumed and what is rolled back.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fusedisk import engine as engine_module
from fusedisk import intent as intent_module
from fusedisk import move as move_module
from fusedisk.backend import PAGE
from fusedisk.daemon import recover
from fusedisk.engine import Disk
from fusedisk.intent import Intent, trusted_runs
from fusedisk.move import Move, Phase
from fusedisk.storage import PosixStorage, journal_path, marker_path
from tests.fakes import MemoryFile, MemoryStorage

MiB = 1 << 20
WAIT = 10.0


def checkpoint_whenever_none_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint as soon as the last one has ended: not every 2 s, and not paced by how long
    its flush took (a loaded machine would space them out); these tests need many."""
    monkeypatch.setattr(move_module, "CHECKPOINT_EVERY", 0.0)
    monkeypatch.setattr(move_module, "CHECKPOINT_PACE", 0.0)


def checkpoint_record(cursor: int, marks: list[int], region: int = MiB) -> dict[str, Any]:
    return {
        "phase": "mirroring",
        "source": "/src",
        "destination": "/dst",
        "keep_source": False,
        "verify": False,
        "checkpoint": {"cursor": cursor, "region": region, "marks": marks},
    }


async def resumed_to_the_end(
    src: MemoryFile, dst: MemoryFile, cursor: int, marks: list[int]
) -> tuple[Disk, Move]:
    """Resume the move of ``src`` to ``dst`` from a checkpoint at ``cursor`` with ``marks``,
    and let it finish."""
    async with trio.open_nursery() as nursery:
        disk = Disk(src, MemoryStorage(src, dst), nursery)
        move = await disk.resume_move(checkpoint_record(cursor, marks), dest_timeout=0)
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error
    return disk, move


def test_trusted_runs_leave_out_marked_regions_and_the_rest() -> None:
    assert trusted_runs(8 * MiB, 5 * MiB, MiB, {2}) == [(0, 2 * MiB), (3 * MiB, 5 * MiB)]
    assert trusted_runs(8 * MiB, 5 * MiB, MiB, {0, 4, 6}) == [(MiB, 4 * MiB)]
    assert trusted_runs(3 * MiB, 5 * MiB, MiB, set()) == [(0, 3 * MiB)]  # shrunk since
    assert trusted_runs(8 * MiB, 0, MiB, set()) == []


async def test_resume_copies_what_the_record_does_not_trust_and_nothing_else() -> None:
    """Checkpoint at 5 MiB, region 2 marked: the resumed move compares region 2 (and copies
    the one page there that differs) and copies 5..8 MiB, and ends with identical files even
    where they differed."""
    data = bytearray(random.Random(1).randbytes(8 * MiB))
    src = MemoryFile("/src", bytes(data))
    dst = MemoryFile("/dst", bytes(data[: 5 * MiB]) + bytes(3 * MiB))
    src.data[2 * MiB + 100 : 2 * MiB + 200] = b"\xaa" * 100  # written, then the crash
    disk, move = await resumed_to_the_end(src, dst, 5 * MiB, [2])
    assert move.resumed_from == 5 * MiB
    assert move.compared_bytes == MiB and move.found_equal_bytes == MiB - PAGE  # region 2
    assert move.copied_bytes == PAGE + 3 * MiB  # its differing page, and 5..8 MiB
    accounted = move.synced_by_writes_bytes + move.hole_bytes + move.found_equal_bytes
    assert move.copied_bytes + accounted == 8 * MiB
    assert disk.primary is dst and dst.data == src.data


async def test_what_reached_only_the_destination_in_a_source_hole_does_not_survive() -> None:
    """A crash between a write's two halves can leave it on the destination alone (its half is
    submitted first), in what is a hole on the source: ahead of the cursor and in a marked
    region.  The copier copies only the source's data, so the resumed move must clear the
    destination where it does not trust it, or the block would read zeros after the remount
    and the write after the switch."""
    src = MemoryFile("/src", bytes(8 * MiB), sparse=True)
    src.pwrite(b"d" * MiB, 0)  # data in region 0 only; the rest is a hole
    dst = MemoryFile("/dst", bytes(8 * MiB), sparse=True)
    dst.pwrite(b"d" * MiB, 0)
    dst.pwrite(b"only on the destination", 2 * MiB + 10)  # marked region 2, below the cursor
    dst.pwrite(b"only on the destination", 6 * MiB + 10)  # past the cursor
    disk, _ = await resumed_to_the_end(src, dst, 4 * MiB, [2])
    assert disk.primary is dst and dst.data == src.data
    assert not dst.allocated[2 * MiB // 4096] and not dst.allocated[6 * MiB // 4096], "not thin"


async def test_a_write_below_the_checkpoint_waits_for_its_mark() -> None:
    """Below the recorded cursor, a write to an unmarked region reaches neither file before a
    record marking its region is durable; a second write there needs no new record."""
    src = MemoryFile("/src", bytes(5 * MiB))
    dst = MemoryFile("/dst", bytes(5 * MiB))
    storage = MemoryStorage(src, dst)
    seen: list[tuple[list[int], bool]] = []

    def on_journal(record: dict[str, Any]) -> None:
        marks = record.get("checkpoint", {}).get("marks", [])
        seen.append((marks, bytes(src.data[MiB : MiB + 4]) == b"new!"))

    storage.on_journal = on_journal
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        # The copier stays at its first chunk: the checkpoint's cursor is what counts.
        src.on_copy_read = lambda offset, length: trio.from_thread.run(release.wait)
        move = await disk.resume_move(checkpoint_record(3 * MiB, []), dest_timeout=0)
        await disk.write(MiB, b"new!")
        assert seen == [([1], False)], "the mark was written after the write, or not at all"
        assert dst.data[MiB : MiB + 4] == b"new!"
        await disk.write(MiB + 8, b"more")
        await disk.write(4 * MiB + 8, b"past")  # past the cursor (and the held chunk)
        assert len(seen) == 1
        release.set()
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error


async def test_a_checkpoint_marks_the_regions_written_while_it_flushed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that lands while a checkpoint flushes both files may not be durable on both:
    its region is in the record the checkpoint writes."""
    checkpoint_whenever_none_runs(monkeypatch)
    monkeypatch.setattr(intent_module, "MIN_REGION", MiB)
    src = MemoryFile("/src", random.Random(2).randbytes(4 * MiB))
    storage = MemoryStorage(src)
    flushing = trio.Event()
    go_on = trio.Event()
    first = True

    def on_fsync() -> None:
        nonlocal first
        if first:  # the first checkpoint's flush of the source: stop there
            first = False
            trio.from_thread.run_sync(flushing.set)
            trio.from_thread.run(go_on.wait)

    src.on_fsync = on_fsync
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.start_move("/dst", dest_timeout=0)
        with trio.fail_after(WAIT):
            await flushing.wait()
        await disk.write(100, b"during the checkpoint")  # region 0, below its cursor (1 MiB)
        go_on.set()
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error
    checkpoints = [r["checkpoint"] for r in storage.journal_history if "checkpoint" in r]
    assert checkpoints[0]["cursor"] == MiB and checkpoints[0]["marks"] == [0], checkpoints


async def test_a_region_written_in_the_last_interval_stays_marked_and_is_recopied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lazy clearing: the first checkpoint after a write keeps its region's mark (the guest
    will likely write there again: no journal write then), and the next one clears it if the
    region was left alone meanwhile.  Resumed from the record that kept it, the move copies
    that region again (the write may be on one file only)."""
    checkpoint_whenever_none_runs(monkeypatch)
    monkeypatch.setattr(intent_module, "MIN_REGION", MiB)
    size = 32 * MiB  # many chunks (1 MiB) after the write: several checkpoints
    data = random.Random(4).randbytes(size)
    src = MemoryFile("/src", data)
    storage = MemoryStorage(src)
    at_chunk_3, go_on = trio.Event(), trio.Event()

    def on_copy_read(offset: int, length: int) -> None:
        if offset == 3 * MiB:
            trio.from_thread.run_sync(at_chunk_3.set)
            trio.from_thread.run(go_on.wait)

    src.on_copy_read = on_copy_read
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.start_move("/dst", dest_timeout=0)
        with trio.fail_after(WAIT):
            await at_chunk_3.wait()
        await disk.write(100, b"written once")  # region 0: marked before it is written
        go_on.set()
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error
    after = [
        r for r in storage.journal_history if r.get("checkpoint", {}).get("cursor", 0) > 3 * MiB
    ]
    assert len(after) >= 2, after
    assert after[0]["checkpoint"]["marks"] == [0], "cleared although written in the epoch before"
    assert after[1]["checkpoint"]["marks"] == [], "kept although left alone for a whole epoch"
    # A crash right after the first of them: the write on the source only.
    kept, cursor = after[0], after[0]["checkpoint"]["cursor"]
    src = MemoryFile("/src", bytes(src.data))
    dst = MemoryFile("/dst", data[:cursor] + bytes(size - cursor))
    async with trio.open_nursery() as nursery:
        disk = Disk(src, MemoryStorage(src, dst), nursery)
        move = await disk.resume_move(kept, dest_timeout=0)
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error
    # Region 0 compared, its one written page copied; and all past the checkpoint.
    assert move.compared_bytes == MiB and move.copied_bytes == PAGE + size - cursor
    assert dst.data == src.data


async def test_a_mark_that_cannot_be_written_fails_the_move_back_first() -> None:
    """If the journal cannot take a mark, the move fails back; the write reaches the source
    (alone) only once the journal's record promises nothing (no checkpoint)."""
    src = MemoryFile("/src", bytes(4 * MiB))
    dst = MemoryFile("/dst", bytes(4 * MiB))
    storage = MemoryStorage(src, dst)
    records: list[tuple[bool, bool]] = []  # (has a checkpoint, the source has the write)

    def on_journal(record: dict[str, Any]) -> None:
        if record.get("checkpoint", {}).get("marks"):
            raise OSError(28, "No space left on device")
        records.append(("checkpoint" in record, src.data[MiB : MiB + 4] == b"new!"))

    storage.on_journal = on_journal
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.resume_move(checkpoint_record(3 * MiB, []), dest_timeout=0)
        await disk.write(MiB, b"new!")
        assert records == [(False, False)], "the write went ahead of the withdrawal"
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.FAILED and "intent" in (move.error or ""), move.error
    assert src.data[MiB : MiB + 4] == b"new!" and dst.data[MiB : MiB + 4] != b"new!"
    assert "/dst" not in storage.files and not storage.journal


async def test_a_truncate_growing_the_disk_far_during_a_checkpoint_is_marked_below_it() -> None:
    """A truncate from 512 KiB to 1 TiB while a checkpoint at 8 MiB flushes: every region below
    that cursor is marked (the truncate may not be durable on both files yet), and the growth
    costs no work per region of the new size."""
    intent = Intent(MemoryStorage(), {"source": "/src"}, MiB)

    async def flush_both() -> None:
        intent.written(MiB // 2, 1 << 40)

    await intent.checkpoint(8 * MiB, flush_both)
    assert intent.marks == set(range(8))
    assert len(intent._written_in) <= intent_module.REGIONS


async def test_a_checkpoint_that_cannot_be_written_fails_the_move_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint runs beside the copier; if its record cannot be written, the move fails
    back (the source serves on, untouched) and says why."""
    checkpoint_whenever_none_runs(monkeypatch)
    data = random.Random(5).randbytes(4 * MiB)
    src = MemoryFile("/src", data)
    storage = MemoryStorage(src)

    def on_journal(record: dict[str, Any]) -> None:
        if "checkpoint" in record:
            raise OSError(28, "No space left on device")

    storage.on_journal = on_journal
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.start_move("/dst", dest_timeout=0)
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.FAILED, move.error
    assert "checkpointing: No space left on device" in (move.error or ""), move.error
    assert disk.primary is src and src.data == data
    assert "/dst" not in storage.files and not storage.journal


async def test_a_checkpoint_whose_flush_misses_the_deadline_fails_the_move_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination hangs in the checkpoint's flush (its own task, beside the copier): the
    deadline holds there too; the move fails back naming it, and nothing is logged as a crash
    of the move task (an error leaving the checkpoint's task would be, as an exception group)."""
    checkpoint_whenever_none_runs(monkeypatch)
    data = random.Random(6).randbytes(4 * MiB)
    src = MemoryFile("/src", data)
    storage = MemoryStorage(src)
    released = threading.Event()
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.start_move("/dst", dest_timeout=0.2)

        def stuck() -> None:
            released.wait(WAIT)

        storage.files["/dst"].on_fsync = stuck
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
        released.set()
    assert move.phase is Phase.FAILED, move.error
    assert "flush did not complete within 0.2 s" in (move.error or ""), move.error
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    assert disk.primary is src and src.data == data


async def test_intent_needs_no_mark_past_the_cursor_or_in_a_marked_region() -> None:
    intent = Intent(MemoryStorage(), {"source": "/src"}, MiB, cursor=4 * MiB, marks={1})
    assert not intent.must_mark(4 * MiB, 5 * MiB)
    assert not intent.must_mark(MiB, 2 * MiB)
    assert intent.must_mark(MiB, 2 * MiB + 1)  # spills into region 2
    assert intent.must_mark(0, 1)


async def test_no_record_at_all_with_checkpoints_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """FUSEDISK_CHECKPOINT_EVERY=inf, the benchmarks' knob: a move with no write-intent
    record (no checkpoint, no mark) against which to measure the record's cost."""
    monkeypatch.setattr(engine_module, "CHECKPOINT_EVERY", math.inf)
    src = MemoryFile("/src", random.Random(3).randbytes(4 * MiB))
    storage = MemoryStorage(src)
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.start_move("/dst", dest_timeout=0)
        await disk.write(MiB, b"new!")
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE and move.intent is None, move.error
    assert not [r for r in storage.journal_history if "checkpoint" in r]
    assert disk.primary.pread(4, MiB) == b"new!"


# ---- recovery on real files -----------------------------------------------------------------


def interrupted_move(tmp_path: Path, *, checkpoint: bool = True) -> tuple[str, str]:
    """Files as a crash leaves them mid-copy: source, journal (with a checkpoint naming the
    destination's inode), destination and its marker."""
    source, dest = str(tmp_path / "disk.img"), str(tmp_path / "new" / "disk.img")
    os.mkdir(tmp_path / "new")
    Path(source).write_bytes(bytes(4 * MiB))
    Path(dest).write_bytes(bytes(4 * MiB))
    storage = PosixStorage()
    st = os.stat(dest)
    record = checkpoint_record(2 * MiB, [0])
    record.update(source=source, destination=dest)
    record["checkpoint"]["destination_id"] = [st.st_dev, st.st_ino]
    if not checkpoint:
        del record["checkpoint"]
    storage.write_journal(source, record)
    Path(marker_path(dest)).write_text(json.dumps({"source": source}))
    os.chmod(marker_path(dest), 0o600)
    return source, dest


def test_recovery_resumes_a_move_with_a_checkpoint(tmp_path: Path) -> None:
    source, dest = interrupted_move(tmp_path)
    served, line, record = recover(source)
    assert served == source and record is not None and record["destination"] == dest
    assert line is not None and "resuming it from its checkpoint at 2.0 MiB" in line, line
    assert os.path.exists(dest) and os.path.exists(journal_path(source))


@pytest.mark.parametrize("why", ["no checkpoint", "replaced", "not ours", "asked"])
def test_recovery_rolls_back_what_it_must_not_resume(tmp_path: Path, why: str) -> None:
    source, dest = interrupted_move(tmp_path, checkpoint=why != "no checkpoint")
    if why == "replaced":  # another file put in the destination's place (the old one kept)
        os.rename(dest, dest + ".old")
        Path(dest).write_bytes(bytes(4 * MiB))
    if why == "not ours":
        Path(marker_path(dest)).write_text(json.dumps({"source": "/elsewhere"}))
    served, line, record = recover(source, resume=why != "asked")
    assert served == source and record is None, line
    assert not os.path.exists(journal_path(source))
    assert os.path.exists(dest) == (why == "not ours"), line  # only ours is removed
