#!/usr/bin/env python3
"""The fusedisk demo: serve an image, use it with ordinary tools, then live-move it while a
QEMU guest writes to it with fio and verifies every block afterwards.

Everything happens in a fresh temporary directory, which is removed at the end (--keep keeps it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

BIN = Path(sys.executable).parent
BEFORE_S = 6  # seconds the guest writes before the move starts


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*command: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(str(c) for c in command)
    print(f"$ {shown}", flush=True)
    result = subprocess.run([str(c) for c in command], text=True, capture_output=True)
    output = (result.stdout + result.stderr).rstrip()
    if output:
        print(output, flush=True)
    if check and result.returncode:
        raise SystemExit(f"demo: '{shown}' failed with status {result.returncode}")
    return result


def fusedisk(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(BIN / "fusedisk", *args, check=check)


def status(mountpoint: Path) -> dict[str, object]:
    result = subprocess.run(
        [str(BIN / "fusedisk"), "status", str(mountpoint), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    reply: dict[str, object] = json.loads(result.stdout)
    return reply


def load_guest() -> ModuleType:
    """scripts/guest.py: builds the guest from Debian packages (cached) and runs fio in it."""
    path = Path(__file__).with_name("guest.py")
    spec = importlib.util.spec_from_file_location("fusedisk_guest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _mean(values: list[int]) -> float:
    return sum(values) / len(values)


def report(
    samples: list[tuple[int, int, int]], started: float, ended: float, moved: dict[str, Any]
) -> None:
    """Guest write IOPS (1 s samples, fio's clock) before, during and after the move."""
    writes = [(ms / 1000, iops) for ms, iops, ddir in samples if ddir == 1]
    before = [i for t, i in writes if t <= started]
    during = [i for t, i in writes if started < t <= ended + 1]
    after = [i for t, i in writes if t > ended + 1]
    print(f"\n{'guest 4k random writes':<24} {'IOPS (mean of 1 s samples)':>28}")
    for name, values in (("before the move", before), ("during", during), ("after", after)):
        shown = f"{_mean(values):.0f}" if values else "- (fio had written the whole disk)"
        print(f"{name:<24} {shown:>28}")
    print(
        f"move: {ended - started:.1f} s; copied {moved['copied_bytes'] >> 20} MiB, "
        f"mirrored {moved['mirrored_bytes'] >> 20} MiB, "
        f"synced by guest writes {moved['synced_by_writes_bytes'] >> 20} MiB; "
        f"guest I/O held {moved['switch_pause_ms']} ms at the switch"
    )


def demo(work: Path, size_mib: int, rate: str) -> None:
    source_dir, dest_dir, mnt = work / "old-storage", work / "new-storage", work / "mnt"
    for d in (source_dir, dest_dir, mnt):
        d.mkdir()
    image = source_dir / "vm-disk.img"

    say(f"A {size_mib} MiB raw disk image on the old storage")
    run("dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={size_mib}", "status=none")
    run("ls", "-l", image)

    say("Serve it through fusedisk: the VM's disk path is mnt/vm-disk.img, and never changes")
    fusedisk("mount", image, mnt)
    disk = mnt / "vm-disk.img"
    run("ls", "-l", mnt)
    run("stat", "-c", "%n: %s bytes, %b blocks", disk)
    run("jq", "-c", "{phase, image, size, pid}", mnt / ".status")  # the live status, as a file
    fusedisk("status", mnt)

    say("Ordinary tools read and write it (O_DIRECT, as QEMU's cache=none does)")
    run("dd", f"if={image}", f"of={disk}", "bs=1M", "count=4", "oflag=direct", "conv=notrunc")
    run("cmp", "-n", str(size_mib << 20), disk, image)

    say("Boot a QEMU guest (software emulation) whose disk is mnt/vm-disk.img, running fio:")
    print(
        "   4 KiB random writes over the whole disk, then a read-back verify (crc32c) of each block"
    )
    fio_args = [
        "--name=vm",
        "--filename=/dev/vda",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=16",
        f"--size={size_mib}M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]
    guest = load_guest()
    image_files = guest.build_guest()
    dest = dest_dir / "vm-disk.img"
    with guest.start_fio(
        disk, fio_args, guest=image_files, iops_log=True, console_log=work / "console.log"
    ) as vm:
        if not vm.wait_started(300):
            raise SystemExit("demo: the guest did not start fio; see console.log")
        fio_started = time.monotonic()
        print(f"guest booted; fio runs in it. Letting it write for {BEFORE_S} s first.")
        time.sleep(BEFORE_S)

        say(f"Live-move the disk to the new storage while the guest writes (copy rate {rate}/s)")
        move_started = time.monotonic() - fio_started
        command = [str(BIN / "fusedisk"), "migrate", str(mnt), str(dest), "--rate", rate]
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            raise SystemExit("demo: the move failed (the guest is still on the old storage)")
        move_ended = time.monotonic() - fio_started
        print("guest still running:", vm.poll() is None)
        say("The guest writes on, on the new storage alone, then reads back and verifies")
        result = vm.wait()
    if not result.ok:
        raise SystemExit(f"demo: fio in the guest failed (status {result.status})")
    job = result.fio["jobs"][0]
    moved = status(mnt)
    report(result.iops, move_started, move_ended, moved)
    print(
        f"guest fio: {job['write']['io_bytes'] >> 20} MiB written, "
        f"{job['read']['io_bytes'] >> 20} MiB read back and verified, {job['error']} errors"
    )
    run("ls", "-l", source_dir, dest_dir)

    fusedisk("unmount", mnt)
    print("\ndemo: done; the disk now lives at", dest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="image size in MiB")
    parser.add_argument("--rate", default="64M", help="copy rate limit for the move")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusedisk-demo-"))
    try:
        demo(work, args.size, args.rate)
    finally:
        mnt = work / "mnt"
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
