#!/usr/bin/env python3
"""The library's floor: a bare pyfuse3 passthrough of one file, for the benchmarks.

    floor.py IMAGE MOUNTPOINT [--name disk] [--mirror FILE2]

Serves IMAGE as MOUNTPOINT/NAME until `fusermount3 -u MOUNTPOINT` (or Ctrl-C). Each handler
does its syscall inline, with no thread and no await; fsync is implemented (pyfuse3's default
ENOSYS makes the kernel skip every later fsync); there is no getxattr handler (any makes the
kernel send GETXATTR before every WRITE; shared/PYFUSE3.md). --mirror writes every write to
FILE2 too, after IMAGE, and fsync syncs both: the floor for two writes per guest write during a
move.
"""

import argparse
import errno
import os
import stat

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, InodeT

FILE = InodeT(pyfuse3.ROOT_INODE + 1)


class Floor(pyfuse3.Operations):
    def __init__(self, fds: list[int], name: str) -> None:
        super().__init__()
        self.fds, self.name = fds, name.encode()

    async def getattr(self, inode: InodeT, ctx: object = None) -> EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        st, attr = os.fstat(self.fds[0]), EntryAttributes()
        attr.st_ino, attr.st_nlink, attr.st_uid, attr.st_gid = inode, 1, st.st_uid, st.st_gid
        attr.st_mode = pyfuse3.ModeT(st.st_mode if inode == FILE else stat.S_IFDIR | 0o755)
        attr.st_size = st.st_size if inode == FILE else 0
        attr.st_blocks, attr.st_blksize = st.st_blocks, st.st_blksize
        attr.st_mtime_ns = attr.st_ctime_ns = st.st_mtime_ns
        return attr

    async def lookup(self, parent: InodeT, name: bytes, ctx: object = None) -> EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE)

    async def readdir(self, fh: FileHandleT, start: int, token: pyfuse3.ReaddirToken) -> None:
        if start == 0:
            pyfuse3.readdir_reply(token, self.name, await self.getattr(FILE), 1)

    async def open(self, inode: InodeT, flags: int, ctx: object) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=FileHandleT(inode))

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return os.pread(self.fds[0], size, off)

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        written = os.pwrite(self.fds[0], buf, off)
        for fd in self.fds[1:]:  # --mirror: the second write, inline, after the first
            os.pwrite(fd, buf, off)
        return written

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        for fd in self.fds:
            (os.fdatasync if datasync else os.fsync)(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--name", default="disk")
    p.add_argument("--mirror", metavar="FILE2")
    a = p.parse_args()
    fds = [os.open(path, os.O_RDWR) for path in filter(None, (a.image, a.mirror))]
    pyfuse3.init(Floor(fds, a.name), a.mountpoint, set(pyfuse3.default_options))
    try:
        trio.run(pyfuse3.main)  # returns once unmounted
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
