"""Serve a disk image as one file through a real FUSE mount (tier 4: a real daemon, a real mount).

Every test runs the daemon as a user would (``python -m fusedisk``) and checks the bytes on both
sides of the mount: through the mount, and in the backing file.  Writes through the mount are
write-through (no writeback cache), so the backing file can be read while mounted.

The kernel caches attributes for 1 s (``attr_timeout``); where a test compares attributes that the
kernel could serve from that cache, it waits for the condition with a timeout instead of sleeping.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.mounting import Mounted, fusedisk, mounted, random_image

pytestmark = pytest.mark.mount

CLI_TIMEOUT = 60.0
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


# ---- helpers ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def is_mounted(path: Path) -> bool:
    """True if ``path`` is a mount point, stale ones included (``os.path.ismount`` misses those:
    stat fails with ENOTCONN on a mount whose daemon is gone)."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == wanted:
                return True
    return False


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for init to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno or 0
    return 0


def force_unmount(mountpoint: Path) -> None:
    """Cleanup only: unmount whatever is mounted at ``mountpoint``, lazily if it must."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def daemon_pid(mountpoint: Path) -> int:
    result = fusedisk("status", mountpoint, "--json", timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    pid: int = json.loads(result.stdout)["pid"]
    return pid


def ended(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to end; if it still runs after ``timeout``, kill it and return False."""
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.02)
    return True


