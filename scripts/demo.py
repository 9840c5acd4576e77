#!/usr/bin/env python3
"""The fusedisk demo: serve an image, use it with ordinary tools, live-move it under fio.

Everything happens in a fresh temporary directory, which is removed at the end (--keep keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


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
    run("getfattr", "-d", "-m", "-", disk)
    fusedisk("status", mnt)

    say("Ordinary tools read and write it (O_DIRECT, as QEMU's cache=none does)")
    run("dd", f"if={image}", f"of={disk}", "bs=1M", "count=4", "oflag=direct", "conv=notrunc")
    run("cmp", "-n", str(size_mib << 20), disk, image)

    say(f"Live-move it while fio writes over the whole disk and then verifies it (rate {rate}/s)")
    fio = subprocess.Popen(
        [
            "fio",
            "--name=vm",
            f"--filename={disk}",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=8",
            f"--size={size_mib}M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    dest = dest_dir / "vm-disk.img"
    try:
        fusedisk("migrate", mnt, dest, "--rate", rate)
    finally:
        fio_out, fio_err = fio.communicate(timeout=600)
    if fio.returncode != 0:
        raise SystemExit(f"demo: fio failed during the move: {fio_err.strip()}")
    job = json.loads(fio_out)["jobs"][0]
    print(
        f"fio: {job['write']['iops']:.0f} write IOPS across the move; verify read back "
        f"{job['read']['io_bytes'] >> 20} MiB with {job['error']} errors"
    )
    moved = status(mnt)
    print(
        f"phase {moved['phase']}; copied {moved['copied_bytes']} bytes, "
        f"mirrored {moved['mirrored_bytes']}, synced by writes {moved['synced_by_writes_bytes']}; "
        f"I/O held {moved['switch_pause_ms']} ms at the switch"
    )
    run("ls", "-l", source_dir, dest_dir)
    run("cmp", disk, dest)

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
