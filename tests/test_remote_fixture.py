"""The remote test destination (tests/remote.py) works: sshfs from a private sshd on 127.0.0.1.

Files written through the mount land in the served directory; a stopped remote holds I/O until it
is continued (or until ssh's ServerAlive timeout of about 4 s fails it with EIO); a killed remote
fails I/O at once instead of hanging; and teardown leaves no mount and no process behind, however
the remote was left.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tests.remote
from tests.remote import Remote, Sshd, alive, is_mounted, private_sshd, sshfs_mount

pytestmark = pytest.mark.mount

#: What I/O through the mount of a dead remote fails with. Measured with sshfs 3.7.3: ENOTCONN
#: once sshfs has ended (it ends itself when the connection drops), EIO for a request that was
#: waiting for the server when the connection dropped.
DEAD = {errno.ENOTCONN, errno.EIO, errno.ECONNABORTED}


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    with private_sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def remote(sshd: Sshd, tmp_path: Path) -> Iterator[Remote]:
    with sshfs_mount(sshd, tmp_path / "remote", tmp_path / "mnt") as mount:
        yield mount


class Background:
    """Run ``function`` in a daemon thread: I/O that may hang must not hang the test."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(function,), daemon=True).start()

    def _run(self, function: Callable[[], object]) -> None:
        try:
            self.value = function()
        except BaseException as error:
            self.error = error
        finally:
            self.elapsed = time.monotonic() - self.started
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def errno(self) -> int | None:
        return self.error.errno if isinstance(self.error, OSError) else None


def test_write_through_the_mount_lands_on_the_remote(remote: Remote) -> None:
    data = os.urandom(300 << 10)
    (remote.mountpoint / "written").write_bytes(data)
    assert (remote.remote_dir / "written").read_bytes() == data
    (remote.remote_dir / "served").write_bytes(data[::-1])
    assert (remote.mountpoint / "served").read_bytes() == data[::-1]

    sessions = remote.session_pids()
    assert sessions, "no sshd process serves the mount"
    assert set(sessions) <= set(remote.sshd.descendants())
    assert all(Path(f"/proc/{pid}/comm").read_text().strip() == "sshd" for pid in sessions)


def test_stopped_remote_holds_io_until_continued(remote: Remote) -> None:
    data = os.urandom(64 << 10)
    remote.stop()
    writer = Background(lambda: (remote.mountpoint / "held").write_bytes(data))
    assert not writer.wait(1.5), f"write finished on a stopped remote: {writer.error!r}"
    remote.cont()
    assert writer.wait(5.0), "write still hangs after SIGCONT"
    assert writer.error is None, writer.error
    assert (remote.remote_dir / "held").read_bytes() == data


def test_stopped_remote_fails_io_after_server_alive_timeout(remote: Remote) -> None:
    """ServerAliveInterval=1, ServerAliveCountMax=3: ssh gives up after about 4 s, and then
    sshfs fails the waiting request with EIO (not a hang until SIGCONT)."""
    with open(remote.mountpoint / "file", "wb", buffering=0) as file:
        remote.stop()
        file.write(b"x" * 4096)  # sshfs writes asynchronously: this one does not wait
        syncer = Background(lambda: os.fsync(file.fileno()))
        assert syncer.wait(10.0), "fsync on a stopped remote still hangs after 10 s"
        assert syncer.errno() == errno.EIO, syncer.error
        assert 2.0 < syncer.elapsed < 8.0, syncer.elapsed
        with pytest.raises(OSError):  # flush on close: the connection is gone
            file.close()
    assert remote.process.wait(timeout=5.0) is not None  # sshfs ends itself
    assert not is_mounted(remote.mountpoint)


def test_killed_remote_fails_io_instead_of_hanging(remote: Remote) -> None:
    (remote.remote_dir / "file").write_bytes(os.urandom(1 << 20))
    fd = os.open(remote.mountpoint / "file", os.O_RDWR)
    try:
        remote.kill()
        assert remote.session_pids() == []
        # sshfs sees the connection drop and ends itself, detaching its own mount (lazily, as
        # root): paths under the mountpoint are the empty local directory again.
        assert remote.process.wait(timeout=5.0) is not None
        assert not is_mounted(remote.mountpoint)
        operations: dict[str, Callable[[], object]] = {
            "read": lambda: os.pread(fd, 4096, 0),
            "write": lambda: os.pwrite(fd, b"y" * 4096, 0),
            "fsync": lambda: os.fsync(fd),
            "fstat": lambda: os.fstat(fd),
        }
        for name, operation in operations.items():
            outcome = Background(operation)
            assert outcome.wait(5.0), f"{name} hangs on a killed remote"
            assert outcome.errno() in DEAD, f"{name}: {outcome.error!r} {outcome.value!r}"
    finally:
        with pytest.raises(OSError) as closing:
            os.close(fd)
    assert closing.value.errno in DEAD


def test_read_in_flight_when_remote_dies_returns_eof(remote: Remote) -> None:
    """A trap for tests of moves to sshfs (sshfs 3.7.3): a read waiting for the server when
    the connection drops returns 0 bytes (end of file), not an error."""
    (remote.remote_dir / "file").write_bytes(os.urandom(1 << 20))
    with open(remote.mountpoint / "file", "rb", buffering=0) as file:
        remote.stop()
        reader = Background(lambda: os.pread(file.fileno(), 4096, 512 << 10))
        assert not reader.wait(0.5)
        remote.kill()
        assert reader.wait(5.0), "read hangs on a killed remote"
        assert reader.error is None and reader.value == b"", (reader.error, reader.value)
        with pytest.raises(OSError):
            file.close()


@pytest.mark.parametrize("fault", ["healthy", "stopped", "stopped-with-io-waiting", "killed"])
def test_teardown_leaves_nothing_behind(tmp_path: Path, fault: str) -> None:
    started = time.monotonic()
    waiting: Background | None = None
    with (
        private_sshd(tmp_path / "sshd") as server,
        sshfs_mount(server, tmp_path / "remote", tmp_path / "mnt") as mount,
    ):
        (mount.mountpoint / "file").write_bytes(b"data")
        pids = [server.process.pid, mount.process.pid, *mount.ssh_pids, *mount.session_pids()]
        assert all(alive(pid) for pid in pids)
        if fault.startswith("stopped"):
            mount.stop()
        if fault == "stopped-with-io-waiting":
            waiting = Background(lambda: (mount.mountpoint / "late").write_bytes(b"late"))
            assert not waiting.wait(0.3)
        if fault == "killed":
            mount.kill()
    assert time.monotonic() - started < 20.0
    assert not is_mounted(tmp_path / "mnt")
    assert not [pid for pid in pids if alive(pid)]
    assert server.process.returncode is not None and mount.process.returncode is not None
    if waiting is not None:
        assert waiting.wait(5.0), "I/O waiting on the stopped remote still hangs after teardown"


def test_missing_tools_fail_naming_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tests.remote, "SSHFS", "sshfs-not-installed")
    with (
        pytest.raises(pytest.fail.Exception, match=r"sshfs.*scripts/setup"),
        private_sshd(tmp_path / "sshd"),
    ):
        pass
