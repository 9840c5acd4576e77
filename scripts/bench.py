#!/usr/bin/env python3
"""fusedisk's benchmarks, one subcommand each; run as root with the venv's interpreter:

    .venv/bin/python scripts/bench.py SUBCOMMAND [options] [--json FILE]

  datapath  fio on the host against each contender, one mount each
  move      live moves, idle and under a writer, against cp, qsd and the floors (bench_move.py)
  guest     fio inside a QEMU guest on each contender, idle and during a move (bench_guest.py)
  memory    peak RSS and switch pause moving sparse images up to 64 TiB under a writer
  intent    what the write-intent record costs a writer during a move (bench_resume.py)
  resume    how much a move resumed after a SIGKILL copies again (bench_resume.py)

Contenders (benchlib.CONTENDERS): raw (the image file), floor (scripts/floor.py, a bare pyfuse3
passthrough: what the library costs), floor-mirror (floor.py writing every write to a second
file too: the floor during a move), fusedisk, qsd (qemu-storage-daemon's FUSE export), qsd-nbd
(its NBD export), fusedisk-move, fusedisk-move-deadline (with --dest-timeout 1) and qsd-move
(measured while their image moves), cp. Each repetition runs every contender once, interleaved
(a, b, c, a, b, c, ...), so the machine's noise hits all alike; tables show medians, and ratios
as median/median with the per-repetition ratios in brackets. Every subcommand prints markdown
tables; --json FILE writes them with every run's figures, the machine and the code measured.
Everything started is stopped, unmounted and removed on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

import bench_guest
import bench_move
import bench_resume
import benchlib as bl
from benchlib import CONTENDERS, JOBS, MiB, Run, Table

from fusedisk.units import parse_size

FUSECTL = Path("/sys/fs/fuse/connections")
Result = tuple[list[Table], dict[str, Any]]
Runner = Callable[[argparse.Namespace], Result]
WHERE = "where images, mounts and sockets go, all removed afterwards (%(default)s)"
SUMMARIES = {
    "datapath": "fio on the host against each contender, one mount each",
    "move": "live moves, idle and under a writer, against cp, qsd and the floors",
    "guest": "fio inside a QEMU guest on each contender, idle and during a move",
    "memory": "peak RSS and switch pause moving sparse images up to 64 TiB under a writer",
    "intent": "what the write-intent record costs a writer during a move",
    "resume": "how much a move resumed after a SIGKILL copies again",
}


# ---- datapath ---------------------------------------------------------------------------------


def datapath(args: argparse.Namespace) -> Result:
    """fio (libaio, O_DIRECT) on each contender's file, all served at once; each repetition
    runs every job on every contender in turn. A contender such as
    fusedisk@max_background=64+congestion_threshold=48 has those FUSE connection tunables set
    through fusectl, and is shown against the plain one."""
    jobs = [j for j in JOBS if j.name in args.jobs.split(",")]
    served: dict[str, bl.Served] = {}
    with ExitStack() as stack:
        for i, spec in enumerate(args.contenders):
            name, _, tunables = spec.partition("@")
            image = bl.scratch(stack, args.dir / f"c{i}-{name}.img")
            bl.make_image(image, args.size * MiB)
            served[spec] = CONTENDERS[name].serve(stack, image, args.dir)
            if tunables:
                set_tunables(stack, served[spec].file, tunables)
            bl.warm(image)

        def one(entry: str) -> Run:  # "JOB CONTENDER"
            job, name = entry.split()
            return fio_job(args, next(j for j in jobs if j.name == job), served[name])

        def describe(r: Run) -> str:
            return f"{r['iops']:.0f} IOPS, {r['mibs']:.1f} MiB/s, p99 {r['p99_ms']:.2f} ms"

        plan = [f"{job.name} {name}" for job in jobs for name in args.contenders]
        runs = bl.interleave(args.reps, plan, one, describe)
        profiles: dict[str, Any] = {}
        for job in jobs if args.profile and "fusedisk" in served else []:
            raw = args.profile / f"datapath-{job.name}.pyspy.txt"
            with bl.profiled(served["fusedisk"].pid, raw, args.native) as profiles[job.name]:
                figures = fio_job(args, job, served["fusedisk"])
            profiles[job.name]["fio_under_profiler"] = figures
    return datapath_tables(args, jobs, runs, profiles), {"runs": runs, "profiles": profiles}


def fio_job(args: argparse.Namespace, job: bl.Job, served: bl.Served) -> Run:
    """One fio run, with the serving daemon's CPU and the whole machine's over it."""
    os.sync()  # no dirty pages from the run before
    pid, machine0, t0 = served.pid, bl.cpu_times(), time.monotonic()
    cpu0 = bl.cpu_seconds(pid) if pid else 0.0
    fio = [*job.args(served.file), *bl.fio_timing(args.runtime, args.ramp)]
    r = bl.job_figures(bl.run_fio(fio, args.runtime + args.ramp + 120), [job])[job.name]
    wall = time.monotonic() - t0
    r["machine_busy"] = bl.busy(machine0, bl.cpu_times())  # 1.0: both cores, anyone's
    if pid:  # over the whole run, ramp included
        cpu = bl.cpu_seconds(pid) - cpu0
        r["daemon_cores"] = round(cpu / wall, 3)
        r["daemon_us_per_io"] = round(cpu * 1e6 / max(1.0, r["iops"] * wall), 1)
    return r


def set_tunables(stack: ExitStack, file: Path, tunables: str) -> None:
    if not bl.is_mounted(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=True)
        bl.on_exit(stack, "umount fusectl", subprocess.run, ["umount", str(FUSECTL)])
    connection = FUSECTL / str(os.stat(file).st_dev)
    for item in tunables.split("+"):
        key, _, number = item.partition("=")
        bl.log(f"{file}: {key} {(connection / key).read_text().strip()} -> {number}")
        (connection / key).write_text(f"{int(number)}\n")


def datapath_tables(
    args: argparse.Namespace, jobs: list[bl.Job], runs: dict[str, Any], profiles: dict[str, Any]
) -> list[Table]:
    def figures(name: str, job: bl.Job) -> list[float]:
        return bl.values(runs.get(f"{job.name} {name}", []), job.metric)

    main = bl.idle_table(
        f"Data path: fio libaio direct=1, {args.size} MiB images, {args.runtime:g} s + "
        f"{args.ramp:g} s ramp, medians of {args.reps} (IOPS for 4 KiB, MiB/s for 1 MiB; "
        "a tuned contender's ratio to the plain one in brackets)",
        args.contenders,
        jobs,
        figures,
    )
    cpu = Table(
        "Where the CPU goes (medians): the serving daemon's CPU per request and in cores, "
        "fio's own, and how busy the 2-core machine was (anyone's load)",
        ["job", "contender", "p99 (ms)", "daemon us/io", "daemon cores", "fio cores", "busy"],
    )
    keys = ("p99_ms", "daemon_us_per_io", "daemon_cores", "fio_cores", "machine_busy")
    for job in jobs:
        for name in args.contenders:
            cpu.add(job.name, name, *(bl.med(runs[f"{job.name} {name}"], key) for key in keys))
    profile_tables = [bl.profile_table(f"fusedisk during {j}", p) for j, p in profiles.items()]
    return [main, cpu, *profile_tables]


# ---- memory -----------------------------------------------------------------------------------


def memory(args: argparse.Namespace) -> Result:
    """Move sparse images of each virtual size that hold --data MiB of random data (16 MiB
    extents spread evenly) while fio writes 4 KiB at random offsets across the whole virtual
    size (move's writer, without fio's random map): the daemon's peak RSS (VmHWM) before and
    after the move, the switch pause, the move's time, and its single-pass accounting (copied +
    synced by writes + holes = size).  Sizes past the filesystem's limit (ext4: 16 TiB) need
    --dir on tmpfs or xfs, like /dev/shm."""
    table = Table(
        f"Moving a sparse image holding {args.data} MiB of data while fio writes 4 KiB at "
        "random offsets across the whole disk (QD16): the daemon's peak RSS, the switch pause",
        [
            *("virtual size", "RSS before (MiB)", "RSS after (MiB), <= 64", "pause (ms), <= 2"),
            "move (s)",
            *("copied (MiB)", "synced by writes (MiB)", "holes (GiB)", "accounting", "writer IOPS"),
        ],
    )
    runs: dict[str, Run] = {}
    for size in args.sizes:
        with ExitStack() as stack:
            image = bl.scratch(stack, args.dir / f"rss-{size}.img")
            bl.make_sparse(image, parse_size(size), args.data * MiB)
            served = bl.serve_fusedisk(stack, image, args.dir)
            before = peak_rss_kib(served.pid)
            prefix = args.dir / f"rss-{size}-writer"
            writer = bench_move.Writer(stack, served, prefix, ["--norandommap=1"])
            move = bl.FusediskMove(stack, served, args.dir / f"rss-{size}.dest", 0)
            started = time.time()
            move.start(0)
            r = move.wait()
            r["writer"] = writer.stop({"during": started})["during"]
            r["rss_before_kib"], r["rss_after_kib"] = before, peak_rss_kib(served.pid)
            runs[size] = r
        total = r["copied_bytes"] + r["synced_by_writes_bytes"] + r["hole_bytes"]
        table.add(
            size,
            f"{before / 1024:.0f}",
            f"{r['rss_after_kib'] / 1024:.0f} {bl.verdict(r['rss_after_kib'] / 1024, 64, True)}",
            f"{r['switch_pause_ms']:.2f} {bl.verdict(r['switch_pause_ms'], 2, at_most=True)}",
            r["move_s"],
            f"{r['copied_bytes'] / MiB:.0f}",
            f"{r['synced_by_writes_bytes'] / MiB:.1f}",
            f"{r['hole_bytes'] / 2**30:.0f}",
            "exact" if total == r["size"] else f"OFF by {total - r['size']}",
            r["writer"]["iops"],
        )
    return [table], {"runs": runs}


def peak_rss_kib(pid: int | None) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


# ---- command line -----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, run: Runner, reps: int, doc: str | None) -> argparse.ArgumentParser:
        doc = inspect.cleandoc(doc or "")
        s = sub.add_parser(name, description=doc, formatter_class=fmt, help=SUMMARIES[name])
        s.set_defaults(run=run)
        s.add_argument("--dir", type=Path, default=Path("/var/tmp/fusedisk-bench"), help=WHERE)
        s.add_argument("--size", type=int, default=1024, help="image size in MiB (%(default)s)")
        s.add_argument("--reps", type=int, default=reps, help="repetitions (%(default)s)")
        s.add_argument("--json", type=Path, help="write the tables and every figure here")
        return s

    def fio(s: argparse.ArgumentParser, runtime: float) -> None:
        s.add_argument("--runtime", type=float, default=runtime, help="s per job (%(default)s)")
        s.add_argument("--ramp", type=float, default=1, help="fio ramp_time (%(default)s)")

    def profile(s: argparse.ArgumentParser) -> None:
        s.add_argument("--profile", type=Path, metavar="DIR", help="afterwards, py-spy fusedisk")
        s.add_argument("--native", action="store_true", help="py-spy C frames too (pauses it)")

    def contenders(s: argparse.ArgumentParser, allowed: tuple[str, ...], n: int) -> None:
        s.set_defaults(allowed=allowed)
        help = f"any of {', '.join(allowed)} (default: %(default)s)"
        s.add_argument("--contenders", default=",".join(allowed[:n]), help=help)

    s = command("datapath", datapath, 3, datapath.__doc__)
    fio(s, 10)
    contenders(s, ("raw", "floor", "fusedisk", "qsd", "floor-mirror"), 4)
    s.add_argument("--jobs", default=",".join(j.name for j in JOBS), help="%(default)s")
    profile(s)

    s = command("move", bench_move.run, 3, bench_move.__doc__)
    s.add_argument("--scenarios", default="idle,load", help="idle, load, split (%(default)s)")
    s.add_argument("--before", type=float, default=5, help="writer s before the move (5)")
    s.add_argument("--after", type=float, default=5, help="writer s after the move (5)")
    s.add_argument("--ramp", type=float, default=1.5, help="writer warm-up s, not counted (1.5)")
    s.add_argument("--rate", default="0", help="copy rate limit of the movers, like 200M")
    s.add_argument("--remote", action="store_true", help="move to sshfs from a private sshd")
    profile(s)

    s = command("guest", bench_guest.run, 2, bench_guest.__doc__)
    fio(s, 8)
    contenders(s, bench_guest.NAMES, len(bench_guest.NAMES))
    s.add_argument("--span", type=int, default=50, help="%% of the disk fio uses (%(default)s)")
    s.add_argument("--rate", default="auto", help="move rate, like 10M (auto: see above)")
    s.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    s.add_argument("--keep-logs", action="store_true", help="keep the guests' consoles")

    s = command("memory", memory, 1, memory.__doc__)
    s.add_argument("--sizes", nargs="+", default=["1G", "1T", "64T"], help="%(default)s")
    s.add_argument("--data", type=int, default=1024, help="MiB of data (%(default)s)")

    bench_resume.register(command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "contenders"):
        args.contenders = args.contenders.split(",")
        unknown = {c.partition("@")[0] for c in args.contenders} - set(args.allowed)
        if unknown or len(set(args.contenders)) < len(args.contenders):
            raise SystemExit(f"bench: unknown or repeated contenders: {sorted(unknown)}")
    args.dir = args.dir.absolute()
    args.dir.mkdir(parents=True, exist_ok=True)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM and SIGHUP unwind like Ctrl-C; SIGINT too when started with it ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)
    notes, started = bl.machine_notes(args.dir), time.time()
    tables, data = args.run(args)
    notes |= {"loadavg_at_end": os.getloadavg(), "duration_s": round(time.time() - started)}
    bl.report(args, notes, tables, data)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