@contextmanager
def background_mount(image: Path, mountpoint: Path, *extra: str) -> Iterator[int]:
    """``fusedisk mount`` as users run it (it returns once the daemon serves); yields the
    daemon's pid.  Cleanup unmounts if the test did not, and waits for the daemon to end."""
    mountpoint.mkdir(exist_ok=True)
    pid: int | None = None
    try:
        result = fusedisk("mount", image, mountpoint, *extra, timeout=CLI_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "" and result.stdout == "", result
        assert os.path.ismount(mountpoint), "fusedisk mount returned before the mount was ready"
        pid = daemon_pid(mountpoint)
        yield pid
    finally:
        force_unmount(mountpoint)
        stuck = pid is not None and not ended(pid, timeout=60)
    assert not stuck, f"daemon {pid} still ran 60 s after the unmount (killed)"


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status != 0, exactly one line on stderr, starting with "fusedisk: ", no traceback."""
    assert result.returncode != 0, f"succeeded: {result}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("fusedisk: "), lines[0]
    assert result.stdout == "", result.stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(*paths: Path) -> dict[str, Any]:
    """What a failed command must not change: each file's bytes and times, each directory's
    entries and whether it is a mount point."""
    state: dict[str, Any] = {}
    for path in paths:
        if path.is_symlink():
            state[str(path)] = ("symlink", os.readlink(path))
        elif path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path)] = ("file", digest, st.st_size, st.st_mtime_ns, st.st_mode)
        elif path.is_dir():
            state[str(path)] = ("dir", sorted(os.listdir(path)), is_mounted(path))
        else:
            state[str(path)] = ("missing",)
    return state


def read_status_file(mount: Mounted) -> dict[str, Any]:
    """The status as ``cat MOUNTPOINT/.status`` (the real tool) shows it."""
    result = subprocess.run(
        ["cat", str(mount.mountpoint / ".status")],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=True,
    )
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def aligned_buffer(size: int, fill: bytes = b"\0") -> mmap.mmap:
    """A page-aligned buffer (mmap is), as O_DIRECT needs."""
    buffer = mmap.mmap(-1, size)
    buffer.write(fill * (size // len(fill)))
    return buffer


# ---- the data path ------------------------------------------------------------------------


def test_random_io_through_the_mount_matches_a_model(tmp_path: Path) -> None:
    """Writes, reads and truncates of odd sizes at odd offsets, across the end of the file.

    One mount serves every example: each example starts by resetting the file to the same
    content.  Reads alternate between the page cache and O_DIRECT (which always reaches the
    daemon); after every step the backing file and the file's size match the model.
    """
    image = tmp_path / "disk.img"
    initial = random_image(image, 48 << 10, seed=5)
    limit = 256 << 10  # writes start and truncates end below this, to keep the checks cheap
    last_model: list[bytearray] = []

    with mounted(image, tmp_path / "mnt") as m:
        fd = os.open(m.file, os.O_RDWR)
        direct = os.open(m.file, os.O_RDWR | os.O_DIRECT)
        backing = os.open(image, os.O_RDONLY)

        class MountIO(RuleBasedStateMachine):
            model: bytearray

            @initialize()
            def reset(self) -> None:
                os.ftruncate(fd, 0)
                assert os.pwrite(fd, initial, 0) == len(initial)
                self.model = bytearray(initial)
                last_model[:] = [self.model]

            def _write(self, target: int, data: st.DataObject) -> None:
                offset = data.draw(st.integers(0, min(len(self.model) + 8192, limit)), "offset")
                if data.draw(st.booleans(), "big"):
                    length = data.draw(st.integers(1, 70_000), "length")
                    payload = random.Random(data.draw(st.integers(0, 255))).randbytes(length)
                else:
                    payload = data.draw(st.binary(min_size=1, max_size=600), "payload")
                assert os.pwrite(target, payload, offset) == len(payload)
                if offset > len(self.model):
                    self.model.extend(bytes(offset - len(self.model)))
                self.model[offset : offset + len(payload)] = payload

            @rule(data=st.data())
            def write(self, data: st.DataObject) -> None:
                self._write(fd, data)

            @rule(data=st.data())
            def write_direct(self, data: st.DataObject) -> None:
                self._write(direct, data)

            @rule(data=st.data(), through_cache=st.booleans())
            def read(self, data: st.DataObject, through_cache: bool) -> None:
                offset = data.draw(st.integers(0, len(self.model) + 5000), "offset")
                size = data.draw(st.integers(1, 80_000), "size")
                got = os.pread(fd if through_cache else direct, size, offset)
                assert got == self.model[offset : offset + size]

            @rule(data=st.data())
            def truncate(self, data: st.DataObject) -> None:
                size = data.draw(st.integers(0, min(len(self.model) * 2 + 4096, limit)), "size")
                os.ftruncate(fd, size)
                del self.model[size:]
                self.model.extend(bytes(size - len(self.model)))

            @invariant()
            def mount_and_backing_file_match(self) -> None:
                assert os.fstat(fd).st_size == len(self.model)
                assert os.fstat(backing).st_size == len(self.model)
                assert os.pread(backing, limit + (1 << 20), 0) == self.model
                assert os.pread(direct, limit + (1 << 20), 0) == self.model  # via the daemon

        try:
            run_state_machine_as_test(
                MountIO,
                settings=settings(
                    max_examples=60,
                    stateful_step_count=30,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            for descriptor in (fd, direct, backing):
                os.close(descriptor)
    assert image.read_bytes() == last_model[0], "after the unmount, the backing file differs"


def test_o_direct_reads_and_writes(disk_mount: Mounted) -> None:
    image = disk_mount.image.read_bytes()
    size = len(image)
    fd = os.open(disk_mount.file, os.O_RDWR | os.O_DIRECT)
    try:
        got = aligned_buffer(1 << 20)
        assert os.preadv(fd, [got], 2 << 20) == 1 << 20
        assert got[:] == image[2 << 20 : 3 << 20]

        written = aligned_buffer(256 << 10, b"\xa5\x5a")
        assert os.pwritev(fd, [written], (5 << 20) + 4096) == 256 << 10
        back = aligned_buffer(256 << 10)
        assert os.preadv(fd, [back], (5 << 20) + 4096) == 256 << 10
        assert back[:] == written[:]

        grow = aligned_buffer(4096, b"\x77")  # an O_DIRECT write at the end grows the file
        assert os.pwritev(fd, [grow], size) == 4096
        assert os.fstat(fd).st_size == size + 4096
    finally:
        os.close(fd)
    with open(disk_mount.image, "rb") as f:
        f.seek((5 << 20) + 4096)
        assert f.read(256 << 10) == written[:]
        f.seek(size)
        assert f.read() == b"\x77" * 4096
        f.seek(2 << 20)
        assert f.read(1 << 20) == image[2 << 20 : 3 << 20]


def test_fsync_and_fdatasync_reach_the_daemon(disk_mount: Mounted) -> None:
    """pyfuse3's default fsync raises ENOSYS, after which the kernel reports every fsync as done
    without asking the daemon: only the daemon's own counter proves they arrive."""
    before = disk_mount.status()["flushes"]
    fd = os.open(disk_mount.file, os.O_RDWR)
    try:
        os.pwrite(fd, b"durable", 12345)
        os.fsync(fd)
        assert disk_mount.status()["flushes"] == before + 1
        os.pwrite(fd, b"durable too", 54321)
        os.fdatasync(fd)
        assert disk_mount.status()["flushes"] == before + 2
        os.fsync(fd)  # a later fsync still reaches the daemon
        assert disk_mount.status()["flushes"] == before + 3
    finally:
        os.close(fd)
    assert read_status_file(disk_mount)["flushes"] == before + 3


def test_ftruncate_shrink_and_grow(disk_mount: Mounted) -> None:
    image = disk_mount.image.read_bytes()
    shrunk, grown = (3 << 20) + 123, (10 << 20) + 7
    fd = os.open(disk_mount.file, os.O_RDWR)
    try:
        os.ftruncate(fd, shrunk)
        assert os.fstat(fd).st_size == shrunk
        assert os.stat(disk_mount.image).st_size == shrunk
        assert os.pread(fd, 1000, shrunk - 500) == image[shrunk - 500 : shrunk]

        os.ftruncate(fd, grown)
        assert os.fstat(fd).st_size == grown
        assert os.stat(disk_mount.image).st_size == grown
        # The shrink really dropped the bytes: growing again reads zeros, not the old data.
        assert os.pread(fd, grown, 0) == image[:shrunk] + bytes(grown - shrunk)
    finally:
        os.close(fd)
    assert disk_mount.image.read_bytes() == image[:shrunk] + bytes(grown - shrunk)
    assert os.stat(disk_mount.file).st_size == grown


def test_open_with_o_trunc_truncates_the_image(disk_mount: Mounted) -> None:
    """``cp``, ``dd`` without conv=notrunc and shell redirection all open with O_TRUNC."""
    with open(disk_mount.file, "wb") as f:
        f.write(b"after O_TRUNC")
    assert disk_mount.image.read_bytes() == b"after O_TRUNC"
    wait_until(
        lambda: os.stat(disk_mount.file).st_size == len(b"after O_TRUNC"),
        "the size through the mount to be the new one",
    )


def test_a_write_past_the_end_grows_the_file(disk_mount: Mounted) -> None:
    end = disk_mount.image.stat().st_size
    fd = os.open(disk_mount.file, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"tail", end + 10_001) == 4
        size = end + 10_005
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 20_000, end) == bytes(10_001) + b"tail"
    finally:
        os.close(fd)
    assert os.stat(disk_mount.file).st_size == size
    assert os.stat(disk_mount.image).st_size == size
    with open(disk_mount.image, "rb") as f:
        f.seek(end)
        assert f.read() == bytes(10_001) + b"tail"


