"""Real mounts for tests: the daemon runs as a subprocess, as a user would run it.

Following pyfuse3's test/util.py: wait for the mount with a timeout while checking the daemon is
alive; teardown unmounts (lazily if it must), waits, kills only as a last resort, and asserts the
daemon exited cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 30.0


def fusedisk(
    *args: str | Path, timeout: float = 300.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the fusedisk CLI exactly as a user would (not checked: tests look at the result)."""
    return subprocess.run(
        [sys.executable, "-m", "fusedisk", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@dataclass
class Mounted:
    image: Path
    mountpoint: Path
    name: str
    daemon: subprocess.Popen[bytes]
    log: Path

    @property
    def file(self) -> Path:
        return self.mountpoint / self.name

    def status(self) -> dict[str, Any]:
        result = fusedisk("status", self.mountpoint, "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def wait_phase(self, *phases: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["phase"] in phases:
                return status
            assert time.monotonic() < deadline, f"phase still {status['phase']}: {status}"
            assert self.daemon.poll() is None, self.log.read_text()
            time.sleep(0.05)


def wait_mounted(mountpoint: Path, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mountpoint):
        if daemon.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            daemon.kill()
            raise AssertionError(f"not mounted after {MOUNT_TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.02)


def unmount(mountpoint: Path) -> None:
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


@contextmanager
def mounted(
    image: Path,
    mountpoint: Path,
    *extra: str,
    name: str | None = None,
    exit_code: int = 0,
    env: dict[str, str] | None = None,
) -> Iterator[Mounted]:
    """Serve ``image`` at ``mountpoint`` with a foreground daemon (in environment ``env``, or
    this one); always unmount after, and check the daemon exits with ``exit_code``."""
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}-daemon.log"
    command = [sys.executable, "-m", "fusedisk", "mount", "--foreground", str(image)]
    command += [str(mountpoint), *extra]
    if name:
        command += ["--name", name]
    with open(log, "ab") as log_file:
        daemon = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=env)
    wait_mounted(mountpoint, daemon, log)
    try:
        yield Mounted(image, mountpoint, name or image.name, daemon, log)
    finally:
        unmount(mountpoint)
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            raise AssertionError(f"daemon did not exit after unmount:\n{log.read_text()}") from None
    assert code == exit_code, f"daemon exited {code}:\n{log.read_text()}"


def random_image(path: Path, size: int, seed: int = 0) -> bytes:
    """A non-sparse image of pseudo-random bytes; returns its content."""
    data = os.urandom(size) if seed < 0 else _seeded(size, seed)
    path.write_bytes(data)
    return data


def _seeded(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)
