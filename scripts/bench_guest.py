"""`scripts/bench.py guest`: fio inside a QEMU guest on each contender."""

from __future__ import annotations

import argparse
import contextlib
import math
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import benchlib as bl
import guest
from benchlib import JOBS, MiB, Result, Run, Table

from fusedisk.units import parse_size

IDLE = ("raw", "floor", "fusedisk", "qsd", "qsd-nbd")
MOVING = ("fusedisk-move", "qsd-move", "floor-mirror")
MARK = "BENCHJOB-"  # printed on the guest's console as each fio job starts
FIO_END = "FUSEDISK-BEGIN-"  # guest.py's init prints it once fio has exited
EDGE_S = 0.3  # trimmed off each end of a job's window for the CPU figures


def options(p: argparse.ArgumentParser) -> None:
    p.set_defaults(reps=2)
    bl.fio_options(p, runtime=8)
    bl.contenders_option(p, IDLE + MOVING, len(IDLE + MOVING))
    p.add_argument("--span", type=int, default=50, help="%% of the disk fio uses (%(default)s)")
    p.add_argument("--rate", default="auto", help="move rate, like 10M (auto: see above)")
    p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    p.add_argument("--keep-logs", action="store_true", help="keep the guests' consoles")


def run(args: argparse.Namespace) -> Result:
    """fio inside a QEMU guest on each contender, idle and during a move.

    One boot per contender per repetition (scripts/guest.py's guest), its disk a fresh
    non-sparse image the contender serves (virtio, cache=none, aio=threads), running the four
    data-path jobs in turn on the first --span % of it. qsd-nbd and qsd-move go through QEMU's
    NBD client (qemu-storage-daemon 7.2 cannot mirror a node under a writable FUSE export).
    The moves start with fio's first job, at --rate; auto: the part of the image fio never
    touches over fio's run plus 15 s, so that they outlast fio (each says whether it did); then
    the limit is lifted. A sampler reads the CPU time of QEMU's vCPU thread, of QEMU, of the
    daemon and of the machine over each job: a vCPU busy near 1.0 means the emulated CPU, not
    the disk, sets the pace."""
    fio_s = len(JOBS) * (args.runtime + args.ramp)
    untouched = args.size * (100 - args.span) / 100 or args.size
    auto = max(1, int(untouched / (fio_s + 15))) * MiB
    args.rate_bytes = auto if args.rate == "auto" else parse_size(args.rate)
    image = guest.build_guest()
    with ExitStack() as stack:
        dummy = bl.scratch(stack, args.dir / "dummy-vda.img")  # the NBD contenders' /dev/vda
        dummy.write_bytes(bytes(MiB))
        runs = bl.interleave(args.reps, args.contenders, lambda n: boot(args, image, n, dummy))
    return tables(args, runs), {"runs": runs}


