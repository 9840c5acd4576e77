"""``fusedisk list``: every fusedisk mount on the host at a glance (tier 4: real daemons).

Other tests may run at the same time on this host, so each test looks only at the entries of
its own mountpoints, never at the whole list's length.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from fusedisk.control import SURVEY_TIMEOUT, daemon_sockets, runtime_dir
from fusedisk.daemon import runtime_name
from tests.lossy import lossy_mount
from tests.mounting import fusedisk, random_image
from tests.test_mount import background_mount, wait_until

pytestmark = pytest.mark.mount

TIMEOUT = 60.0


def listed(*mountpoints: Path) -> dict[Path, dict[str, Any]]:
    """``fusedisk list --json``, the entries of ``mountpoints`` only."""
    result = fusedisk("list", "--json", timeout=TIMEOUT)
    assert result.returncode == 0 and result.stderr == "", result
    entries = json.loads(result.stdout)
    assert isinstance(entries, list)
    return {Path(e["mountpoint"]): e for e in entries if Path(e["mountpoint"]) in mountpoints}


def text_rows(*mountpoints: Path) -> dict[Path, str]:
    """``fusedisk list``, the rows of ``mountpoints`` only."""
    result = fusedisk("list", timeout=TIMEOUT)
    assert result.returncode == 0 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MOUNTPOINT", "IMAGE", "SIZE", "PID", "PHASE", "MOVE"]
    return {m: line for m in mountpoints for line in lines if line.startswith(f"{m} ")}


def disks(tmp: Path, *sizes: int) -> list[tuple[Path, Path]]:
    """An image of each size (seeded random bytes), and a mountpoint for each."""
    pairs = []
    for i, size in enumerate(sizes):
        image, mnt = tmp / f"disk{i}.img", tmp / f"mnt{i}"
        random_image(image, size, seed=i)
        pairs.append((image, mnt))
    return pairs


def test_list_shows_every_mount_and_every_move(tmp_path: Path) -> None:
    """Image, size, daemon pid and phase of each mount; progress and rate of a running move;
    the daemon's log; a FUSE mount that is not fusedisk's is not listed."""
    (idle_image, idle), (moving_image, moving) = disks(tmp_path, 1 << 20, 16 << 20)
    dest = tmp_path / "moved.img"
    with ExitStack() as stack:
        idle_pid = stack.enter_context(background_mount(idle_image, idle))
        moving_pid = stack.enter_context(background_mount(moving_image, moving))
        other = stack.enter_context(lossy_mount(tmp_path / "lossy")).path
        started = fusedisk("migrate", moving, dest, "--rate", "2M", "--detach")
        assert started.returncode == 0, started.stderr
        try:
            wait_until(lambda: listed(moving)[moving]["rate"] > 0, "a copy rate to show")
            entries = listed(idle, moving, other)
            assert set(entries) == {idle, moving}
            e = entries[idle]
            assert (e["state"], e["image"], e["size"]) == ("serving", str(idle_image), 1 << 20)
            assert (e["pid"], e["phase"]) == (idle_pid, "idle")
            prefix = f"{runtime_dir()}/{runtime_name(str(idle))}."
            assert e["log"].startswith(prefix) and os.path.exists(e["log"])
            e = entries[moving]
            assert (e["state"], e["pid"], e["phase"]) == ("serving", moving_pid, "mirroring")
            assert (e["destination"], e["total_bytes"]) == (str(dest), 16 << 20)
            assert 0 < e["progress_bytes"] < e["total_bytes"] and e["rate"] > 0

            rows = text_rows(idle, moving)
            expected = [str(idle), str(idle_image), "1.0", "MiB", str(idle_pid), "idle", "-"]
            assert rows[idle].split() == expected
            assert str(moving_image) in rows[moving] and f" {moving_pid} " in rows[moving]
            assert "mirroring" in rows[moving] and "% of 16.0 MiB at " in rows[moving]
            assert rows[moving].endswith(f"/s to {dest}")
        finally:
            fusedisk("cancel", moving, timeout=TIMEOUT)


def test_list_names_a_stale_mount_the_command_that_clears_it_and_its_log(tmp_path: Path) -> None:
    (image, stale), (other_image, alive) = disks(tmp_path, 1 << 20, 1 << 20)
    with ExitStack() as stack:
        pid = stack.enter_context(background_mount(image, stale))
        stack.enter_context(background_mount(other_image, alive))
        entries = listed(stale)
        log = entries[stale]["log"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: listed(stale)[stale]["state"] == "stale", "the mount to go stale")

        entries = listed(stale, alive)
        assert entries[stale] == {
            "mountpoint": str(stale),
            "owner_uid": os.getuid(),
            "state": "stale",
            "clear": f"fusedisk unmount {stale}",
            "log": log,
        }
        assert os.path.exists(log), "the dead daemon's log was removed"
        assert entries[alive]["state"] == "serving"
        row = text_rows(stale)[stale]
        assert row.split()[:5] == [str(stale), "-", "-", "-", "stale"]
        assert f"clear with 'fusedisk unmount {stale}'; its log is kept at {log}" in row

        result = fusedisk("unmount", stale, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert stale not in listed(stale)
        assert daemon_sockets(str(stale)) == [], "the dead daemon's socket was left"
        os.unlink(log)  # kept for the reader: this test has read it


def test_list_does_not_wait_forever_for_a_stopped_daemon(tmp_path: Path) -> None:
    (image, stopped), (other_image, alive) = disks(tmp_path, 1 << 20, 1 << 20)
    with ExitStack() as stack:
        pid = stack.enter_context(background_mount(image, stopped))
        stack.enter_context(background_mount(other_image, alive))
        os.kill(pid, signal.SIGSTOP)
        stack.callback(os.kill, pid, signal.SIGCONT)
        began = time.monotonic()
        entries = listed(stopped, alive)
        took = time.monotonic() - began
        assert entries[stopped]["state"] == "not answering", entries[stopped]
        assert entries[alive]["state"] == "serving"
        assert SURVEY_TIMEOUT <= took < SURVEY_TIMEOUT + 5, took
