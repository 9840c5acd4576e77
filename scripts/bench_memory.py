#!/usr/bin/env python3
"""Peak RSS of the fusedisk daemon across a move, for sparse images of several sizes.

Each image is sparse with 64 MiB of random data; the daemon's VmHWM (peak resident set) is read
from /proc before and after the move.  Prints a table and, with --json PATH, the same as JSON.
Usage: .venv/bin/python scripts/bench_memory.py [--sizes 1G 8G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent / "fusedisk"
UNITS = {"M": 1 << 20, "G": 1 << 30}


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def measure(work: Path, size: str) -> dict[str, object]:
    source, mnt, dest = work / f"src-{size}.img", work / f"mnt-{size}", work / f"dst-{size}.img"
    mnt.mkdir()
    with open(source, "wb") as f:
        f.truncate(int(size[:-1]) * UNITS[size[-1]])
        f.seek(100 << 20)
        f.write(os.urandom(64 << 20))
    subprocess.run([BIN, "mount", source, mnt], check=True)
    try:
        status = json.loads(
            subprocess.run(
                [BIN, "status", mnt, "--json"], check=True, capture_output=True, text=True
            ).stdout
        )
        before = peak_rss_kib(status["pid"])
        subprocess.run([BIN, "migrate", mnt, dest], check=True, capture_output=True)
        after = peak_rss_kib(status["pid"])
    finally:
        subprocess.run([BIN, "unmount", mnt], check=True)
    return {"size": size, "peak_rss_kib_before": before, "peak_rss_kib_after_move": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["1G", "8G"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fusedisk-rss-") as tmp:
        rows = [measure(Path(tmp), size) for size in args.sizes]
    print(f"{'image':>6} {'peak RSS before move':>22} {'peak RSS after move':>21}")
    for row in rows:
        print(
            f"{row['size']:>6} {row['peak_rss_kib_before']:>19} KiB "
            f"{row['peak_rss_kib_after_move']:>18} KiB"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