def boot(args: argparse.Namespace, image_guest: guest.GuestImage, name: str, dummy: Path) -> Run:
    """One guest boot on ``name``, from a fresh image to everything removed."""
    with ExitStack() as stack:
        image = args.dir / f"guest-{name}.img"
        served, move = bl.prepare(stack, name, image, args.size * MiB)
        qemu_args = ["-name", f"bench-{name},debug-threads=on"]  # vCPU threads: "CPU 0/TCG"
        disk, device = served.file, "/dev/vda"
        if served.nbd:  # QEMU's NBD client is the guest's second disk
            disk, device = dummy, "/dev/vdb"
            drive = f"file={served.nbd},format=raw,if=virtio,cache=none,aio=threads"
            qemu_args += ["-drive", drive]
        console = args.dir / f"console-{name}-{time.strftime('%H%M%S')}.log"
        if not args.keep_logs:
            bl.on_exit(stack, f"rm {console}", bl.remove, console)
        timeout = 180 + 4 * len(JOBS) * (args.runtime + args.ramp)
        with guest.start_fio(
            disk, fio_args(args, device), accel=args.accel, guest=image_guest,
            console_log=console, qemu_args=qemu_args, timeout=timeout,
        ) as vm:  # fmt: skip
            sampler = Sampler(vm.proc.pid, served.pid, console)
            try:
                deadline = time.monotonic() + 180
                while JOBS[0].name not in sampler.marks:
                    if vm.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"fio did not start in the guest; see {console}")
                    time.sleep(0.02)
                if move is not None:
                    move.start(args.rate_bytes)
                result = vm.wait()
                at_fio_end = move.snapshot() if move is not None else {}
            finally:
                sampler.stop()
        if not result.ok or result.fio is None:
            raise RuntimeError(f"fio in the guest failed ({result.status}); see {console}")
        r: Run = {"jobs": bl.job_figures(result.fio, JOBS), "boot_s": round(result.boot_seconds, 2)}
        for job, cpu in sampler.job_cpu(args.ramp).items():
            r["jobs"][job].update(cpu)
        if move is not None:
            fio_start = sampler.marks[JOBS[0].name]
            fio_end = sampler.marks.get("fio-end", time.time())
            lifted = time.time()
            with contextlib.suppress(RuntimeError):  # a fusedisk move may be over already
                move.set_rate(0)
            m = move.wait()
            moving = at_fio_end["moving"]
            copied = at_fio_end.get("copied_bytes")  # fusedisk: the copier's own bytes
            m |= {
                "started_after_first_job_s": round(m["started"] - fio_start, 2),
                "overlapped_whole_fio_run": moving and m["started"] <= fio_start + args.ramp,
                "progress_at_fio_end": at_fio_end["progress"],
                "copier_mibs_during_fio": round(copied / MiB / (fio_end - m["started"]), 1)
                if copied is not None and moving
                else None,
                "rest_after_fio_s": round(m["finished"] - lifted, 2),
            }
            r["move"] = m
        return r


def fio_args(args: argparse.Namespace, device: str) -> list[str]:
    """The four jobs in one fio run, one after another; each prints ``BENCHJOB-<name>`` on the
    serial console as it starts (fio runs exec_prerun as ``CMD > NAME.prerun.txt``, hence the
    '; true')."""
    fio = [*bl.fio_timing(args.runtime, args.ramp), f"--size={args.span}%", "--eta=never"]
    for i, job in enumerate(JOBS):
        fio += [*job.args(device), *(["--stonewall"] if i else [])]
        fio.append(f"--exec_prerun=printf '\\n{MARK}{job.name}\\n' >/dev/ttyS0; true")
    return fio


class Sampler(threading.Thread):
    """Every 0.1 s: the CPU seconds of QEMU's vCPU threads, of QEMU, of the serving daemon,
    and the machine's busy and total jiffies; and when each marker line first showed in the
    guest's console log (which guest.py writes line by line)."""

    def __init__(self, qemu: int, daemon: int | None, console: Path) -> None:
        super().__init__(daemon=True)
        self.qemu, self.server, self.console = qemu, daemon, console
        self.samples: list[tuple[float, ...]] = []
        self.marks: dict[str, float] = {}
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.read_marks()
            with contextlib.suppress(OSError, ValueError, IndexError):  # QEMU exiting
                tasks = Path(f"/proc/{self.qemu}/task").iterdir()
                vcpus = [int(t.name) for t in tasks if (t / "comm").read_text()[:4] == "CPU "]
                vcpu = sum(bl.cpu_seconds(self.qemu, tid) for tid in vcpus)
                daemon = bl.cpu_seconds(self.server) if self.server else math.nan
                self.samples.append(
                    (time.time(), vcpu, bl.cpu_seconds(self.qemu), daemon, *bl.cpu_times())
                )

    def read_marks(self) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            for line in self.console.read_text(errors="replace").splitlines():
                name = line.partition(MARK)[2].strip()
                if name in (j.name for j in JOBS):  # not the option's echo in fio's JSON
                    self.marks.setdefault(name, now)
                elif FIO_END in line:
                    self.marks.setdefault("fio-end", now)

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        self.read_marks()

    def job_cpu(self, ramp: float) -> dict[str, dict[str, float]]:
        """Per job, over its measured part on the host's clock (its marker plus the ramp, to the
        next job's marker or fio's end, less EDGE_S at both ends): vCPU busy, QEMU's cores,
        the daemon's (if any), the machine's busy."""
        figures = {}
        for job, end in zip(JOBS, [*(j.name for j in JOBS[1:]), "fio-end"], strict=True):
            if job.name not in self.marks or end not in self.marks:
                continue
            t0, t1 = self.marks[job.name] + ramp + EDGE_S, self.marks[end] - EDGE_S
            inside = [s for s in self.samples if t0 <= s[0] <= t1]
            if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
                continue
            a, b = inside[0], inside[-1]
            names = ("vcpu_busy", "qemu_cores", "daemon_cores")
            cpu = {
                k: round((y - x) / (b[0] - a[0]), 3)
                for k, x, y in zip(names, a[1:4], b[1:4], strict=True)
            }
            cpu["machine_busy"] = bl.busy((a[4], a[5]), (b[4], b[5]))
            figures[job.name] = {k: v for k, v in cpu.items() if not math.isnan(v)}  # no daemon
        return figures


