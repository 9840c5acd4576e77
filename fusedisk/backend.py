"""The files behind the mount: a small interface the engine needs, and its POSIX implementation.

The engine calls these methods inline from FUSE handlers (no thread hand-off: a page-cache hit
costs microseconds, a ``trio.to_thread`` round trip ~110 µs, see docs/design.md), so each method
is a plain blocking call.  Only slow, bulk operations (``fsync``, ``copy_range``) are sent to
threads by the engine.  All I/O is positional; a short transfer is retried, then reported.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Protocol, cast

# Granularity of sync tracking and of hole detection.
PAGE = 4096
# The copier lets at most about this much of what it wrote wait unflushed (start_writeback).
WRITEBACK_LAG = 8 << 20
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
# fallocate(2) modes (linux/falloc.h; the os module names none of them).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """sync_file_range(2) from the C library (the os module has none)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _load_sync_file_range()


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """fallocate(2) from the C library: os.posix_fallocate has no mode, and glibc's version of
    it writes zeros itself where the filesystem refuses, which would hide a refusal."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_fallocate = _load_fallocate()


class ImageFile(Protocol):
    """One open image file.  Implementations: :class:`PosixFile`, and in-memory fakes in tests."""

    path: str

    def pread(self, size: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def size(self) -> int: ...

    def stat(self) -> os.stat_result: ...

    def truncate(self, size: int) -> None: ...

    def fsync(self, datasync: bool) -> None: ...

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with ``mode`` (0 or FALLOC_FL_* flags) on [offset, offset+length); an
        OSError with the filesystem's errno (EOPNOTSUPP: a mode it does not support)."""
        ...

    def next_data(self, offset: int) -> int:
        """First offset >= ``offset`` holding data (SEEK_DATA); the size if there is none."""
        ...

    def next_hole(self, offset: int) -> int:
        """First offset >= ``offset`` in a hole (SEEK_HOLE); the size counts as a hole."""
        ...

    def copy_to(self, dst: ImageFile, offset: int, length: int) -> int:
        """Copy [offset, offset+length) to the same offset of ``dst``; return bytes copied
        (fewer only where this file ends).  Blocking: the engine runs it in a thread."""
        ...

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing [offset, offset+length) back to storage (length 0: to the end), and wait
        for what was written WRITEBACK_LAG bytes before it: unflushed data stays bounded (best
        effort)."""
        ...

    def check_in_place(self) -> None:
        """Raise OSError unless this open file is still the one its path names (a deleted or
        replaced destination must never become the disk)."""
        ...

    def close(self) -> None: ...


class PosixFile:
    """An image file on a local filesystem, used through one descriptor with positional I/O."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> PosixFile:
        return cls(path, os.open(path, os.O_RDWR | os.O_CLOEXEC))

    @classmethod
    def create_exclusive(cls, path: str, size: int, mode: int) -> PosixFile:
        """Create a new file (never through a symlink, never over an existing file), sparse."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not narrow the image's permissions
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd)

    def pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) == size:
            return data
        # A short read is legal only at the end of the file; retry until EOF or full.
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(self.fd, size - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pwrite(self, data: bytes, offset: int) -> None:
        done = os.pwrite(self.fd, data, offset)
        while done < len(data):
            n = os.pwrite(self.fd, memoryview(data)[done:], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"short write at offset {offset + done}", self.path)
            done += n

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fsync(self, datasync: bool) -> None:
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if _fallocate is None:
            raise OSError(errno.EOPNOTSUPP, "no fallocate in the C library", self.path)
        while _fallocate(self.fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            if code != errno.EINTR:  # retried, as the os module retries its own calls
                raise OSError(code, os.strerror(code), self.path)

    def next_data(self, offset: int) -> int:
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after offset
                return max(offset, self.size())
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA: all is data
                return offset
            raise

    def next_hole(self, offset: int) -> int:
        try:
            return os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
                return max(offset, self.size())
            raise

    def copy_to(self, dst: ImageFile, offset: int, length: int) -> int:
        if isinstance(dst, PosixFile):
            try:
                return _copy_file_range(self.fd, dst.fd, offset, length)
            except OSError as e:
                # Across filesystems on some kernels, or a filesystem without support.
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
        data = self.pread(length, offset)
        dst.pwrite(data, offset)
        return len(data)

    def start_writeback(self, offset: int, length: int) -> None:
        if _sync_file_range is None:
            return
        # Errors only mean no help here (a filesystem without page-cache writeback, as FUSE's):
        # the flush that follows still makes the data durable.
        _sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)
        if offset >= WRITEBACK_LAG:
            _sync_file_range(self.fd, offset - WRITEBACK_LAG, length, SYNC_FILE_RANGE_WAIT_ALL)

    def check_in_place(self) -> None:
        mine = os.fstat(self.fd)
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        if (
            mine.st_nlink == 0
            or named is None
            or (named.st_dev, named.st_ino)
            != (
                mine.st_dev,
                mine.st_ino,
            )
        ):
            raise OSError(errno.ENOENT, "the file was deleted or replaced", self.path)

    def close(self) -> None:
        os.close(self.fd)


def _copy_file_range(src: int, dst: int, offset: int, length: int) -> int:
    """In-kernel copy: no bytes pass through Python, and reflink-capable filesystems share."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
        if n == 0:  # end of the source
            break
        done += n
    return done


def fsync_dir(path: str) -> None:
    """Make a directory entry change (create, rename, unlink) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
