"""The FUSE layer: one directory holding one file, translated onto the :class:`Disk` engine.

This is the only place engine errors become errno replies (pyfuse3 tears down its main loop on any
exception other than ``FUSEError``), each logged with the operation, offset and move phase.
Caveats, from pyfuse3 3.5: it registers no fallocate or lseek handler, so discard/TRIM and
SEEK_DATA/SEEK_HOLE through the mount are not carried (the file reads as all data); QEMU and
qemu-img work regardless.  Creating, renaming or removing other entries is refused with EPERM.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyfuse3

from fusedisk.engine import Disk

log = logging.getLogger(__name__)

FILE_INODE = pyfuse3.InodeT(pyfuse3.ROOT_INODE + 1)
XATTR_PREFIX = "user.fusedisk."


@contextmanager
def fuse_errors(what: str, phase: Callable[[], str], offset: int | None = None) -> Iterator[None]:
    """The error boundary: OSError keeps its errno, anything else is a bug reported as EIO."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except OSError as e:
        where = f" at offset {offset}" if offset is not None else ""
        log.error("%s%s failed during phase %s: %s", what, where, phase(), e)
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from e
    except Exception as e:
        log.exception("%s failed during phase %s: internal error", what, phase())
        raise pyfuse3.FUSEError(errno.EIO) from e


class DiskOperations(pyfuse3.Operations):
    def __init__(self, disk: Disk, name: str, facts: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.disk = disk
        self.name = name.encode()
        self.facts = facts  # the status dict (with the daemon's pid and control socket)
        self._next_fh = 1

    def _phase(self) -> str:
        return "idle" if self.disk.move is None else self.disk.move.phase.value

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
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        file = self._file_attr()
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        attr.st_uid, attr.st_gid = file.st_uid, file.st_gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = file.st_ctime_ns
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        with fuse_errors("getattr", self._phase):
            if inode == pyfuse3.ROOT_INODE:
                return self._root_attr()
            if inode == FILE_INODE:
                return self._file_attr()
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return await self.getattr(FILE_INODE)
        if parent_inode == pyfuse3.ROOT_INODE and name in (b".", b".."):
            return await self.getattr(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        with fuse_errors("setattr", self._phase, attr.st_size if fields.update_size else None):
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
        with fuse_errors("statfs", self._phase):
            st = os.statvfs(os.path.dirname(self.disk.primary.path))
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, field, getattr(st, field))
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # ---- the directory ----------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(0)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, await self.getattr(FILE_INODE), 1)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # ---- the file -----------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            # libfuse enables atomic O_TRUNC: the kernel sends no separate truncate.
            with fuse_errors("open(O_TRUNC)", self._phase, 0):
                await self.disk.truncate(0)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh))

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        with fuse_errors("read", self._phase, off):
            return await self.disk.read(off, size)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        with fuse_errors("write", self._phase, off):
            return await self.disk.write(off, buf)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        # Must exist: pyfuse3's default ENOSYS makes the kernel skip every later fsync.
        with fuse_errors("fsync", self._phase):
            await self.disk.flush(datasync)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass  # close() is not a durability point; fsync is

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # ---- extended attributes: the status, readable with getfattr -------------------------

    def _xattrs(self) -> dict[str, str]:
        facts = self.facts()
        values = {k: str(v) for k, v in facts.items() if isinstance(v, str | int | float)}
        values["status"] = json.dumps(facts, sort_keys=True)
        return values

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        with fuse_errors("listxattr", self._phase):
            return [pyfuse3.XAttrNameT((XATTR_PREFIX + k).encode()) for k in self._xattrs()]

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        key = name.decode(errors="replace")
        if key.startswith(XATTR_PREFIX):
            with fuse_errors("getxattr", self._phase):
                value = self._xattrs().get(key.removeprefix(XATTR_PREFIX))
            if value is not None:
                return str(value).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    # ---- everything else is refused ------------------------------------------------------

    async def create(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)