MOVE_COLUMNS = {
    "started after fio's 1st job (s)": "started_after_first_job_s",
    "overlapped whole fio run": "overlapped_whole_fio_run",
    "progress at fio end": "progress_at_fio_end",
    "copier MiB/s during fio": "copier_mibs_during_fio",
    "rest after lifting the rate (s)": "rest_after_fio_s",
    "move total (s)": "move_s",
    "switch pause (ms)": "switch_pause_ms",
}


def tables(args: argparse.Namespace, runs: dict[str, list[Run]]) -> list[Table]:
    def figures(name: str, job: bl.Job, key: str | None = None) -> list[float]:
        return bl.values(runs.get(name, []), "jobs", job.name, key or job.metric)

    head = (
        f"Guest fio, {args.size} MiB images, {args.runtime:g} s + {args.ramp:g} s ramp per job, "
        f"accel {args.accel}, medians of {args.reps} (IOPS for 4 KiB, MiB/s for 1 MiB)"
    )
    idle = bl.idle_table(f"{head}, idle", [n for n in IDLE if n in runs], JOBS, figures)
    moving = Table(
        f"{head}, during a move at {args.rate_bytes / MiB:g} MiB/s (qsd: blockdev-mirror under "
        "its NBD export); floor-mirror does not move: it writes each write twice",
        [
            *("job", *MOVING, "fd moving/floor", "fd moving/floor-mirror", "fd moving/qsd moving"),
            *("fd moving/idle", "qsd mirroring/idle (NBD)", "fd moving >= 0.5 floor (4k write)"),
        ],
    )
    for job in JOBS:
        fd = figures("fusedisk-move", job)
        peers = ("floor", "floor-mirror", "qsd-move", "fusedisk")
        ratios = [bl.compare(fd, figures(n, job)) for n in peers]
        ratios.append(bl.compare(figures("qsd-move", job), figures("qsd-nbd", job)))
        target = bl.verdict(ratios[0][0], 0.5) if job.rw == "randwrite" and job.bs == "4k" else ""
        cells = [job.median(figures(n, job)) for n in MOVING]
        moving.add(job.name, *cells, *(r[1] for r in ratios), target)
    moves = Table(
        "Moves (fusedisk's progress is its copy cursor, qsd's counts mirrored writes too; qsd's "
        "pause is an upper bound)",
        ["move", *MOVE_COLUMNS],
    )
    for name in ("fusedisk-move", "qsd-move"):
        for i, r in enumerate(runs.get(name, [])):
            moves.add(f"{name} #{i + 1}", *(r["move"][k] for k in MOVE_COLUMNS.values()))
    labels = ("vCPU busy", "QEMU cores", "guest fio cores", "daemon cores", "machine busy")
    cpu = Table(
        "Where the time goes, medians per job window (1.0 = one core; vCPU: the guest's vCPU "
        "thread as the host sees it)",
        ["job", "contender", *labels],
    )
    keys = ("vcpu_busy", "qemu_cores", "fio_cores", "daemon_cores", "machine_busy")
    for job in JOBS:
        for name in runs:
            cpu.add(job.name, name, *(bl.median(figures(name, job, k)) for k in keys))
    return [idle, *([moving, moves] if moves.rows else []), cpu]