def test_stat_tells_the_truth_about_a_sparse_image(tmp_path: Path) -> None:
    """Size, allocated blocks, mode, owner and mtime through the mount are the image's own."""
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
        f.seek(1 << 20)
        f.write(b"\x01" * 65536)
    os.chmod(image, 0o640)
    old = 978307200_000_000_000  # 2001-01-01: any write afterwards changes the mtime
    os.utime(image, ns=(old, old))

    with mounted(image, tmp_path / "mnt") as m:
        served, backing = os.stat(m.file), os.stat(image)
        assert stat.S_ISREG(served.st_mode) and served.st_nlink == 1
        assert stat.S_IMODE(served.st_mode) == 0o640
        assert (served.st_uid, served.st_gid) == (backing.st_uid, backing.st_gid)
        assert served.st_size == backing.st_size == 16 << 20
        assert served.st_blocks == backing.st_blocks
        assert served.st_blocks * 512 < 1 << 20, "not sparse: the block check proves nothing"
        assert served.st_mtime_ns == old

        with open(m.file, "r+b") as served_file:
            served_file.seek(5 << 20)
            served_file.write(b"\x02" * (1 << 20))

        def blocks_agree() -> bool:
            return os.stat(m.file).st_blocks == os.stat(image).st_blocks

        wait_until(blocks_agree, "st_blocks through the mount to match the image")
        assert os.stat(m.file).st_blocks >= served.st_blocks + 2048
        wait_until(lambda: os.stat(m.file).st_mtime_ns > old, "the mtime to change")
        assert os.stat(m.file).st_mtime_ns == os.stat(image).st_mtime_ns


