#!/usr/bin/env python3
"""Guest benchmark: fio inside a real QEMU guest whose disk is the raw file, a fusedisk mount or
qemu-storage-daemon, side by side, idle and while the image is being moved.

    .venv/bin/python scripts/bench_guest.py [--reps 2] [--runtime 8] [--ramp 1] [--size 1024]
        [--span 50] [--rate auto] [--targets raw,fusedisk,qsd,qsd-nbd,fusedisk-move,qsd-move]
        [--host-targets raw,fusedisk] [--accel tcg] [--dir DIR] [--json PATH] [--keep-logs]

Every guest boot (scripts/guest.py: a Debian kernel and busybox initramfs, QEMU with
``-drive ...,if=virtio,cache=none,aio=threads``) runs four fio jobs one after another
(``--stonewall``), libaio, direct=1, time-based: 4 KiB random read and write at iodepth 16, 1 MiB
sequential read and write at iodepth 8, all on the first --span % of the disk. One boot per
target per repetition, the targets interleaved per repetition (raw, fusedisk, qsd, ..., raw,
fusedisk, qsd, ...), each on a fresh, identical, non-sparse image (benchlib.make_image), synced
and read into the page cache first.

  raw            the guest's disk is the image file itself
  fusedisk       the file of a fusedisk mount of the image
  qsd            qemu-storage-daemon's writable FUSE export of the image
  qsd-nbd        qemu-storage-daemon's NBD export (unix socket), QEMU's own NBD client as disk
  fusedisk-move  fusedisk, while `fusedisk migrate MNT DEST --rate R` moves the image
  qsd-move       qsd-nbd, while qsd runs blockdev-mirror (sync full, copy-mode write-blocking,
                 speed R) to a new raw file added with blockdev-add

qemu-storage-daemon 7.2 cannot mirror a node that has a writable FUSE export (the export takes
the RESIZE permission, which the mirror job does not share; blockdev-mirror fails with a
permission conflict), so qsd's move runs under its NBD export, and qsd-nbd is measured idle too
so that its during/idle ratio compares like with like.

Moves start when fio's first job starts (an ``exec_prerun`` marker on the guest's console) and
are paced at R. Blocks the guest has rewritten whole are in sync and skipped by both movers, so
a 1 MiB sequential writer over the whole disk would finish any move within a second; hence
--span: the default R is the part of the image fio never touches over the whole fio run plus
15 s, so the moves outlast it. Whether each move did overlap the whole run is reported. Once
fio is done, the rate limit is lifted and the moves are completed (fusedisk: `fusedisk rate MNT
0`; qsd: block-job-set-speed 0, BLOCK_JOB_READY, job-complete, BLOCK_JOB_COMPLETED).

CPU: a sampler reads the CPU time of QEMU's vCPU thread (threads are named with
``-name ...,debug-threads=on``), of QEMU as a whole, of the serving daemon and of the machine
every 0.1 s; per job it reports them over the job's measured window (the job's console marker
plus the ramp, to the next job's marker). A vCPU busy near 1.0 means the emulated guest CPU, not
the disk, sets the pace. --host-targets runs the same fio jobs once on the host, on the raw file
and on a fusedisk mount, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl

from fusedisk.units import parse_size


def _load_guest() -> ModuleType:
    """scripts/guest.py, loaded by path (it is a script, not a package module)."""
    name = "fusedisk_guest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("guest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec_module: its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import guest as guestlib
else:
    guestlib = _load_guest()


IDLE_TARGETS = ("raw", "fusedisk", "qsd", "qsd-nbd")
MOVE_TARGETS = ("fusedisk-move", "qsd-move")
ALL_TARGETS = IDLE_TARGETS + MOVE_TARGETS
LABELS = {
    "raw": "raw",
    "fusedisk": "fusedisk",
    "qsd": "qsd FUSE",
    "qsd-nbd": "qsd NBD",
    "fusedisk-move": "fusedisk, moving",
    "qsd-move": "qsd NBD, mirroring",
}
MARK = "BENCHJOB-"  # printed on the guest's console as each fio job starts
FIO_END = "FUSEDISK-BEGIN-"  # guest.py's init prints it once fio has exited
SAMPLE_S = 0.1
EDGE_S = 0.3  # trimmed off each end of a job's window for the CPU figures


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        return "read" if "read" in self.rw else "write"

    @property
    def metric(self) -> str:  # what the job is judged on
        return "iops" if self.bs == "4k" else "mibs"

    @property
    def unit(self) -> str:
        return "IOPS" if self.metric == "iops" else "MiB/s"


JOBS = (
    Job("4k-randread-qd16", "randread", "4k", 16),
    Job("4k-randwrite-qd16", "randwrite", "4k", 16),
    Job("1m-seqread-qd8", "read", "1M", 8),
    Job("1m-seqwrite-qd8", "write", "1M", 8),
)
JOB_NAMES = frozenset(j.name for j in JOBS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp/fusedisk-guest-bench"),
        help="where images, mounts and sockets go (default: %(default)s)",
    )
    p.add_argument("--size", type=int, default=1024, help="image size in MiB (default: 1024)")
    p.add_argument("--runtime", type=float, default=8, help="seconds per fio job (default: 8)")
    p.add_argument("--ramp", type=float, default=1, help="fio ramp_time per job (default: 1)")
    p.add_argument("--reps", type=int, default=2, help="repetitions (default: 2)")
    p.add_argument(
        "--span",
        type=int,
        default=50,
        help="percent of the disk, from its start, that the fio jobs use (default: 50); the\n"
        "rest is left to the move, so that the guest's sequential writes cannot bring the\n"
        "whole image in sync (and end the move) before fio is done",
    )
    p.add_argument(
        "--targets", default=",".join(ALL_TARGETS), help=f"default: {','.join(ALL_TARGETS)}"
    )
    p.add_argument(
        "--host-targets",
        default="raw,fusedisk",
        help="run the same fio jobs once on the host too (raw, fusedisk; '' for none)",
    )
    p.add_argument(
        "--rate",
        default="auto",
        help="move/mirror rate, like 20M (default: auto = the part of the image fio does not\n"
        "touch / (fio run + 15 s))",
    )
    p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="default: tcg")
    p.add_argument("--json", type=Path, help="write every figure here as JSON")
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the guests' console logs (in --dir)"
    )
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.host_targets = [t for t in args.host_targets.split(",") if t]
    unknown = set(args.targets) - set(ALL_TARGETS)
    unknown |= set(args.host_targets) - {"raw", "fusedisk"}
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not 1 <= args.span <= 100:
        p.error("--span is a percentage, 1 to 100")
    args.dir = args.dir.absolute()
    args.size_bytes = args.size * bl.MiB
    fio_s = len(JOBS) * (args.runtime + args.ramp)
    if args.rate == "auto":
        untouched = args.size * (100 - args.span) / 100 if args.span < 100 else args.size
        args.rate_bytes = max(1, int(untouched / (fio_s + 15))) * bl.MiB
    else:
        args.rate_bytes = parse_size(args.rate)
    return args


# ---- fio ----------------------------------------------------------------------------------


def fio_args(filename: str, args: argparse.Namespace, markers: bool) -> list[str]:
    """All four jobs in one fio run, one after another; ``markers``: each job prints
    ``BENCHJOB-<name>`` on the guest's serial console as it starts (fio runs exec_prerun as
    ``CMD > NAME.prerun.txt 2>&1``, hence the '; true')."""
    fio = [
        "--ioengine=libaio",
        "--direct=1",
        "--time_based=1",
        f"--runtime={args.runtime:g}",
        f"--ramp_time={args.ramp:g}",
        f"--size={args.span}%",
        "--randrepeat=0",
        "--eta=never",
    ]
    for i, job in enumerate(JOBS):
        fio += [
            f"--name={job.name}",
            f"--filename={filename}",
            f"--rw={job.rw}",
            f"--bs={job.bs}",
            f"--iodepth={job.iodepth}",
        ]
        if i:
            fio.append("--stonewall")
        if markers:
            fio.append(f"--exec_prerun=printf '\\n{MARK}{job.name}\\n' >/dev/ttyS0; true")
    return fio


def job_figures(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per job: IOPS, MiB/s, p99 completion latency, fio's own CPU use, from fio's JSON."""
    by_name = {j["jobname"]: j for j in out.get("jobs", [])}
    figures = {}
    for job in JOBS:
        j = by_name.get(job.name)
        if j is None:
            raise RuntimeError(f"fio's JSON has no job {job.name}")
        stats = j[job.direction]
        clat = stats.get("clat_ns", {}).get("percentile", {})
        figures[job.name] = {
            "iops": round(stats["iops"], 1),
            "mibs": round(stats["bw_bytes"] / bl.MiB, 1),
            "p99_ms": round(clat.get("99.000000", 0) / 1e6, 2),
            "fio_cpu": round((j["usr_cpu"] + j["sys_cpu"]) / 100, 3),  # of one CPU
            "runtime_ms": j["job_runtime"],
        }
    return figures


