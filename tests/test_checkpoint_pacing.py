"""The checkpoint's pacing knobs (fusedisk.intent: CHECKPOINT_PACE, EARLY_WRITEBACK), with
in-memory files: what they change is when the record flushes, never what it promises."""

from __future__ import annotations

import random
import time

import pytest
import trio

from fusedisk import move as move_module
from fusedisk.engine import Disk
from fusedisk.move import Phase
from tests.fakes import MemoryFile, MemoryStorage
from tests.test_engine import MiB, finished
from tests.test_resume import checkpoint_whenever_none_runs


async def checkpointed_move(src: MemoryFile) -> MemoryStorage:
    """Move ``src`` to /dst at 64 MiB/s (1 MiB chunks) and return its storage."""
    storage = MemoryStorage(src)
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        move = await disk.start_move("/dst", dest_timeout=0, rate_limit=64 * MiB)
        await finished(move)
    assert move.phase is Phase.DONE, move.error
    assert storage.files["/dst"].data == src.data
    return storage


@pytest.mark.parametrize("pace", [0.0, 1000.0])
async def test_a_slow_flush_stretches_the_interval_to_the_next_checkpoint(
    pace: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With checkpoints due whenever none runs, a flush of 20 ms: unpaced, the next begins
    as soon as it ends; paced by 1000, the next is due 20 s later, after this move's end."""
    checkpoint_whenever_none_runs(monkeypatch)
    monkeypatch.setattr(move_module, "CHECKPOINT_PACE", pace)
    src = MemoryFile("/src", random.Random(8).randbytes(16 * MiB))
    src.on_fsync = lambda: time.sleep(0.02)
    storage = await checkpointed_move(src)
    checkpoints = [r for r in storage.journal_history if "checkpoint" in r]
    if pace:
        assert len(checkpoints) == 1, checkpoints
    else:
        assert len(checkpoints) >= 2, checkpoints


@pytest.mark.parametrize("every", [0.0, 1e-9])
async def test_early_writeback_starts_on_both_files_only_when_asked(
    every: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSEDISK_EARLY_WRITEBACK: between checkpoints, both files' whole writeback is started
    (length 0: to the end); off (0), only the copier's own chunks are."""
    monkeypatch.setattr(move_module, "EARLY_WRITEBACK", every)
    src = MemoryFile("/src", random.Random(9).randbytes(8 * MiB))
    storage = await checkpointed_move(src)
    for file in (src, storage.files["/dst"]):
        assert ((0, 0) in file.writebacks) == bool(every), (file.path, file.writebacks)
