"""SyncMap against a page-by-page model: the same answers, at a cost of what was written."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from fusedisk import syncmap as syncmap_module
from fusedisk.backend import PAGE
from fusedisk.syncmap import SyncMap

TiB = 1 << 40


class PageModel:
    """The obvious map: one flag per page (what SyncMap was, and must still answer like)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.behind = 0
        self.synced: set[int] = set()

    def pages(self) -> int:
        return -(-self.size // PAGE)

    def resize(self, size: int) -> None:
        if size < self.size:
            self.behind = min(self.behind, -(-size // PAGE))
            # A partial last page ahead of the copy is not wholly written any more.
            self.synced = {p for p in self.synced if p < size // PAGE}
        self.size = size

    def mark_written(self, start: int, end: int) -> None:
        if end > self.size:
            self.resize(end)
        first = -(-start // PAGE)
        last = self.pages() if end >= self.size else end // PAGE
        self.synced.update(range(first, last))

    def copy_reached(self, end: int) -> None:
        self.behind = max(self.behind, -(-min(end, self.size) // PAGE))

    def unsynced_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        end = min(end, self.size)
        runs: list[tuple[int, int]] = []
        for page in range(start // PAGE, -(-end // PAGE)):
            if page < self.behind or page in self.synced:
                continue
            a, b = page * PAGE, min((page + 1) * PAGE, end)
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs


@pytest.mark.parametrize("bucket", [syncmap_module.MIN_BUCKET, 4], ids=["1MiB", "4pages"])
@pytest.mark.parametrize("seed", range(30))
def test_answers_as_a_page_by_page_map(
    seed: int, bucket: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random writes, copier steps and resizes; with tiny buckets, runs cross their edges."""
    monkeypatch.setattr(syncmap_module, "MIN_BUCKET", bucket)
    rng = random.Random(seed)
    size = rng.randrange(1, 96) * PAGE + rng.choice([0, 1, 100, PAGE - 1])
    ours, model = SyncMap(size), PageModel(size)
    cursor = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.6:
            start = rng.randrange(0, size + 2 * PAGE)
            end = start + rng.choice([1, 512, PAGE, 3 * PAGE, rng.randrange(1, 16 * PAGE)])
            ours.mark_written(start, end)
            model.mark_written(start, end)
        elif op < 0.8:
            cursor = min(cursor + rng.randrange(0, 8 * PAGE), model.size)
            cursor = cursor // PAGE * PAGE
            ours.copy_reached(cursor)
            model.copy_reached(cursor)
        elif op < 0.9:
            new = max(1, model.size + rng.randrange(-8 * PAGE, 8 * PAGE))
            ours.resize(new)
            model.resize(new)
            cursor = min(cursor, new // PAGE * PAGE)
        assert ours.size == model.size
        a = rng.randrange(0, model.size + 1) // PAGE * PAGE
        b = a + rng.randrange(0, 40 * PAGE)
        assert ours.unsynced_runs(a, b) == model.unsynced_runs(a, b), (a, b)
    assert ours.unsynced_runs(0, model.size) == model.unsynced_runs(0, model.size)


def test_costs_what_was_written_not_the_virtual_size() -> None:
    """64 TiB with 10,000 scattered 4 KiB writes: a few MiB, and each query is quick."""
    tracemalloc.start()
    try:
        syncmap = SyncMap(64 * TiB)
        rng = random.Random(1)
        for _ in range(10_000):
            offset = rng.randrange(0, 64 * TiB // PAGE) * PAGE
            syncmap.mark_written(offset, offset + PAGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert syncmap.runs == 10_000
    assert peak < 4 << 20, f"{peak} bytes for 10,000 runs"
    assert len(syncmap.unsynced_runs(0, 1 << 30)) <= 2
    written = syncmap.unsynced_runs(0, 64 * TiB)  # the gaps between the 10,000 runs
    assert 10_000 - 10 < len(written) <= 10_001
    syncmap.copy_reached(64 * TiB)
    assert syncmap.unsynced_runs(0, 64 * TiB) == []
    assert syncmap.unsynced_runs(32 * TiB, 64 * TiB) == []


def test_touching_writes_merge_into_one_run() -> None:
    syncmap = SyncMap(1 << 30)  # buckets of 1 MiB: 256 pages
    for page in reversed(range(0, 256, 2)):
        syncmap.mark_written(page * PAGE, (page + 1) * PAGE)
    assert syncmap.runs == 128
    for page in range(1, 256, 2):
        syncmap.mark_written(page * PAGE, (page + 1) * PAGE)
    assert syncmap.runs == 1
    assert syncmap.unsynced_runs(0, 300 * PAGE) == [(256 * PAGE, 300 * PAGE)]