# ---- sampling -----------------------------------------------------------------------------


class Sampler:
    """Every SAMPLE_S: CPU seconds of QEMU's vCPU threads, of QEMU, of the daemon serving the
    disk, and the machine's busy/total jiffies; and the time each marker line reached the
    guest's console log (which guest.py writes line by line)."""

    def __init__(self, qemu_pid: int, daemon_pid: int | None, console: Path) -> None:
        self.qemu_pid, self.daemon_pid, self.console = qemu_pid, daemon_pid, console
        self.samples: list[tuple[float, float, float, float, float, float]] = []
        self.marks: dict[str, float] = {}
        self._partial = ""
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            now = time.time()
            self._tail(now)
            with contextlib.suppress(OSError, ValueError, IndexError):
                vcpu, qemu = _qemu_cpu(self.qemu_pid)
                daemon = bl.cpu_seconds(self.daemon_pid) if self.daemon_pid else 0.0
                busy, total = bl.cpu_times()
                self.samples.append((now, vcpu, qemu, daemon, busy, total))

    def _tail(self, now: float) -> None:
        try:
            with open(self.console, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data.decode(errors="replace")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if MARK in line:
                name = line.split(MARK, 1)[1].strip()
                if name in JOB_NAMES:  # not the echo of the option in fio's JSON
                    self.marks.setdefault(name, now)
            elif FIO_END in line:
                self.marks.setdefault("fio-end", now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._tail(time.time())

    def window(self, start: float, end: float) -> dict[str, float] | None:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
            return None
        a, b = inside[0], inside[-1]
        dt = b[0] - a[0]
        return {
            "vcpu_busy": round((b[1] - a[1]) / dt, 3),
            "qemu_cores": round((b[2] - a[2]) / dt, 3),
            "daemon_cores": round((b[3] - a[3]) / dt, 3),
            "machine_busy": round((b[4] - a[4]) / (b[5] - a[5]), 3) if b[5] > a[5] else 0.0,
        }

    def job_windows(self, ramp: float) -> dict[str, tuple[float, float]]:
        """Each job's measured part on the host's clock: its marker plus the ramp, to the next
        job's marker (or fio's end), trimmed by EDGE_S at both ends."""
        out = {}
        for i, job in enumerate(JOBS):
            start = self.marks.get(job.name)
            nxt = JOBS[i + 1].name if i + 1 < len(JOBS) else "fio-end"
            end = self.marks.get(nxt)
            if start is not None and end is not None:
                out[job.name] = (start + ramp + EDGE_S, end - EDGE_S)
        return out


def _qemu_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the vCPU threads, of the whole QEMU process)."""
    tick = os.sysconf("SC_CLK_TCK")
    vcpu = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as f:
                comm = f.read()
            if not comm.startswith("CPU "):  # "CPU 0/TCG", "CPU 0/KVM"
                continue
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as f:
                fields = f.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        vcpu += (int(fields[11]) + int(fields[12])) / tick
    return vcpu, bl.cpu_seconds(pid)


# ---- moves --------------------------------------------------------------------------------


class FusediskMove:
    """`fusedisk migrate MNT DEST --detach --rate R`, then lift the rate and wait for it."""

    def __init__(self, cleanup: bl.Cleanup, mount: bl.FusediskMount, dest: Path, rate: int) -> None:
        self.cleanup, self.mount, self.dest, self.rate = cleanup, mount, dest, rate
        self.started_at = 0.0
        self._finished = False
        bl.remove(dest)
        cleanup.push(f"image {dest}", functools.partial(bl.remove, dest))
        # Runs before the unmount (pushed after it): a move still running is failed back first.
        cleanup.push(f"cancel {mount.mountpoint}", self._cancel)

    def _cancel(self) -> None:
        if not self._finished:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                bl.fusedisk("cancel", self.mount.mountpoint, timeout=60)

    def start(self) -> None:
        self.started_at = time.time()
        bl.fusedisk(
            "migrate", self.mount.mountpoint, self.dest, "--detach", "--rate", str(self.rate)
        )

    def snapshot(self) -> dict[str, Any]:
        s = self.mount.status()
        return {
            "phase": s["phase"],
            "moving": s["phase"] == "mirroring",
            "started": s.get("started"),
            "progress": round(s.get("progress_bytes", 0) / max(1, s["size"]), 3),
            "copied_bytes": s.get("copied_bytes", 0),
            "mirrored_bytes": s.get("mirrored_bytes", 0),
        }

    def finish(self) -> dict[str, Any]:
        t0 = time.time()
        if self.mount.status()["phase"] == "mirroring":
            with contextlib.suppress(RuntimeError):  # it may have switched meanwhile
                bl.fusedisk("rate", self.mount.mountpoint, "0")
        deadline = time.monotonic() + 600
        while (s := self.mount.status())["phase"] in ("mirroring", "switching"):
            if time.monotonic() > deadline:
                raise RuntimeError("the fusedisk move did not finish in 600 s")
            time.sleep(0.1)
        self._finished = True
        self.cleanup.pop(f"cancel {self.mount.mountpoint}")
        if s["phase"] != "done":
            raise RuntimeError(f"fusedisk move ended {s['phase']}: {s.get('error')}")
        return {
            "phase": s["phase"],
            "move_s": round(float(s["finished"]) - float(s["started"]), 2),
            "rest_after_fio_s": _rest(float(s["finished"]) - t0),
            "switch_pause_ms": s.get("switch_pause_ms"),
            "copied_bytes": s.get("copied_bytes"),
            "mirrored_bytes": s.get("mirrored_bytes"),
            "synced_by_writes_bytes": s.get("synced_by_writes_bytes"),
        }


class QsdMirror:
    """blockdev-add of a new raw file, blockdev-mirror (sync full, write-blocking, speed R) of
    the exported node; finish: speed 0, BLOCK_JOB_READY, job-complete, BLOCK_JOB_COMPLETED."""

    JOB = "move0"

    def __init__(
        self, cleanup: bl.Cleanup, qsd: bl.QsdExport, dest: Path, size: int, rate: int
    ) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.cleanup, self.rate, self.tag = cleanup, rate, f"qmp {qsd.qmp_socket}"
        self.started_at = 0.0
        bl.remove(dest)
        cleanup.push(f"image {dest}", functools.partial(bl.remove, dest))
        # The target as fusedisk creates its own: a new, sparse file of the same size.
        command = ["qemu-img", "create", "-q", "-f", "raw", str(dest), str(size)]
        subprocess.run(command, check=True)
        self.qmp = QEMUMonitorProtocol(str(qsd.qmp_socket))
        self.qmp.connect()
        cleanup.push(self.tag, self.qmp.close)
        target = {"driver": "file", "filename": str(dest)}
        self.qmp.cmd("blockdev-add", **{"node-name": "target0", "driver": "raw", "file": target})

    def start(self) -> None:
        self.started_at = time.time()
        self.qmp.cmd(
            "blockdev-mirror",
            **{
                "job-id": self.JOB,
                "device": "fmt0",
                "target": "target0",
                "sync": "full",
                "copy-mode": "write-blocking",
                "speed": self.rate,
            },
        )

    def snapshot(self) -> dict[str, Any]:
        reply = cast("list[dict[str, Any]]", self.qmp.cmd("query-block-jobs"))
        jobs = [j for j in reply if j["device"] == self.JOB]
        if not jobs:
            return {"phase": "gone", "moving": False, "progress": None}
        j = jobs[0]
        return {
            "phase": j["status"],
            "moving": j["status"] == "running" and not j["ready"],
            "ready": j["ready"],
            "progress": round(j["offset"] / max(1, j["len"]), 3),
            "offset": j["offset"],
            "len": j["len"],
        }

    def finish(self) -> dict[str, Any]:
        t0 = time.time()
        self.qmp.cmd("block-job-set-speed", device=self.JOB, speed=0)
        ready = self._wait_event("BLOCK_JOB_READY", 600)
        t_complete = time.time()
        self.qmp.cmd("job-complete", id=self.JOB)
        completed = self._wait_event("BLOCK_JOB_COMPLETED", 600)
        self.cleanup.pop(self.tag)
        if completed["data"].get("error"):
            raise RuntimeError(f"qsd mirror failed: {completed['data']['error']}")
        done = _event_time(completed)
        return {
            "phase": "done",
            "move_s": round(done - self.started_at, 2),
            "ready_after_s": round(_event_time(ready) - self.started_at, 2),
            "rest_after_fio_s": _rest(done - t0),
            # job-complete sent -> BLOCK_JOB_COMPLETED: an upper bound of qsd's switch pause
            "switch_pause_ms": round((done - t_complete) * 1000, 1),
            "copied_bytes": completed["data"].get("offset"),
        }

    def _wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.qmp.pull_event(wait=1.0)
            except TimeoutError:
                continue
            if event is None:
                continue
            if event["event"] == name:
                return dict(event)
            if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"].get("error"):
                raise RuntimeError(f"qsd mirror failed: {event['data']['error']}")
        raise RuntimeError(f"no {name} from qemu-storage-daemon in {timeout:.0f} s")


def _rest(seconds: float) -> float | None:
    """How long the move ran once fio was done (None: it had finished before)."""
    return round(seconds, 2) if seconds > 0 else None


def _event_time(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


# ---- one guest boot -----------------------------------------------------------------------


def run_target(
    args: argparse.Namespace,
    cleanup: bl.Cleanup,
    image_guest: guestlib.GuestImage,
    kind: str,
    rep: int,
) -> dict[str, Any]:
    image = args.dir / f"{kind}.img"
    cleanup.push(f"image {image}", functools.partial(bl.remove, image))
    bl.make_image(image, args.size_bytes)
    qemu_args = ["-name", f"bench-{kind},debug-threads=on"]  # names the vCPU thread "CPU 0/..."
    device, daemon_pid = "/dev/vda", None
    mount: bl.FusediskMount | None = None
    qsd: bl.QsdExport | None = None
    if kind == "raw":
        disk = image
    elif kind.startswith("fusedisk"):
        mount = bl.mount_fusedisk(cleanup, image, args.dir / f"{kind}-mnt")
        disk, daemon_pid = mount.file, mount.pid
    elif kind == "qsd":
        qsd = bl.start_qsd(cleanup, image, args.dir / "qsd.export", args.dir, "fuse")
        disk, daemon_pid = qsd.file, qsd.proc.pid
    else:  # qsd-nbd, qsd-move: QEMU's NBD client is the guest's second disk, /dev/vdb
        qsd = bl.start_qsd(cleanup, image, args.dir / f"{kind}.nbd", args.dir, "nbd")
        disk, daemon_pid, device = args.dummy, qsd.proc.pid, "/dev/vdb"
        drive = f"file={qsd.nbd_uri},format=raw,if=virtio,cache=none,aio=threads"
        qemu_args += ["-drive", drive]
    mover: FusediskMove | QsdMirror | None = None
    if kind == "fusedisk-move":
        assert mount is not None
        mover = FusediskMove(cleanup, mount, args.dir / f"{kind}-dest.img", args.rate_bytes)
    elif kind == "qsd-move":
        assert qsd is not None
        dest = args.dir / f"{kind}-dest.img"
        mover = QsdMirror(cleanup, qsd, dest, args.size_bytes, args.rate_bytes)
    os.sync()  # no dirty pages from the run before
    bl.warm(image)

    console = args.dir / f"console-{kind}-{rep}.log"
    fio_s = len(JOBS) * (args.runtime + args.ramp)
    at_fio_end: dict[str, Any] = {}
    t0 = time.time()
    with guestlib.start_fio(
        disk,
        fio_args(device, args, markers=True),
        accel=args.accel,
        guest=image_guest,
        console_log=console,
        qemu_args=qemu_args,
        timeout=180 + 4 * fio_s,
    ) as run:
        sampler = Sampler(run.proc.pid, daemon_pid, console)
        try:
            first = JOBS[0].name
            while first not in sampler.marks and run.poll() is None:
                if time.time() - t0 > 180:
                    raise RuntimeError(f"fio did not start in the guest in 180 s (see {console})")
                time.sleep(0.02)
            if mover is not None and run.poll() is None:
                mover.start()
            result = run.wait()
            if mover is not None:
                at_fio_end = mover.snapshot()
        finally:
            sampler.stop()
    if not result.ok or result.fio is None:
        raise RuntimeError(f"fio in the guest failed (status {result.status}); see {console}")
    jobs = job_figures(result.fio)
    windows = sampler.job_windows(args.ramp)
    for name, (start, end) in windows.items():
        jobs[name]["cpu"] = sampler.window(start, end)
    out: dict[str, Any] = {
        "target": kind,
        "rep": rep + 1,
        "jobs": jobs,
        "boot_s": round(result.boot_seconds, 2),
        "elapsed_s": round(result.elapsed_seconds, 2),
        "fio_span_s": round(
            sampler.marks.get("fio-end", 0) - sampler.marks.get(JOBS[0].name, 0), 2
        ),
        "disk_util": [d.get("util") for d in result.fio.get("disk_util", [])],
    }
    if mover is not None:
        fio_start, fio_end = sampler.marks[JOBS[0].name], sampler.marks.get("fio-end", time.time())
        measured_from = fio_start + args.ramp  # the first job's measured part starts here
        move_start = (
            float(at_fio_end["started"])
            if isinstance(mover, FusediskMove) and at_fio_end.get("started")
            else mover.started_at
        )
        finished = mover.finish()
        copied = at_fio_end.get("copied_bytes")  # fusedisk: the copier's bytes alone
        out["move"] = {
            "rate_bytes": args.rate_bytes,
            "started_after_first_job_s": round(move_start - fio_start, 2),
            "started_before_measuring": move_start <= measured_from,
            "still_moving_at_fio_end": bool(at_fio_end.get("moving")),
            "overlapped_whole_fio_run": move_start <= measured_from
            and bool(at_fio_end.get("moving")),
            "at_fio_end": at_fio_end,
            "copier_mibs_during_fio": round(copied / bl.MiB / (fio_end - move_start), 1)
            if copied is not None and at_fio_end.get("moving") and fio_end > move_start
            else None,
            **finished,
        }
    if mount is not None:
        bl.unmount_fusedisk(cleanup, mount)
    if qsd is not None:
        bl.stop_qsd(cleanup, qsd)
    if mover is not None:
        cleanup.pop(f"image {args.dir / f'{kind}-dest.img'}")
    cleanup.pop(f"image {image}")
    if not args.keep_logs:
        bl.remove(console)
    return out


def run_host(args: argparse.Namespace, cleanup: bl.Cleanup, kind: str) -> dict[str, Any]:
    """The same four jobs with the host's fio, once, for the guest-vs-host comparison."""
    image = args.dir / f"host-{kind}.img"
    cleanup.push(f"image {image}", functools.partial(bl.remove, image))
    bl.make_image(image, args.size_bytes)
    mount = None
    file = image
    if kind == "fusedisk":
        mount = bl.mount_fusedisk(cleanup, image, args.dir / "host-mnt")
        file = mount.file
    os.sync()
    bl.warm(image)
    fio_s = len(JOBS) * (args.runtime + args.ramp)
    out = bl.run_fio(fio_args(str(file), args, markers=False), fio_s + 120)
    if mount is not None:
        bl.unmount_fusedisk(cleanup, mount)
    cleanup.pop(f"image {image}")
    return {"target": kind, "jobs": job_figures(out)}


# ---- summary ------------------------------------------------------------------------------


def metric(run: dict[str, Any], job: Job) -> float:
    return float(run["jobs"][job.name][job.metric])


def job_value(run: dict[str, Any], job: Job, key: str) -> float | None:
    """fio's figure ``key`` of ``job``, or (cpu keys) the sampler's figure over its window."""
    figures = run["jobs"][job.name]
    if key in figures:
        return float(figures[key])
    value = (figures.get("cpu") or {}).get(key)
    return None if value is None else float(value)


def med(runs: list[dict[str, Any]], job: Job, key: str | None = None) -> float:
    values = [metric(r, job) if key is None else job_value(r, job, key) for r in runs]
    return bl.median(v for v in values if v is not None)


def per_rep(runs: dict[str, list[dict[str, Any]]], a: str, b: str, job: Job) -> list[float]:
    pairs = zip(runs.get(a, []), runs.get(b, []), strict=False)
    return [round(bl.ratio(metric(x, job), metric(y, job)), 2) for x, y in pairs]


def summarize(runs: dict[str, list[dict[str, Any]]], host: dict[str, Any]) -> dict[str, Any]:
    nan = float("nan")
    jobs: dict[str, Any] = {}
    for job in JOBS:
        m = {k: med(v, job) for k, v in runs.items()}
        row: dict[str, Any] = {"unit": job.unit, "median": {k: round(v, 1) for k, v in m.items()}}
        for key, a, b in (
            ("fd_raw", "fusedisk", "raw"),
            ("fd_qsd", "fusedisk", "qsd"),
            ("fd_qsd_move", "fusedisk-move", "qsd-move"),
            ("fd_move_idle", "fusedisk-move", "fusedisk"),
            ("qsd_move_idle", "qsd-move", "qsd-nbd"),
        ):
            row[key] = round(bl.ratio(m.get(a, nan), m.get(b, nan)), 2)
        row["per_rep"] = {
            "fd_raw": per_rep(runs, "fusedisk", "raw", job),
            "fd_qsd": per_rep(runs, "fusedisk", "qsd", job),
            "fd_qsd_move": per_rep(runs, "fusedisk-move", "qsd-move", job),
        }
        row["target_idle"] = _verdict(row["fd_raw"], 0.9)
        row["target_move"] = _verdict(row["fd_qsd_move"], 1.0)
        for key in ("vcpu_busy", "qemu_cores", "daemon_cores", "machine_busy", "fio_cpu"):
            row[key] = {k: round(med(v, job, key), 2) for k, v in runs.items()}
        row["host"] = {k: h["jobs"][job.name][job.metric] for k, h in host.items()}
        row["guest_over_host"] = {
            k: round(bl.ratio(m.get(k, nan), v), 3) for k, v in row["host"].items()
        }
        jobs[job.name] = row
    moves = {k: [r["move"] for r in runs[k]] for k in MOVE_TARGETS if runs.get(k)}
    return {"jobs": jobs, "moves": moves}


def _verdict(value: float, target: float) -> str:
    if value != value:  # nan: a target was not run
        return "-"
    return "PASS" if value >= target else "MISS"


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}"