def test_statfs_reports_the_backing_filesystem(disk_mount: Mounted) -> None:
    served = os.statvfs(disk_mount.mountpoint)
    backing = os.statvfs(disk_mount.image.parent)
    assert (served.f_bsize, served.f_frsize) == (backing.f_bsize, backing.f_frsize)
    assert served.f_blocks == backing.f_blocks
    tolerance = backing.f_blocks // 100  # other writers change the free space meanwhile
    assert abs(served.f_bfree - backing.f_bfree) <= tolerance
    assert abs(served.f_bavail - backing.f_bavail) <= tolerance
    assert served.f_namemax == 255


# ---- status ---------------------------------------------------------------------------------


def test_status_file_and_command_line(disk_mount: Mounted) -> None:
    mnt = disk_mount.mountpoint
    size = disk_mount.image.stat().st_size
    status = read_status_file(disk_mount)
    assert status["phase"] == "idle"
    assert status["image"] == str(disk_mount.image)
    assert status["size"] == size
    assert status["pid"] == disk_mount.daemon.pid
    assert status["mountpoint"] == str(mnt)
    assert status["name"] == disk_mount.name
    assert os.path.exists(status["control"])
    # The file and the control socket answer the same object (but for the request counts,
    # which the reads themselves move).
    socket_status = disk_mount.status()
    for each in (status, socket_status):
        del each["requests"]
    assert socket_status == status

    jq = subprocess.run(["jq", "-r", ".phase, .name", str(mnt / ".status")], capture_output=True)
    assert jq.returncode == 0 and jq.stdout.decode().split() == ["idle", disk_mount.name]

    # Hidden: ls, even with -a, and QEMU see the disk alone; the status is found by name.
    listing = subprocess.run(["ls", "-a", str(mnt)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [disk_mount.name]
    st = os.stat(mnt / ".status")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
    with pytest.raises(PermissionError):  # a view, not a file: not even root writes it
        os.open(mnt / ".status", os.O_WRONLY)

    # Fresh on every read, never the page cache's copy: a flush shows at once, in a new open
    # (cat, jq) and on re-reading one open file from the start (watch-like readers).
    with open(mnt / ".status", "rb") as held:
        before = json.loads(held.read())["flushes"]
        fd = os.open(disk_mount.file, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        assert read_status_file(disk_mount)["flushes"] == before + 1
        held.seek(0)
        assert json.loads(held.read())["flushes"] == before + 1

    # No extended attributes: getfattr says so (the status moved to the file).
    getfattr = subprocess.run(["getfattr", "-d", str(disk_mount.file)], capture_output=True)
    assert b"Operation not supported" in getfattr.stderr

    text = fusedisk("status", mnt, timeout=CLI_TIMEOUT)
    assert text.returncode == 0, text.stderr
    assert "phase:   idle" in text.stdout
    assert f"daemon pid {disk_mount.daemon.pid}" in text.stdout


# ---- the namespace --------------------------------------------------------------------------


def test_changes_to_the_directory_are_refused_and_the_daemon_serves_on(
    disk_mount: Mounted,
) -> None:
    mnt, file = disk_mount.mountpoint, disk_mount.file
    head = disk_mount.image.read_bytes()[:4096]
    attempts: dict[str, Callable[[], object]] = {
        "create": lambda: os.open(mnt / "new.img", os.O_CREAT | os.O_WRONLY, 0o644),
        "create exclusive": lambda: os.open(mnt / "new.img", os.O_CREAT | os.O_EXCL | os.O_RDWR),
        "mknod": lambda: os.mknod(mnt / "node", 0o644 | stat.S_IFREG),
        "rename": lambda: os.rename(file, mnt / "renamed.img"),
        "rename onto itself": lambda: os.rename(file, file),
        "unlink": lambda: os.unlink(file),
        "mkdir": lambda: os.mkdir(mnt / "dir"),
        "symlink": lambda: os.symlink("target", mnt / "link"),
        "hard link": lambda: os.link(file, mnt / "hard.img"),
    }
    errors: dict[str, int | str] = {}
    for what, attempt in attempts.items():
        try:
            attempt()
        except OSError as e:
            errors[what] = errno.errorcode.get(e.errno or 0, str(e.errno))
        else:
            errors[what] = "succeeded"
    expected = {what: "EPERM" for what in attempts}
    # rename(x, x) is a no-op the kernel answers itself (POSIX: success, nothing to do).
    expected["rename onto itself"] = "succeeded"
    assert errors == expected

    assert disk_mount.daemon.poll() is None, disk_mount.log.read_text()
    assert os.listdir(mnt) == [disk_mount.name]
    with open(file, "r+b") as f:
        assert f.read(4096) == head
        f.write(b"still serving")
    with open(disk_mount.image, "rb") as f:
        f.seek(4096)
        assert f.read(len(b"still serving")) == b"still serving"
    assert "Traceback" not in disk_mount.log.read_text()


def test_name_option_and_ls_shows_exactly_one_entry(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, 1 << 20, seed=9)
    with mounted(image, tmp_path / "mnt", name="vm-disk.raw") as m:
        listing = subprocess.run(
            ["ls", "-A", str(m.mountpoint)], capture_output=True, text=True, check=True
        )
        assert listing.stdout.splitlines() == ["vm-disk.raw"]
        assert (m.mountpoint / "vm-disk.raw").read_bytes() == data
        assert not (m.mountpoint / "disk.img").exists()
        assert m.status()["name"] == "vm-disk.raw"


# ---- unmounting -------------------------------------------------------------------------------


def test_unmount_command_flushes_and_stops_a_background_daemon(tmp_path: Path) -> None:
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    data = bytearray(random_image(image, 4 << 20, seed=11))
    with background_mount(image, mnt) as pid:
        assert running(pid)
        with open(mnt / "disk.img", "r+b") as f:  # no fsync: the unmount must keep it
            f.seek(777_777)
            f.write(b"written before unmount")
            busy = fusedisk("unmount", mnt, timeout=CLI_TIMEOUT)  # the disk is open: refused
        assert_clean_error(busy, "busy")
        assert os.path.ismount(mnt) and running(pid)

        result = fusedisk("unmount", mnt, timeout=CLI_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert not running(pid)
    assert os.listdir(mnt) == []
    data[777_777 : 777_777 + 22] = b"written before unmount"
    assert image.read_bytes() == data


def test_fusermount3_unmount_is_as_safe(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = bytearray(random_image(image, 4 << 20, seed=12))
    with mounted(image, tmp_path / "mnt") as m:
        with open(m.file, "r+b") as f:
            f.seek((4 << 20) - 3)
            f.write(b"across the end")  # grows the file too
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True, timeout=CLI_TIMEOUT)
        assert m.daemon.wait(timeout=CLI_TIMEOUT) == 0, m.log.read_text()
        assert not is_mounted(m.mountpoint)
    data[(4 << 20) - 3 :] = b"across the end"
    assert image.read_bytes() == data


# ---- bad input --------------------------------------------------------------------------------


@dataclass
class BadInput:
    argv: list[str | Path]
    expect: str  # a fragment of the one error line
    watch: list[Path]  # what must not change
    env: dict[str, str] | None = None


def _image_and_mountpoint(tmp: Path) -> tuple[Path, Path]:
    image, mnt = tmp / "disk.img", tmp / "mnt"
    random_image(image, 1 << 20, seed=3)
    mnt.mkdir()
    return image, mnt


def _no_fusermount3_env(tmp: Path) -> dict[str, str]:
    empty = tmp / "bin-without-fusermount3"
    empty.mkdir()
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{empty}"}


def bad_image_missing(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    return BadInput(["mount", tmp / "missing.img", mnt], "does not exist", [tmp, image, mnt])


def bad_image_is_a_directory(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    (tmp / "dir").mkdir()
    return BadInput(["mount", tmp / "dir", mnt], "is a directory", [tmp, image, tmp / "dir", mnt])


def bad_image_immutable(tmp: Path, stack: ExitStack) -> BadInput:
    """Root reads and writes any file whatever its mode; an immutable one it cannot write."""
    image, mnt = _image_and_mountpoint(tmp)
    if subprocess.run(["chattr", "+i", str(image)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    stack.callback(subprocess.run, ["chattr", "-i", str(image)], check=True)
    return BadInput(["mount", image, mnt], "is not readable and writable", [tmp, image, mnt])


def bad_mountpoint_missing(tmp: Path, stack: ExitStack) -> BadInput:
    image, _ = _image_and_mountpoint(tmp)
    return BadInput(["mount", image, tmp / "nowhere"], "does not exist", [tmp, image])


def bad_mountpoint_not_empty(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    (mnt / "something").write_text("here")
    return BadInput(["mount", image, mnt], "not empty", [image, mnt, mnt / "something"])


def bad_mountpoint_already_a_mount(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    other = tmp / "other.img"
    random_image(other, 1 << 20, seed=4)
    stack.enter_context(mounted(other, mnt))
    return BadInput(["mount", image, mnt], "already a mount point", [image, other, mnt])


def bad_image_served_elsewhere(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    stack.enter_context(mounted(image, tmp / "first"))
    return BadInput(["mount", image, mnt], "already served by another fusedisk", [tmp, mnt])


def bad_image_served_elsewhere_via_symlink(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    (tmp / "alias.img").symlink_to(image)
    stack.enter_context(mounted(image, tmp / "first"))
    return BadInput(["mount", tmp / "alias.img", mnt], "already served", [tmp, image, mnt])


def bad_name_with_a_slash(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    return BadInput(["mount", image, mnt, "--name", "a/b"], "plain file name", [tmp, mnt])


def bad_name_dotdot(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    return BadInput(["mount", image, mnt, "--name", ".."], "plain file name", [tmp, mnt])


def bad_no_fusermount3(tmp: Path, stack: ExitStack) -> BadInput:
    image, mnt = _image_and_mountpoint(tmp)
    env = _no_fusermount3_env(tmp)
    return BadInput(["mount", image, mnt], "fusermount3", [image, mnt], env)


MOUNT_CASES = [
    bad_image_missing,
    bad_image_is_a_directory,
    bad_image_immutable,
    bad_mountpoint_missing,
    bad_mountpoint_not_empty,
    bad_mountpoint_already_a_mount,
    bad_image_served_elsewhere,
    bad_image_served_elsewhere_via_symlink,
    bad_name_with_a_slash,
    bad_name_dotdot,
    bad_no_fusermount3,
]


def _not_a_mount(command: str, *extra: str) -> Callable[[Path, ExitStack], BadInput]:
    def case(tmp: Path, stack: ExitStack) -> BadInput:
        image, mnt = _image_and_mountpoint(tmp)
        argv: list[str | Path] = [command, mnt, *extra]
        if command == "migrate":
            argv.insert(2, tmp / "dest.img")
        return BadInput(argv, "is not a fusedisk mount", [tmp, image, mnt])

    case.__name__ = f"{command}{'_' + '_'.join(extra) if extra else ''}_on_a_plain_directory"
    return case


def bad_status_of_a_missing_path(tmp: Path, stack: ExitStack) -> BadInput:
    return BadInput(["status", tmp / "nowhere"], "is not a fusedisk mount", [tmp])


def bad_status_of_a_plain_file(tmp: Path, stack: ExitStack) -> BadInput:
    image, _ = _image_and_mountpoint(tmp)
    return BadInput(["status", image], "is not a fusedisk mount", [tmp, image])


OTHER_CASES = [
    _not_a_mount("status"),
    _not_a_mount("status", "--json"),
    _not_a_mount("unmount"),
    _not_a_mount("migrate"),
    _not_a_mount("cancel"),
    _not_a_mount("rate", "10M"),
    bad_status_of_a_missing_path,
    bad_status_of_a_plain_file,
]


def _check_bad_input(
    tmp_path: Path, make: Callable[[Path, ExitStack], BadInput], extra: tuple[str, ...] = ()
) -> None:
    with ExitStack() as stack:
        case = make(tmp_path, stack)
        for path in case.argv:  # should a mount wrongly succeed
            if isinstance(path, Path):
                stack.callback(force_unmount, path)
        before = snapshot(*case.watch)
        argv = [sys.executable, "-m", "fusedisk", *map(str, case.argv), *extra]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            stdin=subprocess.DEVNULL,
            env=case.env,
        )
        assert_clean_error(result, case.expect)
        assert snapshot(*case.watch) == before


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("make", MOUNT_CASES, ids=lambda f: f.__name__.removeprefix("bad_"))
def test_bad_mount_input_is_one_clean_line_and_changes_nothing(
    tmp_path: Path, make: Callable[[Path, ExitStack], BadInput], foreground: bool
) -> None:
    _check_bad_input(tmp_path, make, ("--foreground",) if foreground else ())


@pytest.mark.parametrize("make", OTHER_CASES, ids=lambda f: f.__name__.removeprefix("bad_"))
def test_bad_control_input_is_one_clean_line_and_changes_nothing(
    tmp_path: Path, make: Callable[[Path, ExitStack], BadInput]
) -> None:
    _check_bad_input(tmp_path, make)


def test_unmount_without_fusermount3_is_one_clean_line(tmp_path: Path) -> None:
    image, mnt = _image_and_mountpoint(tmp_path)
    with mounted(image, mnt) as m:
        before = snapshot(image, mnt)
        result = subprocess.run(
            [sys.executable, "-m", "fusedisk", "unmount", str(mnt)],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env=_no_fusermount3_env(tmp_path),
        )
        assert m.daemon.poll() is None, "the daemon stopped"
        assert snapshot(image, mnt) == before
        assert_clean_error(result, "fusermount3")


def _dev_fuse_usable_by_others() -> bool:
    return os.stat("/dev/fuse").st_mode & 0o006 == 0o006


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is private to root)."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    probe = subprocess.run(
        [*SETPRIV, sys.executable, "-c", "import fusedisk"], capture_output=True, text=True
    )
    if probe.returncode:
        pytest.skip(f"cannot run fusedisk as uid {NOBODY}: {probe.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="fusedisk-unprivileged-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        force_unmount(path / "mnt")
        shutil.rmtree(path)


def _unprivileged_mount(shared: Path) -> tuple[BadInput, subprocess.CompletedProcess[str]]:
    image, mnt = _image_and_mountpoint(shared)
    image.chmod(0o600)  # root's, and private
    os.chown(mnt, NOBODY, NOBODY)
    case = BadInput(["mount", image, mnt, "--foreground"], "", [shared, image, mnt])
    before = snapshot(*case.watch)
    argv = [*SETPRIV, sys.executable, "-m", "fusedisk", *map(str, case.argv)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert snapshot(*case.watch) == before
    return case, result


@pytest.mark.skipif(
    _dev_fuse_usable_by_others(), reason="/dev/fuse is usable by everyone on this machine"
)
def test_fuse_device_not_usable_by_this_user(shared_dir: Path) -> None:
    _, result = _unprivileged_mount(shared_dir)
    assert_clean_error(result, "/dev/fuse")


@pytest.mark.skipif(
    not _dev_fuse_usable_by_others(),
    reason="/dev/fuse is mode 0600 here: an unprivileged user stops at /dev/fuse before the "
    "image is looked at (test_fuse_device_not_usable_by_this_user covers that error)",
)
def test_image_unreadable_by_an_unprivileged_user(shared_dir: Path) -> None:
    _, result = _unprivileged_mount(shared_dir)
    assert_clean_error(result, "is not readable and writable")


# ---- stale mounts and a second daemon ------------------------------------------------------


def test_stale_mount_is_reported_and_unmount_clears_it(tmp_path: Path) -> None:
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    data = random_image(image, 1 << 20, seed=13)
    other = tmp_path / "other.img"
    random_image(other, 1 << 20, seed=14)
    with background_mount(image, mnt) as pid:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: stat_errno(mnt) == errno.ENOTCONN, "the mount to go stale")
        commands: list[list[str | Path]] = [
            ["status"],
            ["status", "--json"],
            ["migrate", tmp_path / "dest.img"],
        ]
        for argv in commands:
            result = fusedisk(argv[0], mnt, *argv[1:], timeout=CLI_TIMEOUT)
            assert_clean_error(result, "stale mount", "fusedisk unmount")
        assert_clean_error(fusedisk("mount", other, mnt, timeout=CLI_TIMEOUT), "stale mount")
        assert not (tmp_path / "dest.img").exists()

        result = fusedisk("unmount", mnt, timeout=CLI_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
    with mounted(image, mnt) as m:  # the killed daemon's lock went with it
        assert m.file.read_bytes() == data


def test_second_mount_of_a_moving_image_leaves_the_move_alone(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    data = random_image(image, 8 << 20, seed=15)
    dest_dir = tmp_path / "new"
    dest_dir.mkdir()
    dest = dest_dir / "disk.img"
    journal = tmp_path / ".disk.img.fusedisk-move"
    second = tmp_path / "second"
    second.mkdir()
    with mounted(image, tmp_path / "mnt") as m:
        started = fusedisk("migrate", m.mountpoint, dest, "--rate", "64K", "--detach")
        assert started.returncode == 0, started.stderr
        try:
            m.wait_phase("mirroring", timeout=30)
            assert dest.exists() and journal.exists()
            result = fusedisk("mount", image, second, timeout=CLI_TIMEOUT)
            assert_clean_error(result, "already served by another fusedisk")
            assert not is_mounted(second)
            assert dest.exists(), "the refused mount deleted the running move's destination"
            assert journal.exists(), "the refused mount deleted the running move's journal"
            assert m.status()["phase"] == "mirroring"
        finally:
            fusedisk("cancel", m.mountpoint, timeout=CLI_TIMEOUT)
            force_unmount(second)
    assert image.read_bytes() == data
