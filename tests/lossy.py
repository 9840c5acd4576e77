"""Mount tests/lossyfs.py for a test: a layer that drops, on command, what was never made durable.

:func:`lossy_mount` runs lossyfs as a subprocess on a directory, waits for the mount (checking
the process is alive, with a timeout), yields a :class:`Lossy`, and at the end unmounts it
(``fusermount3 -u``, lazily if something still holds it), waits for the process to exit, kills it
only as a last resort, and checks it exited 0.  :meth:`Lossy.power_cut` sends SIGUSR1 and waits
for lossyfs's acknowledgement line, so when it returns the tree is already the durable one.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.mounting import wait_mounted

LOSSYFS = Path(__file__).with_name("lossyfs.py")
TIMEOUT = 10.0  # for a cut's acknowledgement, and for the exit after unmount


@dataclass
class Lossy:
    path: Path
    process: subprocess.Popen[bytes]
    log: Path  # lossyfs's stderr
    cuts: int = 0
    killed: bool = False

    def kill(self) -> None:
        """The filesystem dies under its users (SIGKILL): its mount answers ENOTCONN from now."""
        self.process.kill()
        self.process.wait()
        self.killed = True

    def power_cut(self) -> None:
        """Revert the whole tree to its durable state; returns once lossyfs says it has."""
        assert self.process.poll() is None, f"lossyfs died:\n{self.log.read_text()}"
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGUSR1)
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            assert selector.select(TIMEOUT), f"no power cut after {TIMEOUT} s:\n{self.log}"
        self.cuts += 1
        line = self.process.stdout.readline().decode().strip()
        assert line == f"cut {self.cuts}", f"lossyfs said {line!r}:\n{self.log.read_text()}"

    def fsync_dir(self, directory: Path) -> None:
        """Make the names in ``directory`` durable (a test's own setup, not fusedisk's)."""
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, name: str) -> Path:
        """A durable subdirectory of the root."""
        directory = self.path / name
        directory.mkdir()
        self.fsync_dir(self.path)
        return directory

    def write_durable(self, path: Path, data: bytes) -> None:
        """Create ``path`` with ``data``, as durable as a power cut can test: file and name."""
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.fsync_dir(path.parent)


@contextmanager
def lossy_mount(mountpoint: Path) -> Iterator[Lossy]:
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}-lossyfs.log"
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(LOSSYFS), str(mountpoint)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    lossy = Lossy(mountpoint, process, log)
    try:
        wait_mounted(mountpoint, process, log)
        yield lossy
    except BaseException:
        _unmount(mountpoint, process, log, check=False)  # the test's error is the one to see
        raise
    _unmount(mountpoint, process, log, check=not lossy.killed)


def _unmount(mountpoint: Path, process: subprocess.Popen[bytes], log: Path, check: bool) -> None:
    """Unmount, lazily if still busy (a test that failed may hold a file); never hangs."""
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        if not check:
            return
        raise AssertionError(f"lossyfs did not exit after unmount:\n{log.read_text()}") from None
    finally:
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0 or not check, f"lossyfs exited {code}:\n{log.read_text()}"