def print_tables(args: argparse.Namespace, s: dict[str, Any], kinds: list[str]) -> None:
    def table(head: list[str], rows: list[list[str]]) -> None:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()

    def val(row: dict[str, Any], kind: str) -> str:
        v = row["median"].get(kind)
        return _fmt(v, 0 if row["unit"] == "IOPS" else 1)

    print("Guest fio, medians (IOPS for 4 KiB, MiB/s for 1 MiB); 'moving': during a move at")
    print(f"{args.rate_bytes / bl.MiB:g} MiB/s (qsd: blockdev-mirror under its NBD export)\n")
    rows = []
    for name, row in s["jobs"].items():
        rows.append(
            [
                name,
                row["unit"],
                *(val(row, k) for k in ("raw", "fusedisk", "qsd")),
                _fmt(row["fd_raw"], 2),
                _fmt(row["fd_qsd"], 2),
                *(val(row, k) for k in ("fusedisk-move", "qsd-move")),
                _fmt(row["fd_qsd_move"], 2),
                row["target_idle"],
                row["target_move"],
            ]
        )
    table(
        [
            "job",
            "unit",
            "raw",
            "fusedisk",
            "qsd (FUSE)",
            "fd/raw",
            "fd/qsd",
            "fusedisk moving",
            "qsd mirroring (NBD)",
            "fd/qsd moving",
            "fd >= 0.9 raw",
            "fd >= qsd moving",
        ],
        rows,
    )
    rows = []
    for name, row in s["jobs"].items():
        pr = row["per_rep"]
        rows.append(
            [
                name,
                val(row, "qsd-nbd"),
                _fmt(row["fd_move_idle"], 2),
                _fmt(row["qsd_move_idle"], 2),
                ", ".join(map(str, pr["fd_raw"])) or "-",
                ", ".join(map(str, pr["fd_qsd"])) or "-",
                ", ".join(map(str, pr["fd_qsd_move"])) or "-",
            ]
        )
    table(
        [
            "job",
            "qsd NBD idle",
            "fusedisk moving/idle",
            "qsd mirroring/idle (NBD)",
            "fd/raw per rep",
            "fd/qsd per rep",
            "fd/qsd moving per rep",
        ],
        rows,
    )
    print("Where the time goes, medians per job window: guest vCPU thread busy (host view, 1.0 =")
    print("one core), fio's own usr+sys in the guest, serving daemon cores; host-side fio once.\n")
    shown = [k for k in ("raw", "fusedisk", "qsd", "fusedisk-move", "qsd-move") if k in kinds]
    rows = []
    for name, row in s["jobs"].items():
        host = row["host"]
        rows.append(
            [
                name,
                " / ".join(_fmt(row["vcpu_busy"].get(k), 2) for k in shown),
                " / ".join(_fmt(row["fio_cpu"].get(k), 2) for k in shown),
                " / ".join(_fmt(row["daemon_cores"].get(k), 2) for k in shown if k != "raw"),
                " / ".join(_fmt(row["machine_busy"].get(k), 2) for k in shown),
                " / ".join(
                    f"{_fmt(h, 0 if row['unit'] == 'IOPS' else 1)} "
                    f"({_fmt(row['guest_over_host'][k], 2)})"
                    for k, h in host.items()
                )
                or "-",
            ]
        )
    daemons = [LABELS[k] for k in shown if k != "raw"]
    table(
        [
            "job",
            "vCPU busy: " + " / ".join(LABELS[k] for k in shown),
            "guest fio usr+sys",
            "daemon cores: " + " / ".join(daemons),
            "machine busy",
            "host fio " + " / ".join(s["host_kinds"]) + " (guest/host)",
        ][: None if s["host_kinds"] else -1],
        [row[: None if s["host_kinds"] else -1] for row in rows],
    )
    rows = []
    for kind, moves in s["moves"].items():
        for i, m in enumerate(moves):
            end = m["at_fio_end"]
            rows.append(
                [
                    f"{LABELS[kind]} #{i + 1}",
                    _fmt(m["started_after_first_job_s"], 2),
                    "yes" if m["overlapped_whole_fio_run"] else "NO",
                    f"{_fmt((end.get('progress') or 0) * 100, 0)} %",
                    _fmt(m["copier_mibs_during_fio"], 1),
                    _fmt(m["rest_after_fio_s"], 1),
                    _fmt(m["move_s"], 1),
                    _fmt(m["switch_pause_ms"], 1),
                ]
            )
    if rows:
        table(
            [
                "move",
                "started after fio's 1st job (s)",
                "overlapped whole fio run",
                "progress at fio end",
                "fusedisk copier MiB/s during fio",
                "rest after lifting rate (s)",
                "move total (s)",
                "switch pause (ms)",
            ],
            rows,
        )


