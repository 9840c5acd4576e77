"""In-memory image files and storage for engine tests, with hooks to inject faults and to stop a
copier thread at an exact point (to force an interleaving rather than hope for it)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from fusedisk.backend import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    PAGE,
    ImageFile,
)

Fault = Callable[[int, int], None]  # (offset, length) -> None, or raise OSError


class MemoryFile:
    """A sparse file in memory: bytes plus a per-page "allocated" flag for SEEK_DATA/SEEK_HOLE."""

    def __init__(self, path: str, data: bytes = b"", *, sparse: bool = False) -> None:
        self.path = path
        self.data = bytearray(data)
        self.allocated = bytearray(b"\x00" if sparse else b"\x01") * (-(-len(data) // PAGE))
        self.closed = False
        self.deleted = False  # unlinked behind the engine's back
        self.fsyncs = 0
        self.copied_ranges: list[tuple[int, int]] = []
        self.writebacks: list[tuple[int, int]] = []  # start_writeback calls
        # Fault and pause hooks: each runs before the operation it is named for.
        self.on_write: Fault | None = None
        self.on_read: Fault | None = None
        self.on_fsync: Callable[[], None] | None = None
        self.on_truncate: Callable[[int], None] | None = None
        self.on_fallocate: Callable[[int, int, int], None] | None = None  # (mode, offset, length)
        self.on_copy_read: Fault | None = None  # after reading the source, before writing dest
        self.on_close: Callable[[], None] | None = None

    def _check(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "closed", self.path)

    def pread(self, size: int, offset: int) -> bytes:
        self._check()
        if self.on_read:
            self.on_read(offset, size)
        return bytes(self.data[offset : offset + size])

    def pwrite(self, data: bytes, offset: int) -> None:
        self._check()
        if self.on_write:
            self.on_write(offset, len(data))
        if offset > len(self.data):
            self._resize(offset)
        self.data[offset : offset + len(data)] = data
        self._resize(len(self.data))
        first, last = offset // PAGE, -(-(offset + len(data)) // PAGE)
        self.allocated[first:last] = b"\x01" * (last - first)

    def _resize(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        pages = -(-size // PAGE)
        del self.allocated[pages:]
        self.allocated.extend(bytes(pages - len(self.allocated)))

    def size(self) -> int:
        return len(self.data)

    def stat(self) -> os.stat_result:
        blocks = self.allocated.count(1) * PAGE // 512
        return os.stat_result((0o100644, 2, 0, 1, 0, 0, len(self.data), 0, 0, 0, blocks))

    def truncate(self, size: int) -> None:
        self._check()
        if self.on_truncate:
            self.on_truncate(size)
        self._resize(size)

    def fsync(self, datasync: bool) -> None:
        self._check()
        if self.on_fsync:
            self.on_fsync()
        self.fsyncs += 1

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """As Linux does on a local filesystem: a hole punched only with KEEP_SIZE, whole pages
        deallocated and partial ones zeroed; zeroing and preallocation allocate."""
        self._check()
        if self.on_fallocate:
            self.on_fallocate(mode, offset, length)
        punch, zero = mode & FALLOC_FL_PUNCH_HOLE, mode & FALLOC_FL_ZERO_RANGE
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) or (
            punch and (zero or not mode & FALLOC_FL_KEEP_SIZE)
        ):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), self.path)
        end = offset + length
        if not mode & FALLOC_FL_KEEP_SIZE and end > len(self.data):
            self._resize(end)
        end = min(end, len(self.data))
        if offset >= end:
            return
        if punch or zero:
            self.data[offset:end] = bytes(end - offset)
        if punch:
            first, last = (
                -(-offset // PAGE),
                end // PAGE if end < len(self.data) else -(-end // PAGE),
            )
            self.allocated[first:last] = bytes(max(0, last - first))
        else:
            first, last = offset // PAGE, -(-end // PAGE)
            self.allocated[first:last] = b"\x01" * (last - first)

    def next_data(self, offset: int) -> int:
        page = self.allocated.find(1, offset // PAGE)
        return len(self.data) if page < 0 else max(offset, page * PAGE)

    def next_hole(self, offset: int) -> int:
        page = self.allocated.find(0, offset // PAGE)
        return len(self.data) if page < 0 else min(max(offset, page * PAGE), len(self.data))

    def copy_to(self, dst: ImageFile, offset: int, length: int) -> int:
        data = self.pread(length, offset)
        if self.on_copy_read:
            self.on_copy_read(offset, length)
        dst.pwrite(data, offset)
        self.copied_ranges.append((offset, len(data)))
        return len(data)

    def start_writeback(self, offset: int, length: int) -> None:
        self.writebacks.append((offset, length))

    def check_in_place(self) -> None:
        if self.deleted:
            raise OSError(errno.ENOENT, "the file was deleted or replaced", self.path)

    def close(self) -> None:
        self.closed = True
        if self.on_close:
            self.on_close()


def fail_with(code: int) -> Fault:
    def fault(offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    return fault


class MemoryStorage:
    """Files by path; the journal's records in order, to check what was made durable when."""

    def __init__(self, *files: MemoryFile) -> None:
        self.files = {f.path: f for f in files}
        self.journal: dict[str, dict[str, Any]] = {}
        self.journal_history: list[dict[str, Any]] = []
        self.prepared: dict[str, dict[str, Any]] = {}
        self.partial: set[str] = set()  # destinations not yet switched to
        self.on_create: Callable[[str], None] | None = None
        self.on_remove: Callable[[str], None] | None = None
        self.on_mark_complete: Callable[[str], None] | None = None
        self.on_journal: Callable[[dict[str, Any]], None] | None = None

    def create(self, path: str, size: int, template: ImageFile, source: str) -> MemoryFile:
        if self.on_create:
            self.on_create(path)
        if path in self.files:
            raise FileExistsError(errno.EEXIST, "exists", path)
        file = MemoryFile(path, bytes(size), sparse=True)
        self.files[path] = file
        self.partial.add(path)
        return file

    def open(self, path: str) -> MemoryFile:
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return self.files[path]

    def remove(self, path: str) -> None:
        if self.on_remove:
            self.on_remove(path)
        self.files.pop(path, None)
        self.partial.discard(path)

    def mark_complete(self, path: str) -> None:
        if self.on_mark_complete:
            self.on_mark_complete(path)
        self.partial.discard(path)

    def write_journal(self, source: str, record: dict[str, Any]) -> None:
        if self.on_journal:
            self.on_journal(record)
        self.journal[source] = dict(record)
        self.journal_history.append(dict(record))

    def prepare_journal(self, source: str, record: dict[str, Any]) -> None:
        self.prepared[source] = dict(record)

    def commit_journal(self, source: str) -> None:
        record = self.prepared.pop(source)
        if self.on_journal:
            self.on_journal(record)
        self.journal[source] = record
        self.journal_history.append(record)

    def clear_journal(self, source: str) -> None:
        self.journal.pop(source, None)
        self.prepared.pop(source, None)
