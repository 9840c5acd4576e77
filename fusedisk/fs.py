"""The FUSE layer: one directory holding the disk, translated onto the :class:`Disk` engine.

This is the only place engine errors become errno replies (pyfuse3 tears down its main loop on any
exception other than ``FUSEError``), each logged with the operation, offset and move phase.

Every request is the guest's (DESIGN.md): a guest read or write costs one FUSE request.  So there
is no extended-attribute handler: with one, the kernel asks GETXATTR("security.capability")
before every WRITE (file_remove_privs; FUSE never marks its superblock SB_NOSEC).  getxattr and
friends answer ENOSYS, which turns them off for the whole connection after the first ask.  The
status lives in a hidden file instead, ``MOUNTPOINT/.status``: found by name (lookup) but never
listed, so ``ls`` and QEMU see only the disk; opened with direct I/O and rendered on open (and
again on a read at offset 0), so every ``cat`` or ``jq`` reads it fresh, never a cached copy.

The daemon counts the requests it serves by operation (``requests`` in the status), so a test
can prove the kernel sends nothing on the data path but the I/O itself.

Thin disks: ``fallocate`` (discard, write zeroes, preallocation) and ``lseek`` (SEEK_DATA,
SEEK_HOLE) are served when pyfuse3 calls them, which the stock pyfuse3 3.5 does not (it
registers neither handler: the kernel then refuses fallocate with EOPNOTSUPP and reads the file
as all data); ``scripts/setup`` builds the one patched in ``pyfuse3-patch/``.  Which this mount
has is :func:`capabilities`, in the status.  Creating, renaming or removing entries is refused
with EPERM.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, NoReturn

import pyfuse3

from fusedisk.control import STATUS_NAME
from fusedisk.engine import Disk

log = logging.getLogger(__name__)

FILE_INODE = pyfuse3.InodeT(pyfuse3.ROOT_INODE + 1)
STATUS_INODE = pyfuse3.InodeT(pyfuse3.ROOT_INODE + 2)
# Every open of the disk shares one handle (the engine needs none); status opens get their own,
# so the data path tells them apart with one integer test.
DISK_FH = pyfuse3.FileHandleT(0)
# How long the kernel may trust the disk's attributes: practically forever.  Under concurrent
# reads a finite timeout costs a storm of GETATTRs each time it expires (seen: 8,000 in 184,000
# 4 KiB reads at QD16 with 1 s, 6 at QD1): replies that race a read are discarded and asked
# again.  Nothing goes stale: every size change passes through the kernel, a write marks mtime,
# ctime and blocks stale itself (the next stat asks), and a switch invalidates them explicitly.
ATTR_TIMEOUT = 365 * 86400.0


# Handlers beyond what the stock pyfuse3 3.5 calls, each present only in a pyfuse3 that calls it
# (its Operations class defines the default); what each carries, for the status.
CAPABILITIES = {
    "fallocate": "discard, write zeroes, preallocation",
    "lseek": "SEEK_DATA/SEEK_HOLE",
}
# Answers, not failures: not logged as errors (qemu-img map meets ENXIO at every file's end;
# QEMU probes ZERO_RANGE once per open where the backing filesystem has none).
QUIET_ERRNOS = frozenset({errno.ENXIO, errno.EOPNOTSUPP})


def capabilities() -> list[str]:
    """The handlers of CAPABILITIES that this pyfuse3 calls."""
    return [name for name in CAPABILITIES if hasattr(pyfuse3.Operations, name)]


def fuse_error(e: BaseException, what: str, phase: str, offset: int | None = None) -> NoReturn:
    """The error boundary: OSError keeps its errno, anything else is a bug reported as EIO."""
    if isinstance(e, pyfuse3.FUSEError):
        raise e
    where = f" at offset {offset}" if offset is not None else ""
    if isinstance(e, OSError) and e.errno in QUIET_ERRNOS:
        log.debug("%s%s: %s", what, where, e)
        raise pyfuse3.FUSEError(e.errno) from e
    if isinstance(e, OSError):
        log.error("%s%s failed during phase %s: %s", what, where, phase, e)
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from e
    log.error("%s%s failed during phase %s: internal error", what, where, phase, exc_info=e)
    raise pyfuse3.FUSEError(errno.EIO) from e


def forget_file_attributes() -> None:
    """Make the kernel ask for the disk's attributes again (at most once: see ATTR_TIMEOUT)."""
    try:
        pyfuse3.invalidate_inode(FILE_INODE, attr_only=True)  # no writeback cache: cannot block
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds no attributes to drop
            log.warning("could not invalidate the cached attributes of the disk: %s", e)