# ---- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    fio_s = len(JOBS) * (args.runtime + args.ramp)
    boots = args.reps * len(args.targets)
    bl.log(
        f"{boots} guest boots of ~{fio_s + 12:.0f} s, {len(args.host_targets)} host fio runs of "
        f"{fio_s:.0f} s; move rate {args.rate_bytes / bl.MiB:g} MiB/s"
    )
    notes = bl.machine_notes(args.dir)
    notes["qemu"] = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in args.targets}
    host: dict[str, Any] = {}
    with bl.Cleanup() as cleanup:
        image_guest = guestlib.build_guest()
        args.dummy = args.dir / "dummy-vda.img"  # the NBD targets' unused first disk
        cleanup.push(f"image {args.dummy}", functools.partial(bl.remove, args.dummy))
        args.dummy.write_bytes(bytes(bl.MiB))
        for kind in args.host_targets:
            bl.log(f"host fio on {kind}")
            host[kind] = run_host(args, cleanup, kind)
        for rep in range(args.reps):
            for kind in args.targets:  # interleaved, so noise hits every target alike
                bl.log(f"rep {rep + 1}/{args.reps}: guest on {LABELS[kind]}")
                r = run_target(args, cleanup, image_guest, kind, rep)
                runs[kind].append(r)
                figures = ", ".join(f"{j.name.split('-')[1]} {_fmt(metric(r, j), 0)}" for j in JOBS)
                bl.log(f"  {figures}; boot {r['boot_s']} s" + _move_note(r))
        cleanup.pop(f"image {args.dummy}")
    notes["loadavg_at_end"] = os.getloadavg()
    notes["duration_s"] = round(time.time() - started)
    summary = summarize(runs, host)
    summary["host_kinds"] = list(host)
    print()
    print(
        f"{args.size} MiB non-sparse images, {args.reps} reps, fio {args.runtime:g} s + "
        f"{args.ramp:g} s ramp per job, accel {args.accel}, {notes['duration_s']} s in all"
    )
    print_tables(args, summary, args.targets)
    if args.json:
        result = {
            "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
            "machine": notes,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "summary": summary,
            "runs": runs,
            "host": host,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        bl.log(f"wrote {args.json}")
    return 0


def _move_note(r: dict[str, Any]) -> str:
    m = r.get("move")
    if not m:
        return ""
    return (
        f"; move overlapped fio: {'yes' if m['overlapped_whole_fio_run'] else 'NO'} "
        f"({_fmt((m['at_fio_end'].get('progress') or 0) * 100)} % at fio's end), "
        f"pause {m['switch_pause_ms']} ms"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_guest: interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
