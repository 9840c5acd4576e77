#!/usr/bin/env python3
"""Data-path benchmark: fio against the raw file, a fusedisk mount and qemu-storage-daemon.

    .venv/bin/python scripts/bench.py [--runtime 10] [--reps 3] [--json results.json]

In one run, on identical non-sparse images (1 GiB by default) in --dir, fio (libaio, direct=1)
runs each job against every target, interleaved per repetition (raw, fusedisk, qsd, raw, ...) so
that the machine's noise hits all targets alike; medians over the repetitions are compared as
ratios.  Jobs: 4 KiB random read and write at iodepth 16, 1 MiB sequential read and write at
iodepth 8.  Targets:

    raw        the backing file itself (O_DIRECT to the disk under --dir)
    fusedisk   `fusedisk mount` of an identical file: MOUNT/disk
    qsd        qemu-storage-daemon's FUSE export of an identical file (see shared/GUEST.md)

A target may carry FUSE connection tunables, set through fusectl after mounting, to test them
side by side, for example ``fusedisk@max_background=64+congestion_threshold=48``.  Ratios are
always fusedisk/qsd and fusedisk/raw of the plain targets; a tuned variant is shown against its
plain one.  ``--profile DIR`` then runs each job once more on fusedisk under py-spy and prints
the top frames.  Everything started is stopped and unmounted on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    metric: str  # "iops" or "mibs": what the target ratio is judged on
    target: float  # minimum fusedisk/qsd ratio

    @property
    def direction(self) -> str:
        return "read" if "read" in self.rw else "write"


JOBS = (
    Job("4k-randread-qd16", "randread", "4k", 16, "iops", 0.5),
    Job("4k-randwrite-qd16", "randwrite", "4k", 16, "iops", 0.9),
    Job("1m-seqread-qd8", "read", "1M", 8, "mibs", 1.0),
    Job("1m-seqwrite-qd8", "write", "1M", 8, "mibs", 0.8),
)
TUNABLES = ("max_background", "congestion_threshold")


@dataclass
class Target:
    label: str
    kind: str  # raw, fusedisk or qsd
    tunables: dict[str, int]
    image: Path = Path()
    file: Path = Path()
    pid: int | None = None  # the serving daemon, for CPU accounting and profiling
    defaults: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Target:
        kind, _, rest = spec.partition("@")
        if kind not in ("raw", "fusedisk", "qsd"):
            raise ValueError(f"unknown target {kind!r} (raw, fusedisk, qsd)")
        tunables: dict[str, int] = {}
        for item in filter(None, rest.split("+")):
            key, _, value = item.partition("=")
            if key not in TUNABLES or kind == "raw":
                raise ValueError(f"{spec}: tunables are {', '.join(TUNABLES)}, on FUSE targets")
            tunables[key] = int(value)
        return cls(spec, kind, tunables)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp/fusedisk-bench"),
        help="where images and mounts go (default: %(default)s)",
    )
    p.add_argument("--size", type=int, default=1024, help="image size in MiB (default: 1024)")
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio job (default: 10)")
    p.add_argument("--ramp", type=float, default=1, help="fio ramp_time seconds (default: 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default: 3)")
    p.add_argument("--targets", default="raw,fusedisk,qsd", help="default: %(default)s")
    p.add_argument("--jobs", default=",".join(j.name for j in JOBS), help="default: all")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="afterwards, py-spy each job on fusedisk; raw profiles go to DIR",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="profile C frames too (pyfuse3, syscalls); py-spy then pauses the daemon to sample",
    )
    return p.parse_args(argv)


# ---- running ------------------------------------------------------------------------------


def setup_targets(args: argparse.Namespace, cleanup: bl.Cleanup, targets: list[Target]) -> None:
    size = args.size * bl.MiB
    if any(t.tunables for t in targets):
        bl.ensure_fusectl(cleanup)
    for i, t in enumerate(targets):
        t.image = args.dir / f"t{i}-{t.kind}.img"
        cleanup.push(f"image {t.image}", functools.partial(bl.remove, t.image))
        bl.log(f"writing {size >> 20} MiB non-sparse image {t.image}")
        bl.make_image(t.image, size)
        if t.kind == "raw":
            t.file = t.image
        elif t.kind == "fusedisk":
            mount = bl.mount_fusedisk(cleanup, t.image, args.dir / f"t{i}-mnt")
            t.file, t.pid = mount.file, mount.pid
        else:
            qsd = bl.start_qsd(cleanup, t.image, args.dir / f"t{i}-qsd.export", args.dir)
            t.file, t.pid = qsd.file, qsd.proc.pid
        if t.kind != "raw":
            bl.ensure_fusectl(cleanup)
            t.defaults = bl.read_tunables(t.file)
            if t.tunables:
                bl.set_tunables(t.file, t.tunables)
        bl.warm(t.image)
        bl.log(f"target {t.label}: {t.file} (FUSE defaults {t.defaults or '-'})")


def fio_args(job: Job, file: Path, runtime: float, ramp: float) -> list[str]:
    return [
        f"--name={job.name}",
        f"--filename={file}",
        "--ioengine=libaio",
        "--direct=1",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        "--numjobs=1",
        f"--runtime={runtime:g}",
        f"--ramp_time={ramp:g}",
        "--time_based=1",
        "--randrepeat=0",
    ]


def run_one(job: Job, target: Target, runtime: float, ramp: float) -> dict[str, Any]:
    os.sync()  # start every run with no dirty pages from the one before
    cpu0 = bl.cpu_seconds(target.pid) if target.pid else 0.0
    machine0 = bl.cpu_times()
    t0 = time.monotonic()
    out = bl.run_fio(fio_args(job, target.file, runtime, ramp), timeout=runtime + ramp + 120)
    wall = time.monotonic() - t0
    cpu = bl.cpu_seconds(target.pid) - cpu0 if target.pid else 0.0
    machine_busy = bl.busy_fraction(machine0, bl.cpu_times())
    job_out = out["jobs"][0]
    stats = job_out[job.direction]
    ios = stats["total_ios"]  # measured part only (after ramp)
    clat = stats.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": stats["iops"],
        "mibs": stats["bw_bytes"] / bl.MiB,
        "p99_us": clat.get("99.000000", 0) / 1000,
        "ios": ios,
        # Daemon CPU over the whole fio run (ramp included) per request of the whole run.
        "daemon_cpu_s": round(cpu, 3),
        "daemon_cpu_util": round(cpu / wall, 3) if target.pid else None,
        "fio_cpu_util": round((job_out["usr_cpu"] + job_out["sys_cpu"]) / 100, 3),
        # Both cores busy: 1.0.  Other users of this shared machine count too.
        "machine_busy": round(machine_busy, 3),
        "daemon_cpu_us_per_io": round(cpu * 1e6 / max(1.0, stats["iops"] * wall), 2)
        if target.pid
        else None,
    }


def measure(args: argparse.Namespace, jobs: list[Job], targets: list[Target]) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        j.name: {t.label: [] for t in targets} for j in jobs
    }
    total = len(jobs) * args.reps * len(targets)
    done = 0
    for job in jobs:
        for rep in range(args.reps):
            for target in targets:  # interleaved: a, b, c, a, b, c, ...
                done += 1
                r = run_one(job, target, args.runtime, args.ramp)
                runs[job.name][target.label].append(r)
                bl.log(
                    f"[{done}/{total}] {job.name} rep {rep + 1} {target.label}: "
                    f"{r['iops']:.0f} IOPS {r['mibs']:.1f} MiB/s p99 {r['p99_us']:.0f} us"
                )
    return runs


# ---- reporting ----------------------------------------------------------------------------


def _ratio(per: dict[str, Any], job: Job, a: str, b: str) -> float | None:
    if a not in per or b not in per:
        return None
    return bl.ratio(per[a][job.metric], per[b][job.metric])


def _rep_ratios(per: dict[str, Any], job: Job, a: str, b: str) -> list[float]:
    if a not in per or b not in per:
        return []
    pairs = zip(per[a]["runs"], per[b]["runs"], strict=True)
    return [round(bl.ratio(x[job.metric], y[job.metric]), 3) for x, y in pairs]


def summarize(
    jobs: list[Job], targets: list[Target], runs: dict[str, dict[str, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.name, "metric": job.metric, "target_ratio": job.target}
        per: dict[str, Any] = {}
        for t in targets:
            rs = runs[job.name][t.label]
            per[t.label] = {
                "iops": bl.median(r["iops"] for r in rs),
                "mibs": bl.median(r["mibs"] for r in rs),
                "p99_us": bl.median(r["p99_us"] for r in rs),
                **{
                    key: bl.median(r[key] for r in rs if r[key] is not None)
                    for key in (
                        "daemon_cpu_us_per_io",
                        "daemon_cpu_util",
                        "fio_cpu_util",
                        "machine_busy",
                    )
                },
                "runs": rs,
            }
        row["targets"] = per

        row["fusedisk/qsd"] = _ratio(per, job, "fusedisk", "qsd")
        row["fusedisk/qsd_per_rep"] = _rep_ratios(per, job, "fusedisk", "qsd")
        row["fusedisk/raw"] = _ratio(per, job, "fusedisk", "raw")
        row["qsd/raw"] = _ratio(per, job, "qsd", "raw")
        row["variants"] = {
            t.label: _ratio(per, job, t.label, t.kind)
            for t in targets
            if t.tunables and t.kind in per
        }
        fq = row["fusedisk/qsd"]
        row["verdict"] = (
            "n/a" if fq is None or math.isnan(fq) else ("PASS" if fq >= job.target else "MISS")
        )
        rows.append(row)
    return rows


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def print_table(rows: list[dict[str, Any]], targets: list[Target]) -> None:
    labels = [t.label for t in targets]
    header = ["job"]
    for label in labels:
        header += [f"{label} IOPS", f"{label} MiB/s"]
    header += ["fd/qsd", "fd/raw", "target", "verdict"]
    table = [header]
    for row in rows:
        line = [row["job"]]
        for label in labels:
            per = row["targets"][label]
            line += [f"{per['iops']:.0f}", f"{per['mibs']:.1f}"]
        metric = "IOPS" if row["metric"] == "iops" else "MiB/s"
        line += [
            fmt(row["fusedisk/qsd"]),
            fmt(row["fusedisk/raw"]),
            f">={row['target_ratio']:g} ({metric})",
            row["verdict"],
        ]
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    print("per-repetition fusedisk/qsd ratios; medians of p99 latency (us), daemon CPU per")
    print("request and in cores, fio's CPU in cores, and how busy the 2-core machine was:")
    for row in rows:
        extra = []
        for label in labels:
            per = row["targets"][label]
            cpu = per["daemon_cpu_us_per_io"]
            text = f"{label} p99 {per['p99_us']:.0f}"
            if cpu == cpu:  # NaN for raw
                text += f", daemon {cpu:.1f} us CPU/io ({per['daemon_cpu_util']:.2f} core)"
            text += f", fio {per['fio_cpu_util']:.2f} core, machine {per['machine_busy']:.0%} busy"
            extra.append(text)
        variants = "; ".join(f"{k} vs plain {fmt(v)}" for k, v in row["variants"].items())
        print(f"  {row['job']}: ratios {row['fusedisk/qsd_per_rep']}; " + "; ".join(extra))
        if variants:
            print(f"    tuned: {variants}")


def run_profiles(
    args: argparse.Namespace, jobs: list[Job], targets: list[Target]
) -> dict[str, Any]:
    target = next((t for t in targets if t.label == "fusedisk"), None)
    if target is None or target.pid is None:
        return {}
    args.profile.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for job in jobs:
        raw = args.profile / f"bench-{job.name}.pyspy.txt"
        bl.log(f"profiling fusedisk (pid {target.pid}) during {job.name}")
        with bl.profiled(target.pid, args.runtime, raw, args.native) as result:
            r = run_one(job, target, args.runtime, 0)
        if result:
            out[job.name] = {"fio_under_profiler": r, **result[0].as_dict()}
            print(f"\n== {job.name} on fusedisk ({r['iops']:.0f} IOPS under the profiler)")
            print(result[0].format())
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [j for j in JOBS if j.name in args.jobs.split(",")]
    targets = [Target.parse(s) for s in args.targets.split(",")]
    if not jobs or len({t.label for t in targets}) != len(targets):
        raise SystemExit("bench: no jobs selected, or a target named twice")
    args.dir = args.dir.absolute()
    args.dir.mkdir(parents=True, exist_ok=True)
    notes = bl.machine_notes(args.dir)
    started = time.time()
    with bl.Cleanup() as cleanup:
        setup_targets(args, cleanup, targets)
        runs = measure(args, jobs, targets)
        rows = summarize(jobs, targets, runs)
        profiles = run_profiles(args, jobs, targets) if args.profile else {}
    notes["loadavg_at_end"] = os.getloadavg()
    notes["duration_s"] = round(time.time() - started)
    print()
    print(
        f"fio libaio direct=1, {args.size} MiB images in {args.dir} ({notes['workdir_fs']}), "
        f"{args.runtime:g} s + {args.ramp:g} s ramp per run, {args.reps} reps, medians"
    )
    print_table(rows, targets)
    if args.json:
        result = {
            "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
            "machine": notes,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "fuse_defaults": {t.label: t.defaults for t in targets if t.defaults},
            "rows": rows,
            "profiles": profiles,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        bl.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