class DiskOperations(pyfuse3.Operations):
    def __init__(
        self, disk: Disk, name: str, facts: Callable[[], dict[str, Any]], requests: Counter[str]
    ) -> None:
        super().__init__()
        self.disk = disk
        self.name = name.encode()
        self.facts = facts  # the status dict (with the daemon's pid, control socket, requests)
        self.requests = requests  # served requests by operation, updated here
        self._status_files: dict[int, bytes] = {}  # open .status handles: their snapshot
        self._next_fh = 1
        self._owner = disk.primary.stat()  # the image's last stat that worked: see _root_attr

    def _phase(self) -> str:
        return "idle" if self.disk.move is None else self.disk.move.phase.value

    @contextmanager
    def _errors(self, what: str, offset: int | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            fuse_error(e, what, self._phase(), offset)

    # ---- attributes -------------------------------------------------------------------

    def _file_attr(self) -> pyfuse3.EntryAttributes:
        st = self.disk.primary.stat()
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = FILE_INODE
        attr.st_mode = stat.S_IFREG | (st.st_mode & 0o7777)
        attr.st_nlink = 1
        attr.st_uid, attr.st_gid = st.st_uid, st.st_gid
        attr.st_size = self.disk.size()
        attr.st_blocks = st.st_blocks
        attr.st_blksize = st.st_blksize
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = (
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        attr.attr_timeout = attr.entry_timeout = ATTR_TIMEOUT
        return attr

    def _root_attr(self, mode: int, inode: pyfuse3.InodeT) -> pyfuse3.EntryAttributes:
        """The directory (or the status file) owned as the disk is, dated from its ctime.  When
        the image's filesystem fails, from its last stat: the mount itself is alive, and its
        status says what failed (a stat error here would make it look stale)."""
        with suppress(OSError):
            self._owner = self.disk.primary.stat()
        file = self._owner
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = mode
        attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attr.st_uid, attr.st_gid = file.st_uid, file.st_gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = file.st_ctime_ns
        attr.attr_timeout = attr.entry_timeout = 1.0  # off the data path: a stale mount shows
        return attr

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        return self._attr(inode)

    def _attr(self, inode: pyfuse3.InodeT) -> pyfuse3.EntryAttributes:
        with self._errors("getattr"):
            if inode == FILE_INODE:
                return self._file_attr()
            if inode == pyfuse3.ROOT_INODE:
                return self._root_attr(stat.S_IFDIR | 0o755, inode)
            if inode == STATUS_INODE:
                # Size 0, as for /proc files: readers read to EOF, never trust a stale size.
                return self._root_attr(stat.S_IFREG | 0o444, inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        if parent_inode == pyfuse3.ROOT_INODE:
            if name == self.name:
                return self._attr(FILE_INODE)
            if name == STATUS_NAME.encode():
                return self._attr(STATUS_INODE)
            if name in (b".", b".."):
                return self._attr(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self.requests["setattr"] += 1
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        with self._errors("setattr", attr.st_size if fields.update_size else None):
            path = self.disk.primary.path
            if fields.update_size:
                await self.disk.truncate(attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.chown(path, uid, gid)
            if fields.update_atime or fields.update_mtime:
                st = os.stat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime))
            return self._file_attr()

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.requests["statfs"] += 1
        with self._errors("statfs"):
            st = os.statvfs(os.path.dirname(self.disk.primary.path))
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, field, getattr(st, field))
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # ---- the directory: it lists the disk alone ----------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        self.requests["opendir"] += 1
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(0)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        self.requests["readdir"] += 1
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.requests["releasedir"] += 1

    # ---- the disk and the status file ---------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        if inode == STATUS_INODE:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)  # even root: it is a view, not a file
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            self._status_files[fh] = self._render_status()
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True, keep_cache=False)
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            # libfuse enables atomic O_TRUNC: the kernel sends no separate truncate.
            with self._errors("open(O_TRUNC)", 0):
                await self.disk.truncate(0)
        return pyfuse3.FileInfo(fh=DISK_FH)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        self.requests["read"] += 1
        if fh:
            return self._read_status(fh, off, size)
        try:  # the engine's synchronous fast path first: one coroutine less per request
            data = self.disk.try_read(off, size)
            return data if data is not None else await self.disk.read(off, size)
        except Exception as e:
            fuse_error(e, "read", self._phase(), off)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        self.requests["write"] += 1
        if fh:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:  # as read
            return len(buf) if self.disk.try_write(off, buf) else await self.disk.write(off, buf)
        except Exception as e:
            fuse_error(e, "write", self._phase(), off)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        # Must exist: pyfuse3's default ENOSYS makes the kernel skip every later fsync.
        self.requests["fsync"] += 1
        if fh:
            return
        with self._errors("fsync"):
            await self.disk.flush(datasync)

    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        # Called only by a pyfuse3 with the handler (pyfuse3-patch/): discard, write zeroes.
        self.requests["fallocate"] += 1
        if fh:
            raise pyfuse3.FUSEError(errno.EBADF)  # the status file is opened read-only
        with self._errors("fallocate", offset):
            await self.disk.fallocate(mode, offset, length)

    async def lseek(self, fh: pyfuse3.FileHandleT, offset: int, whence: int) -> int:
        # As fallocate: the kernel sends SEEK_DATA and SEEK_HOLE only.
        self.requests["lseek"] += 1
        if fh:  # the status file is all data
            size = len(self._status_files.get(fh, b""))
            if offset >= size:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return offset if whence == os.SEEK_DATA else size
        with self._errors("lseek", offset):
            return await self.disk.seek(offset, whence)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        self.requests["flush"] += 1  # close() is not a durability point; fsync is

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        self.requests["forget"] += 1  # three fixed inodes: nothing to forget

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.requests["release"] += 1
        self._status_files.pop(fh, None)

    def _render_status(self) -> bytes:
        with self._errors("status"):
            return json.dumps(self.facts(), sort_keys=True, indent=2).encode() + b"\n"

    def _read_status(self, fh: int, off: int, size: int) -> bytes:
        if off == 0:  # a reader starting over (watch, tail, a second pass) sees it fresh
            self._status_files[fh] = self._render_status()
        return self._status_files[fh][off : off + size]

    # ---- extended attributes: off for the whole connection ------------------------------

    def _no_xattrs(self, operation: str) -> NoReturn:
        """ENOSYS makes the kernel stop asking, so no write pays a GETXATTR round trip."""
        self.requests[operation] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        self._no_xattrs("getxattr")

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        self._no_xattrs("listxattr")

    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._no_xattrs("setxattr")

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        self._no_xattrs("removexattr")

    # ---- everything else is refused ------------------------------------------------------

    def _refuse(self, operation: str) -> NoReturn:
        self.requests[operation] += 1
        raise pyfuse3.FUSEError(errno.EPERM)

    async def create(self, *args: Any) -> Any:
        self._refuse("create")

    async def mknod(self, *args: Any) -> Any:
        self._refuse("mknod")

    async def mkdir(self, *args: Any) -> Any:
        self._refuse("mkdir")

    async def unlink(self, *args: Any) -> None:
        self._refuse("unlink")

    async def rmdir(self, *args: Any) -> None:
        self._refuse("rmdir")

    async def rename(self, *args: Any) -> None:
        self._refuse("rename")

    async def link(self, *args: Any) -> Any:
        self._refuse("link")

    async def symlink(self, *args: Any) -> Any:
        self._refuse("symlink")
