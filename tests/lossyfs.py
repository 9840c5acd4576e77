"""lossyfs: a test-only FUSE filesystem that loses, on command, what was never made durable.

Run it as its own process, ``python tests/lossyfs.py MOUNTPOINT`` (tests/lossy.py does); it
serves until unmounted (``fusermount3 -u``) and then exits 0.  Everything lives in memory and the
tree starts empty.  Every inode has a live state, which every request sees, and a durable state,
which is what a power cut leaves, following POSIX's promises and no more:

- a file's data, size and mode become durable only when the file is fsynced (fsync or
  fdatasync); closing it promises nothing;
- a name (create, mkdir, rename, unlink) becomes durable only when its directory is fsynced
  (fsyncdir); a rename between two directories needs both.  A new file whose name is durable
  but whose data was never synced comes back empty, as on a journaling filesystem.

SIGUSR1 cuts the power: the tree reverts to its durable state (files whose names were never made
durable vanish, an unlink that was not made durable is undone and the file comes back with its
durable content, data never synced is gone), every handle opened before the cut fails with EIO,
and the process prints the line ``cut N`` (N counts the cuts) on stdout once it is done.  Handlers
never await, so a cut falls between two requests, never inside one.

No kernel cache can hide a cut: every file is opened with direct_io (no page cache, so a write
reaches us at once and a read always asks us), and entry and attribute timeouts are 0 (every path
walk and every stat asks us).

Caveats: no hard links, symlinks, xattrs, rmdir, chown or renaming over a directory; no lock
handlers (the kernel then keeps flock locks locally, which is all fusedisk needs); pyfuse3 has no
lseek or copy_file_range handlers, so SEEK_DATA reports everything as data and copy_file_range
fails over to read/write in the caller.  Inodes are freed only by a cut, so an unlinked file can
come back; file times are kept but are not part of the durable state.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

PAGE = 4096  # granularity of the record of what fsync must make durable
ROOT = pyfuse3.ROOT_INODE


@dataclass(eq=False)
class Node:
    ino: int
    mode: int  # type and permission bits
    uid: int
    gid: int
    parent: int  # for "..": directories only
    data: bytearray = field(default_factory=bytearray)
    entries: dict[bytes, int] = field(default_factory=dict)  # a directory's names
    nlink: int = 1
    times_ns: list[int] = field(default_factory=lambda: [time.time_ns()] * 3)  # a, m, c
    # What a power cut leaves: empty, with the creation mode, until the first fsync.
    durable_data: bytearray = field(default_factory=bytearray)
    durable_mode: int = 0
    durable_entries: dict[bytes, int] = field(default_factory=dict)
    # Pages written (or cut off) since the last fsync: fsync copies only these, so a guest that
    # fsyncs every 4 KiB write of an 8 MiB image does not copy 8 MiB each time.
    dirty: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.durable_mode = self.mode

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def write(self, offset: int, buf: bytes) -> None:
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset : offset + len(buf)] = buf
        self.dirty.update(range(offset // PAGE, -(-(offset + len(buf)) // PAGE)))
        self.times_ns[1] = self.times_ns[2] = time.time_ns()

    def truncate(self, size: int) -> None:
        old = len(self.data)
        if size < old:
            del self.data[size:]
            # The durable copy still holds these bytes: if the file grows again before the
            # fsync, that fsync must copy the zeros now live there.
            self.dirty.update(range(size // PAGE, -(-old // PAGE)))
        else:
            self.data.extend(bytes(size - old))
        self.times_ns[1] = self.times_ns[2] = time.time_ns()

    def sync(self) -> None:
        """fsync: make data, size and mode durable (fdatasync too: stricter is still a sync)."""
        size = len(self.data)
        del self.durable_data[size:]
        self.durable_data.extend(bytes(size - len(self.durable_data)))
        for page in self.dirty:  # both are ``size`` long now: the slices are of equal length
            span = slice(page * PAGE, (page + 1) * PAGE)
            self.durable_data[span] = self.data[span]
        self.dirty.clear()
        self.durable_mode = self.mode

    def revert(self) -> None:
        """The power cut, for this inode."""
        self.data = bytearray(self.durable_data)
        self.mode = self.durable_mode
        self.entries = dict(self.durable_entries)
        self.dirty.clear()


class LossyFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        root = Node(ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), ROOT)
        self.nodes: dict[int, Node] = {ROOT: root}
        self.handles: dict[int, int] = {}  # open file or directory handle -> inode
        self.next_ino = ROOT + 1  # never reused, even after a cut: the kernel may remember one
        self.next_fh = 1
        self.cuts = 0

    # ---- the power cut ----------------------------------------------------------------------

    def power_cut(self) -> None:
        kept: dict[int, Node] = {}
        todo = [(ROOT, ROOT)]
        while todo:  # walk the durable tree: only what it reaches survives
            ino, parent = todo.pop()
            if ino in kept:  # durably named twice (a rename only one side of made durable)
                kept[ino].nlink += 1
                continue
            node = kept[ino] = self.nodes[ino]
            node.revert()
            node.parent, node.nlink = parent, 1
            todo.extend((child, ino) for child in node.entries.values())
        self.nodes = kept
        self.handles.clear()  # the old handles now answer EIO
        self.cuts += 1

    # ---- helpers ------------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _opened(self, fh: int) -> Node:
        ino = self.handles.get(fh)
        if ino is None or ino not in self.nodes:
            raise pyfuse3.FUSEError(errno.EIO)  # opened before a power cut
        return self.nodes[ino]

    def _handle(self, ino: int) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = ino
        return fh

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.st_mode = node.mode
        attr.st_nlink = 2 if node.is_dir else node.nlink
        attr.st_uid, attr.st_gid = node.uid, node.gid
        attr.st_size = len(node.data)
        attr.st_blksize = PAGE
        attr.st_blocks = -(-len(node.data) // 512)
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = node.times_ns
        attr.entry_timeout = attr.attr_timeout = 0  # the kernel must ask again after a cut
        return attr

    def _new(self, parent: Node, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Node:
        if name in parent.entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        # The kernel may leave the umask to us (FUSE_DONT_MASK): applying it twice is harmless.
        mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask)
        node = Node(self.next_ino, mode, ctx.uid, ctx.gid, parent.ino)
        self.next_ino += 1
        self.nodes[node.ino] = node
        parent.entries[name] = node.ino
        return node

    # ---- names ----------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        if name not in parent.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: a cut may bring it back
        return self._attr(self.nodes[parent.entries[name]])

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # inodes live until a cut: an unlinked file may still be durably named

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(self._new(self._dir(parent_inode), name, stat.S_IFDIR | mode, ctx))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(self._dir(parent_inode), name, stat.S_IFREG | mode, ctx)
        return pyfuse3.FileInfo(fh=self._handle(node.ino), direct_io=True), self._attr(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._dir(parent_inode)
        if name not in parent.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.nodes[parent.entries[name]]
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        del parent.entries[name]
        node.nlink -= 1  # the inode stays: open handles still use it, a cut may revive it

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = self._dir(parent_inode_old), self._dir(parent_inode_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if name_old not in old.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)
        moved = self.nodes[old.entries[name_old]]
        replaced = self.nodes.get(new.entries.get(name_new, -1))
        if replaced is moved:
            return
        if replaced is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if replaced.is_dir or moved.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            replaced.nlink -= 1
        # One step between two requests: atomic, as rename must be.
        del old.entries[name_old]
        new.entries[name_new] = moved.ino
        moved.parent = new.ino

    # ---- attributes ------------------------------------------------------------------------

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if (fields.update_uid and attr.st_uid != node.uid) or (
            fields.update_gid and attr.st_gid != node.gid
        ):
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size:
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            node.truncate(attr.st_size)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_atime:
            node.times_ns[0] = attr.st_atime_ns
        if fields.update_mtime:
            node.times_ns[1] = attr.st_mtime_ns
        node.times_ns[2] = time.time_ns()
        return self._attr(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = PAGE
        data.f_blocks = 1 << 20  # 4 GiB: room for any test's images, which live in memory
        used = sum(-(-len(node.data) // PAGE) for node in self.nodes.values())
        data.f_bfree = data.f_bavail = max(data.f_blocks - used, 0)
        data.f_files, data.f_ffree, data.f_favail = 1 << 20, 1 << 20, 1 << 20
        data.f_namemax = 255
        return data

    # ---- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self._handle(self._dir(inode).ino)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._opened(fh)
        names = sorted(node.entries)
        for i in range(start_id, len(names)):
            child = self.nodes[node.entries[names[i]]]
            if not pyfuse3.readdir_reply(token, names[i], self._attr(child), i + 1):
                break

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self._opened(fh)
        node.durable_entries = dict(node.entries)

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    # ---- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:  # libfuse enables atomic O_TRUNC: no separate setattr comes
            node.truncate(0)
        return pyfuse3.FileInfo(fh=self._handle(inode), direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self._opened(fh).data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._opened(fh).write(off, buf)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._opened(fh).sync()

    async def flush(self, fh: int) -> None:
        self._opened(fh)  # close() is no durability point: only EIO after a cut

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)


async def serve(fs: LossyFS) -> None:
    async def cut_on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            task_status.started()  # before the mount answers: a SIGUSR1 never kills us
            async for _ in signals:
                fs.power_cut()
                print(f"cut {fs.cuts}", flush=True)

    async with trio.open_nursery() as nursery:
        await nursery.start(cut_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MOUNTPOINT")
    fs = LossyFS()
    options = set(pyfuse3.default_options) | {"fsname=lossyfs", "subtype=lossyfs"}
    pyfuse3.init(fs, sys.argv[1], options)
    try:
        trio.run(serve, fs)
    except BaseException:
        pyfuse3.close(unmount=False)  # as pyfuse3's examples: never block on a failed loop
        raise
    pyfuse3.close()


if __name__ == "__main__":
    main()
