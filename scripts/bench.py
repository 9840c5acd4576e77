#!/usr/bin/env python3
"""fusedisk's benchmarks, one subcommand each; run as root with the venv's interpreter:

    .venv/bin/python scripts/bench.py SUBCOMMAND [options] [--json FILE]

Tables show medians of repetitions that run every contender in turn (a, b, c, a, b, c, ...),
and ratios as median/median with the per-repetition ratios in brackets; --json FILE writes them
with every figure, the machine and the code measured. Everything started is stopped, unmounted
and removed on exit, error, Ctrl-C or SIGTERM. Adding a subcommand: scripts/benchlib.py.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

import bench_guest
import bench_move
import bench_resume
import benchlib as bl
from benchlib import CONTENDERS, JOBS, MiB, Result, Run, Table

from fusedisk.units import parse_size


def datapath_options(p: argparse.ArgumentParser) -> None:
    bl.fio_options(p, runtime=10)
    bl.contenders_option(p, ("raw", "floor", "fusedisk", "qsd", "floor-mirror", "floor-stock"), 4)
    p.add_argument("--jobs", default=",".join(j.name for j in JOBS), help="%(default)s")


def datapath(args: argparse.Namespace) -> Result:
    """fio on the host against each contender, one mount each.

    fio (libaio, O_DIRECT) on each contender's file, all served at once; each repetition runs
    every job on every contender in turn."""
    jobs = [j for j in JOBS if j.name in args.jobs.split(",")]
    with ExitStack() as stack:
        served = {
            name: bl.prepare(stack, name, args.dir / f"c{i}-{name}.img", args.size * MiB)[0]
            for i, name in enumerate(args.contenders)
        }

        def one(entry: str) -> Run:  # "JOB CONTENDER"
            job, name = entry.split()
            return fio_job(args, next(j for j in jobs if j.name == job), served[name])

        plan = [f"{job.name} {name}" for job in jobs for name in args.contenders]
        runs = bl.interleave(args.reps, plan, one)

    def metric(name: str, job: bl.Job) -> list[float]:
        return bl.values(runs.get(f"{job.name} {name}", []), job.metric)

    main = bl.idle_table(
        f"Data path: fio libaio direct=1, {args.size} MiB images, {args.runtime:g} s + "
        f"{args.ramp:g} s ramp, medians of {args.reps} (IOPS for 4 KiB, MiB/s for 1 MiB)",
        args.contenders,
        jobs,
        metric,
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
    return [main, cpu], {"runs": runs}


def fio_job(args: argparse.Namespace, job: bl.Job, served: bl.Served) -> Run:
    """One fio run, with the serving daemon's CPU and the whole machine's over it."""
    os.sync()  # no dirty pages from the run before
    pid, machine0, t0 = served.pid, bl.cpu_times(), time.monotonic()
    cpu0 = bl.cpu_seconds(pid) if pid else 0.0
    fio = ["fio", "--output-format=json", *job.args(served.file)]
    timeout = args.runtime + args.ramp + 120
    out = bl.run(*fio, *bl.fio_timing(args.runtime, args.ramp), timeout=timeout)
    figures = bl.job_figures(bl.parse_fio(out), [job])[job.name]
    wall = time.monotonic() - t0
    figures["machine_busy"] = bl.busy(machine0, bl.cpu_times())  # 1.0: both cores, anyone's
    if pid:  # over the whole run, ramp included
        cpu = bl.cpu_seconds(pid) - cpu0
        figures["daemon_cores"] = round(cpu / wall, 3)
        figures["daemon_us_per_io"] = round(cpu * 1e6 / max(1.0, figures["iops"] * wall), 1)
    return figures


def memory_options(p: argparse.ArgumentParser) -> None:
    p.set_defaults(reps=1)  # each size once unless --reps; --size is not used
    p.add_argument("--sizes", nargs="+", default=["1G", "1T", "64T"], help="%(default)s")
    p.add_argument("--data", type=int, default=1024, help="MiB of data (%(default)s)")
    p.add_argument(
        "--writer-iops",
        type=int,
        default=5000,
        help="the writer's rate limit, 0: none (%(default)s; unthrottled, each write a new page "
        "of both files, a tmpfs --dir outgrows memory before a 1 TiB move ends)",
    )


def memory(args: argparse.Namespace) -> Result:
    """peak RSS and switch pause moving sparse images up to 64 TiB under a writer.

    A sparse image of each of --sizes holding --data MiB in 16 MiB extents spread evenly, moved
    while fio writes 4 KiB at random offsets across all of it (without fio's random map, at most
    --writer-iops): the daemon's peak RSS (VmHWM) before and after, the switch pause, and the
    move's single-pass accounting (copied + synced by writes + holes = size). Sizes past the
    filesystem's limit (ext4: 16 TiB) need --dir on tmpfs or xfs, like /dev/shm."""
    table = Table(
        f"Moving a sparse image holding {args.data} MiB of data while fio writes 4 KiB at "
        f"random offsets across the whole disk (QD16, at most {args.writer_iops or 'any'} "
        "IOPS): the daemon's peak RSS, the switch pause",
        [
            *("virtual size", "RSS before (MiB)", "RSS after (MiB), <= 64", "pause (ms), <= 2"),
            "move (s)",
            *("copied (MiB)", "synced by writes (MiB)", "holes (GiB)", "accounting", "writer IOPS"),
        ],
    )
    data = args.data * MiB
    plan = [f"{size} {rep + 1}" for rep in range(args.reps) for size in args.sizes]
    runs: dict[str, Run] = {}
    for entry in plan:  # each size in turn, then again: the machine's noise hits all alike
        bl.log(f"moving {entry.replace(' ', ', repetition ')}")
        size = entry.split()[0]
        with ExitStack() as stack:
            image, dest = args.dir / f"rss-{size}.img", args.dir / f"rss-{size}.dest"
            served, move = bl.prepare(stack, "fusedisk-move", image, parse_size(size), dest, data)
            assert move is not None
            before = peak_rss_kib(served.pid)
            prefix = args.dir / f"rss-{size}-writer"
            limit = [f"--rate_iops={args.writer_iops}"] if args.writer_iops else []
            writer = bl.Writer(stack, served, prefix, ["--norandommap=1", *limit])
            started = time.time()
            move.start(0)
            r = move.wait()
            r["writer"] = writer.stop({"during": started})["during"]
            r["rss_before_kib"], r["rss_after_kib"] = before, peak_rss_kib(served.pid)
            runs[entry] = r
    for entry in sorted(plan, key=lambda e: (args.sizes.index(e.split()[0]), e)):
        r = runs[entry]
        total = r["copied_bytes"] + r["synced_by_writes_bytes"] + r["hole_bytes"]
        table.add(
            entry.split()[0] if args.reps == 1 else entry.replace(" ", " #"),
            f"{r['rss_before_kib'] / 1024:.0f}",
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


def convert_options(p: argparse.ArgumentParser) -> None:
    bl.contenders_option(p, ("raw", "fusedisk", "qsd"), 3)
    p.add_argument("--data", type=int, default=512, help="MiB of data (%(default)s)")


def convert(args: argparse.Namespace) -> Result:
    """qemu-img convert of a sparse image from each contender (SEEK_DATA/SEEK_HOLE).

    `qemu-img convert -O raw` of a sparse raw image (--size MiB holding --data MiB in 16 MiB
    extents spread evenly, one image per contender) from each contender's file to a new file
    beside it: seconds per conversion. Only where SEEK_DATA/SEEK_HOLE pass through does it read
    the data alone; elsewhere it reads the whole virtual size."""
    size, data = args.size * MiB, args.data * MiB
    with ExitStack() as stack:
        files = {  # sparse images, whose data stays cached
            name: bl.prepare(stack, name, args.dir / f"c{i}-{name}.img", size, data=data)[0].file
            for i, name in enumerate(args.contenders)
        }
        out = bl.scratch(stack, args.dir / "converted.img")

        def one(name: str) -> Run:
            bl.remove(out)
            os.sync()  # no dirty pages from the run before
            started = time.monotonic()
            bl.run("qemu-img", "convert", "-f", "raw", "-O", "raw", files[name], out, timeout=3600)
            return {"seconds": time.monotonic() - started, "allocated": out.stat().st_blocks * 512}

        runs = bl.interleave(args.reps, args.contenders, one)
    table = Table(
        f"qemu-img convert -O raw of a {args.size} MiB raw image holding {args.data} MiB of data "
        f"(16 MiB extents), seconds, medians of {args.reps} (per-repetition ratios in brackets)",
        ["contender", "seconds", "/ raw", "output allocated (MiB)", "fusedisk <= 1.5 x raw"],
    )
    raw = bl.values(runs["raw"], "seconds") if "raw" in runs else []
    for name, r in runs.items():
        against = bl.compare(bl.values(r, "seconds"), raw)
        goal = bl.verdict(against[0], 1.5, at_most=True) if name == "fusedisk" else ""
        table.add(name, bl.med(r, "seconds"), against[1], bl.med(r, "allocated") / MiB, goal)
    return [table], {"runs": runs}


Options = Callable[[argparse.ArgumentParser], None]
# Every subcommand: its options, and what runs it (whose docstring is its --help).
SUBCOMMANDS: dict[str, tuple[Options, Callable[[argparse.Namespace], Result]]] = {
    "datapath": (datapath_options, datapath),
    "move": (bench_move.options, bench_move.run),
    "guest": (bench_guest.options, bench_guest.run),
    "memory": (memory_options, memory),
    "convert": (convert_options, convert),
    "intent": (bench_resume.intent_options, bench_resume.cost),
    "resume": (bench_resume.resume_options, bench_resume.resume),
}


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    about = [f"  {name}: {c.about}" for name, c in CONTENDERS.items()]
    epilog = "\n".join(["contenders (scripts/benchlib.py, CONTENDERS):", *about])
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (options, run) in SUBCOMMANDS.items():
        doc = inspect.getdoc(run) or name
        s = sub.add_parser(
            name, description=doc, help=doc.splitlines()[0].rstrip("."), formatter_class=raw
        )
        s.set_defaults(run=run)
        where = "where images, mounts and sockets go, all removed afterwards (%(default)s)"
        s.add_argument("--dir", type=Path, default=Path("/var/tmp/fusedisk-bench"), help=where)
        s.add_argument("--json", type=Path, help="write the tables and every figure here")
        s.add_argument("--size", type=int, default=1024, help="image size in MiB (%(default)s)")
        s.add_argument("--reps", type=int, default=3, help="repetitions (%(default)s)")
        options(s)
    args = parser.parse_args(argv)
    args.dir = args.dir.absolute()
    args.dir.mkdir(parents=True, exist_ok=True)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM and SIGHUP unwind like Ctrl-C; SIGINT too when started with it ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)
    notes, started = bl.machine_notes(args.dir), time.time()
    result = args.run(args)
    notes |= {"loadavg_at_end": os.getloadavg(), "duration_s": round(time.time() - started)}
    bl.report(args, notes, result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
