"""What a resumed move compares instead of copying: the regions its checkpoint marked.

A region the write-intent record marks below the checkpoint's cursor (:mod:`fusedisk.intent`)
was copied before the crash and then perhaps written by the guest on one file only.  Most of
its pages are still equal on both files (a random writer marks a region with a single 4 KiB
write), so the resumed copier reads the region from both files and writes to the destination
only the pages that differ.  Reading is not free: it reads each marked byte twice (once from
each file) to spare writing most of them.

Safety, as for a copy (DESIGN.md, "No stale overwrite"): the copier compares a range while it
holds it (:class:`~fusedisk.syncmap.RangeLocks`), so a guest write there waits until the
differing pages are written, and is mirrored over them; pages a mirrored write made equal are
left out by the sync map before the comparison, as before a copy.  Holes: the copier skips the
source's holes; where the source is a hole in a marked region, :func:`clear_untrusted` punches
the destination before mirroring starts, so a page a crash left on the destination alone does
not survive there, and a zero page never becomes data by a comparison (a zero page that is a
hole on one file and zeros on the other is equal).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from fusedisk.backend import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE, ImageFile


class Compared:
    """The byte ranges (sorted, disjoint) the copier compares instead of copying."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self._starts = [a for a, _ in runs]
        self._ends = [b for _, b in runs]

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """[start, end) cut where compared ranges begin and end: (start, end, compared)."""
        i = bisect.bisect_right(self._ends, start)
        while start < end:
            if i == len(self._starts) or self._starts[i] >= end:
                yield start, end, False
                return
            if self._starts[i] > start:
                yield start, self._starts[i], False
                start = self._starts[i]
            stop = min(end, self._ends[i])
            yield start, stop, True
            start, i = stop, i + 1


def write_differences(
    source: ImageFile, dest: ImageFile, offset: int, length: int
) -> tuple[int, int]:
    """Read [offset, offset+length) from both files and write to ``dest`` the pages where they
    differ (in runs of consecutive pages).  Returns (bytes written, bytes found equal).
    Blocking: the engine runs it in a thread, holding the range."""
    ours = source.pread(length, offset)  # shorter only where the source ends
    theirs = dest.pread(len(ours), offset)
    if ours == theirs:  # one comparison for the common case, a chunk the guest never touched
        return 0, len(ours)
    written = 0
    run_start: int | None = None
    for page in range(0, len(ours) + PAGE, PAGE):  # one step past the end closes the last run
        differs = page < len(ours) and ours[page : page + PAGE] != theirs[page : page + PAGE]
        if differs and run_start is None:
            run_start = page
        elif not differs and run_start is not None:
            end = min(page, len(ours))
            dest.pwrite(ours[run_start:end], offset + run_start)
            written += end - run_start
            run_start = None
    return written, len(ours) - written


def clear_untrusted(
    dest: ImageFile,
    source: ImageFile,
    cursor: int,
    marked: list[tuple[int, int]],
    size: int,
) -> None:
    """Before a resumed move mirrors: punch holes in the destination wherever the source has
    holes and the destination is not trusted, and everywhere from ``cursor`` on.  The copier
    copies (or compares) the source's data and skips its holes, so there the destination must
    be a hole too: a write (or discard) a crash let reach the destination alone, in a hole of
    the source, would otherwise read zeros after the remount and its bytes after the switch.
    In the ``marked`` ranges below the cursor the destination's data is kept for the copier to
    compare.  A destination that cannot punch holes raises (EOPNOTSUPP): the move is rolled
    back instead."""
    end = min(size, dest.size())
    for start, stop in marked:
        hole = source.next_hole(start)
        while hole < min(stop, end):
            data = min(source.next_data(hole), stop, end)
            _punch(dest, hole, data)
            hole = source.next_hole(data) if data < stop else stop
    if cursor < end:
        _punch(dest, cursor, end)


def _punch(file: ImageFile, start: int, end: int) -> None:
    if start < end:
        file.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
