#!/usr/bin/env python3
"""Build a tiny Linux guest from Debian packages and run fio in it under QEMU.

    guest.py build [--cache DIR]
    guest.py run --disk PATH [--format raw] [--accel tcg] --fio-args="..." [-- FIO_ARG...]

The guest is a Debian cloud kernel plus an initramfs holding busybox, the
host's fio and its libraries, and an init script that runs one fio job against
/dev/vda and prints fio's JSON on the serial console between marker lines.
The job (fio arguments, optional job file) travels in a small gzip'ed cpio
appended to the cached initrd, so arguments need no kernel-cmdline quoting.
"""

import argparse
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

KERNEL_META = "linux-image-cloud-amd64"
# Load order matters: busybox insmod does no dependency resolution.
MODULES = "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
# The guest's fio hangs under TCG with its default (tsc) clocksource.
FIO_FORCED = ["--clocksource=clock_gettime", "--output-format=json"]
FORMATS = ("raw", "qcow2", "vpc", "vhdx")
CACHE = "~/.cache/fusedisk/guest"
ACCELS = ("tcg", "kvm")

INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "init: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "init: no /dev/vda"
NONCE=$(cat /job/nonce 2>/dev/null || echo none)
cd /tmp
echo "FUSEDISK-START-$NONCE"
sh /job/run.sh
rc=$?
# Keep kernel messages from interleaving with the JSON on the console.
echo 1 > /proc/sys/kernel/printk
echo "FUSEDISK-BEGIN-$NONCE"
cat /tmp/fio.json
echo
echo "FUSEDISK-END-$NONCE rc=$rc"
sync
poweroff -f
"""
RECIPE = "1"  # bump when the image layout changes in a way INIT does not show


class GuestError(RuntimeError):
    """The guest could not be built, booted, or gave no result."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


@dataclass
class GuestResult:
    status: int  # fio's exit status inside the guest
    fio: dict[str, Any] | None  # fio's parsed JSON output, None if it printed none
    boot_seconds: float  # QEMU start until fio starts in the guest
    elapsed_seconds: float  # QEMU start until the result was printed
    console: str = field(repr=False)  # the whole serial console
    # With start_fio(iops_log=True): (ms since fio started, IOPS, direction 0 read/1 write),
    # one sample a second, from fio's --write_iops_log inside the guest.
    iops: list[tuple[int, int, int]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.fio is not None


def _log(msg: str) -> None:
    print(f"guest: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


_apt_updated = False


def _apt_update() -> None:
    global _apt_updated
    if not _apt_updated:
        _log("apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        _apt_updated = True


def ensure_packages(*pkgs: str) -> None:
    """apt-get install the host packages that are missing (one update at most)."""
    missing = [p for p in pkgs if not _installed(p)]
    if missing:
        _apt_update()
        _log(f"apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def _installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg", "-s", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "Status: install ok installed" in r.stdout


def _candidates(*pkgs: str) -> dict[str, dict[str, str]]:
    """The apt-cache fields of the versions apt would download, by package name."""
    for attempt in range(2):
        cmd = ["apt-cache", "show", "--no-all-versions", *pkgs]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = {}
        for stanza in r.stdout.split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*): (.*)$", stanza, re.M))
            if "Package" in fields:
                found[fields["Package"]] = fields
        if r.returncode == 0 and set(pkgs) <= found.keys():
            return found
        if attempt == 0:  # no lists yet (fresh machine): fetch them once
            _apt_update()
    raise GuestError(f"apt-cache show {' '.join(pkgs)} failed: {r.stderr.strip()}")


def _download(pkgs: list[str], dest: Path) -> None:
    # Run as root in a private dir: tell apt not to drop to the _apt user.
    cmd = ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", *pkgs]
    try:
        subprocess.run(cmd, check=True, cwd=dest, capture_output=True)
    except subprocess.CalledProcessError:
        _apt_update()  # stale lists name versions the mirror no longer has
        subprocess.run(cmd, check=True, cwd=dest, capture_output=True)


def default_cache() -> Path:
    return Path(os.environ.get("FUSEDISK_GUEST_CACHE") or CACHE).expanduser()


def build_guest(cache: Path | None = None) -> GuestImage:
    """Return the cached guest, building it first if the host's inputs changed."""
    cache = Path(cache) if cache else default_cache()
    ensure_packages("fio", "cpio")
    found = _candidates(KERNEL_META, "busybox-static")
    # The meta package pins the real one: "linux-image-6.1.0-NN-cloud-amd64 (= 6.1.x-y)".
    m = re.match(r"\s*(\S+) \(= ([^)]+)\)", found[KERNEL_META]["Depends"])
    if not m:
        raise GuestError(f"unexpected Depends of {KERNEL_META}")
    kpkg, kver = m.groups()
    busybox = found["busybox-static"]["Version"]
    fio = _run(["dpkg-query", "-W", "-f", "${Version}", "fio"]).strip()
    recipe = "\n".join([kpkg, kver, busybox, fio, RECIPE, INIT, MODULES])
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    key = re.sub(r"[^\w.+-]", "_", f"{kver}-fio{fio}-{digest}")
    final = cache / key
    image = GuestImage(final / "vmlinuz", final / "initrd.cpio")
    if image.kernel.exists() and image.initrd.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the final dir and rename it into place: never a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    tmp.chmod(0o755)
    try:
        _build_into(tmp, kpkg, kver)
        try:
            tmp.rename(final)
        except OSError:  # another build won the race; keep its result
            if not image.initrd.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image


def _build_into(out: Path, kpkg: str, kver: str) -> None:
    t0 = time.monotonic()
    debs, kdir, root = out / "debs", out / "kernel", out / "root"
    for d in (debs, root):
        d.mkdir()
    _log(f"downloading {kpkg} {kver} and busybox-static")
    _download([f"{kpkg}={kver}", "busybox-static"], debs)
    for deb in debs.glob("*.deb"):
        _run(["dpkg-deb", "-x", str(deb), str(root if "busybox" in deb.name else kdir)])
    shutil.copyfile(next((kdir / "boot").glob("vmlinuz-*")), out / "vmlinuz")

    for sub in ("proc", "sys", "dev", "tmp", "etc", "job", "lib/modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "usr", ignore_errors=True)  # busybox-static's docs
    for applet in _run([str(root / "bin/busybox"), "--list"]).split():
        if not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")

    # Modules go flat into /lib/modules, uncompressed (busybox insmod may not
    # read .ko.xz).
    found = {p.name.split(".ko")[0]: p for p in (kdir / "lib/modules").rglob("*.ko*")}
    order = [m for m in MODULES.split() if m in found]
    if "virtio_blk" not in order:
        raise GuestError(f"{kpkg} has no virtio_blk module")
    unpack: dict[str, Callable[[bytes], bytes]] = {
        ".ko": bytes,
        ".xz": lzma.decompress,
        ".gz": gzip.decompress,
    }
    for name in order:
        src = found[name]
        if src.suffix not in unpack:
            raise GuestError(f"cannot decompress {src}")
        (root / "lib/modules" / f"{name}.ko").write_bytes(unpack[src.suffix](src.read_bytes()))
    (root / "etc/modules").write_text(" ".join(order) + "\n")

    # The host's fio and every library ldd names, at the same paths (the
    # loader included), with symlinks resolved to plain files.
    libs = re.findall(r"(?:=>\s*|^\s*)(/\S+)", _run(["ldd", "/usr/bin/fio"]), re.M)
    for path in ["/usr/bin/fio", *libs]:
        dst = root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(path), dst)
        dst.chmod(0o755)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)

    # Uncompressed: under TCG, inflating a gzip'ed initrd costs the guest ~1 s
    # of its ~3 s boot; 85 MiB on disk is the cheaper price.
    (out / "initrd.cpio").write_bytes(_pack(root))
    for d in (debs, kdir, root):
        shutil.rmtree(d)
    size = (out / "initrd.cpio").stat().st_size >> 20
    _log(f"built guest in {time.monotonic() - t0:.1f}s (initrd {size} MiB)")


def _pack(root: Path) -> bytes:
    """A newc cpio archive of the tree at root, owned by root."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cmd = ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"]
    names_in = "\n".join(names).encode()
    return subprocess.run(cmd, input=names_in, cwd=root, capture_output=True, check=True).stdout


class GuestRun:
    """A running guest (see start_fio). wait() returns its GuestResult."""

    def __init__(
        self,
        cmd: list[str],
        workdir: Path,
        nonce: str,
        timeout: float,
        console_log: Path | None,
        disk: Path,
    ) -> None:
        self.cmd, self._workdir, self._nonce, self._disk = cmd, workdir, nonce, disk
        self._console_log = console_log
        self.unkillable = False  # QEMU outlived SIGKILL: its I/O is stuck in the kernel
        self.started = threading.Event()  # fio has begun inside the guest
        self._done = threading.Event()  # END marker seen or QEMU's stdout closed
        self._lines: list[str] = []
        self._rc: int | None = None
        self._t0 = time.monotonic()
        self._t_start = self._t_end = 0.0
        self.deadline = self._t0 + timeout
        self._log: IO[str] | None = console_log.open("w") if console_log else None
        # stdin is the guest's console input: a script's step() waits there (resume()).
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        end = re.compile(rf"FUSEDISK-END-{self._nonce} rc=(\d+)")
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self._lines.append(line)
            if self._log:
                self._log.write(line + "\n")
                self._log.flush()
            if line.endswith(f"FUSEDISK-START-{self._nonce}"):
                self._t_start = time.monotonic()
                self.started.set()
            elif m := end.search(line):
                self._rc, self._t_end = int(m.group(1)), time.monotonic()
                self._done.set()
        self._done.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until fio runs in the guest (True) or timeout/QEMU exit (False)."""
        limit = self.deadline if timeout is None else time.monotonic() + timeout
        while not self.started.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() >= limit:
                return self.started.is_set()
        return True

    def wait_step(self, name: str, timeout: float) -> None:
        """Block until the guest's script reaches ``step NAME`` (it then waits for resume());
        GuestError if QEMU exits or the timeout passes first."""
        line = f"FUSEDISK-STEP-{self._nonce} {name}"
        limit = time.monotonic() + timeout
        while not any(ln.endswith(line) for ln in self._lines):
            if self._done.is_set() or time.monotonic() >= limit:
                tail = " | ".join(_plain(ln) for ln in self._lines[-5:] if _plain(ln))
                raise GuestError(f"the guest never reached step {name!r}; console tail: {tail}")
            time.sleep(0.05)

    def resume(self) -> None:
        """Let the guest's script go on from the step it waits at."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Its threads sleep in the kernel on requests a FUSE daemon read and never
            # answered; it exits when they are answered (or the connection is aborted).
            self.unkillable = True

    def _cleanup(self) -> None:
        self.kill()
        self._reader.join(5)
        if self._log:
            self._log.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def wait(self) -> GuestResult:
        """Wait for the result; GuestError if none came before the deadline."""
        diagnosis = ""
        try:
            self._done.wait(max(0.0, self.deadline - time.monotonic()))
            with contextlib.suppress(subprocess.TimeoutExpired):
                # After its result the guest powers off by itself.
                self.proc.wait(timeout=10 if self._rc is not None else 1)
            if self._rc is None and self.proc.poll() is None:
                diagnosis = self._diagnose()  # before QEMU is killed: who waits for whom
        finally:
            self._cleanup()
        console = "\n".join(self._lines)
        if self._rc is None:
            why = "timed out" if time.monotonic() >= self.deadline else "exited"
            tail = " | ".join(_plain(ln) for ln in self._lines[-3:] if _plain(ln))
            if self.unkillable:
                diagnosis += f"; QEMU (pid {self.proc.pid}) did not exit on SIGKILL in 60 s"
            raise GuestError(f"guest {why} without a fio result{diagnosis}; console tail: {tail}")
        return GuestResult(
            status=self._rc,
            fio=_parse_result(self._lines, self._nonce),
            boot_seconds=self._t_start - self._t0,
            elapsed_seconds=self._t_end - self._t0,
            console=console,
            iops=_parse_iops(self._lines, self._nonce),
        )

    def _diagnose(self) -> str:
        """A guest whose I/O stopped: say which side holds it, the disk's FUSE daemon (requests
        the kernel queued and the daemon has not answered; its Python stacks, with py-spy) or
        QEMU (where its threads sleep).  Written to a file; its first line is returned."""
        try:
            fuse = _fuse_side(self._disk)
        except OSError as e:
            fuse = [f"the disk's FUSE side could not be read: {e}"]
        report = [f"guest on {self._disk}, QEMU pid {self.proc.pid}", *fuse]
        report.append("QEMU threads (id, name, state, kernel function it sleeps in):")
        report += _threads(self.proc.pid)
        where = self._console_log.parent if self._console_log else Path(tempfile.gettempdir())
        path = where / f"guest-hang-{self._nonce}.txt"
        with contextlib.suppress(OSError):
            path.write_text("\n".join(report) + "\n")
        return f" ({fuse[0]}; details in {path})"

    def __enter__(self) -> "GuestRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup()


def _fuse_side(disk: Path) -> list[str]:
    """The FUSE connection serving ``disk`` and its daemon(s), for a hang report."""
    # From mountinfo, not stat(): a stat of a path on a hung mount would hang too.
    path, mounts = os.path.abspath(disk), []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype.startswith("fuse") and path.startswith(fields[4].rstrip("/") + "/"):
            mounts.append((len(fields[4]), int(fields[2].split(":")[1]), fields[4]))
    if not mounts:
        return [f"{disk} is not on a FUSE mount"]
    _, minor, mountpoint = max(mounts)
    conn = Path("/sys/fs/fuse/connections")
    if not (conn / str(minor)).exists() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conn)], capture_output=True)
    try:
        waiting = (conn / str(minor) / "waiting").read_text().strip()
    except OSError:
        waiting = "? (fusectl is not mounted)"
    lines = [f"FUSE connection {minor} ({mountpoint}): requests waiting for its daemon: {waiting}"]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    for pid in _fuse_daemons(mountpoint):
        lines.append(f"daemon pid {pid}:")
        lines += _threads(pid)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            dump = [spy, "dump", "--nonblocking", "--pid", str(pid)]
            lines.append(subprocess.run(dump, capture_output=True, text=True, timeout=30).stdout)
    return lines


def _fuse_daemons(mountpoint: str) -> list[int]:
    """Processes holding /dev/fuse open whose command line names ``mountpoint`` (all of them
    if none does: a daemon may have been given a relative path)."""
    holders = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if any(os.readlink(fd) == "/dev/fuse" for fd in (proc / "fd").iterdir()):
                holders[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace")
    named = [pid for pid, cmdline in holders.items() if mountpoint in cmdline]
    return named or sorted(holders)


def _threads(pid: int) -> list[str]:
    """Each thread of ``pid``: its name, state and the kernel function it sleeps in."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            name = (task / "comm").read_text().strip()
            lines.append(f"  {task.name} {name} {state} {(task / 'wchan').read_text()}")
    return lines


def _plain(line: str) -> str:
    """line without terminal escapes (SeaBIOS clears the screen) or control bytes."""
    return re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|.)|[\x00-\x1f]", "", line).strip()


def _parse_result(lines: list[str], nonce: str) -> dict[str, Any] | None:
    marks = [i for i, ln in enumerate(lines) if ln.endswith(f"FUSEDISK-BEGIN-{nonce}")]
    if not marks:
        return None
    text = "\n".join(lines[marks[-1] + 1 :])
    start = text.find("{")  # fio may print notes before the JSON
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _parse_iops(lines: list[str], nonce: str) -> list[tuple[int, int, int]]:
    """fio iops-log lines ("msec, iops, ddir, bs, offset") that run.sh tagged with the nonce."""
    samples = []
    tag = f"FUSEDISK-IOPS-{nonce} "
    for line in lines:
        _, found, rest = line.partition(tag)
        fields = [f.strip() for f in rest.split(",")]
        if found and len(fields) >= 3 and all(f.isdigit() for f in fields[:3]):
            samples.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return samples


def start_fio(
    disk: Path,
    fio_args: list[str],
    *,
    fmt: str = "raw",
    accel: str = "tcg",
    memory: int = 512,
    smp: int = 1,
    timeout: float = 600.0,
    job_file: Path | None = None,
    console_log: Path | None = None,
    guest: GuestImage | None = None,
    qemu_args: list[str] | None = None,
    iops_log: bool = False,
    script: str | None = None,
    drive_options: str = "",
) -> GuestRun:
    """Boot a guest running `fio FIO_ARGS [JOB_FILE]` against its /dev/vda (= disk).

    fio_args are fio's command-line arguments (include --filename=/dev/vda);
    --clocksource=clock_gettime and JSON output are always added.

    Returns at once; the caller may act on the disk's host side meanwhile.
    Trap: with --time_based, fio never reaches its verify phase (the writes use
    all the runtime); add --verify_backlog=N or bound the job by --size instead.

    script: a shell script to run in the guest instead (fio_args are then unused); it
    runs fio itself as $FIO (with the forced options), leaves the JSON of the run to report
    in /tmp/fio.json, and may call `step NAME` to print a marker and wait until the host
    sees it (GuestRun.wait_step) and lets it go on (GuestRun.resume).  drive_options are
    added to -drive (e.g. "discard=unmap").
    """
    if fmt not in FORMATS or accel not in ACCELS:
        raise ValueError(f"format must be one of {FORMATS}, accel one of {ACCELS}")
    ensure_packages("qemu-system-x86")
    guest = guest or build_guest()
    nonce = uuid.uuid4().hex[:16]
    work = Path(tempfile.mkdtemp(prefix="fusedisk-guest-"))
    # Ours come last so they win. No default --filename: fio adds a global one
    # to a job's own, and the job then splits its I/O over two "files" that
    # are the same /dev/vda -- and fails its verify.
    args = [*fio_args, *FIO_FORCED, "--output=/tmp/fio.json"]
    jobdir = work / "job-root"
    (jobdir / "job").mkdir(parents=True)
    if job_file is not None:
        shutil.copyfile(job_file, jobdir / "job/job.fio")
        args.append("/job/job.fio")
    (jobdir / "job/nonce").write_text(nonce + "\n")
    run_script = f"exec /usr/bin/fio {shlex.join(args)}\n"
    if iops_log:
        # One IOPS sample a second, printed on the console (tagged) once fio is done.
        args += ["--write_iops_log=/tmp/fusedisk", "--log_avg_msec=1000"]
        run_script = (
            f"/usr/bin/fio {shlex.join(args)}\nrc=$?\n"
            f"for f in /tmp/fusedisk_iops*.log; do "
            f'sed "s/^/FUSEDISK-IOPS-{nonce} /" "$f"; done\nexit $rc\n'
        )
    if script is not None:
        steps = f'step() {{ echo "FUSEDISK-STEP-{nonce} $1"; read -r _; }}\n'
        forced = shlex.join(["/usr/bin/fio", *FIO_FORCED])
        script = f"set -e\nFIO={shlex.quote(forced)}\n{steps}{script}"
    else:
        script = run_script
    (jobdir / "job/run.sh").write_text(script)
    # QEMU takes one initrd on x86, but the kernel unpacks concatenated
    # archives; gzip'ing the job one spares any alignment worry after the base.
    initrd = work / "initrd.cpio"
    with initrd.open("wb") as f, guest.initrd.open("rb") as base:
        shutil.copyfileobj(base, f)
        f.write(gzip.compress(_pack(jobdir)))
    drive = str(Path(disk).resolve()).replace(",", ",,")  # QEMU escapes ',' as ',,'
    cmd = [
        "qemu-system-x86_64",
        "-nodefaults",  # no NIC/VGA/option ROMs: faster boot, nothing to probe
        "-no-user-config",
        "-nographic",
        "-serial", "stdio",
        "-no-reboot",
        "-accel", accel,
        # TCG: QEMU's default CPU model boots ~0.7 s faster than -cpu max here.
        *([] if accel == "tcg" else ["-cpu", "host"]),
        "-m", str(memory),
        "-smp", str(smp),
        "-kernel", str(guest.kernel),
        "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        "-drive", f"file={drive},format={fmt},if=virtio,cache=none,aio=threads"
        + (f",{drive_options}" if drive_options else ""),
        *(qemu_args or []),
    ]  # fmt: skip
    return GuestRun(cmd, work, nonce, timeout, console_log, Path(disk))


def run_fio(disk: Path, fio_args: list[str], **kw: Any) -> GuestResult:
    """start_fio(...).wait(): boot, run fio in the guest, return its result."""
    return start_fio(disk, fio_args, **kw).wait()


def probe_kvm(timeout: float = 20.0, guest: GuestImage | None = None) -> bool:
    """True if a KVM guest boots and runs fio here (it hangs on some hosts)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.NamedTemporaryFile(suffix=".raw") as disk:
        os.truncate(disk.name, 1 << 20)
        try:
            args = ["--name=p", "--filename=/dev/vda", "--size=64k", "--rw=read"]
            return run_fio(Path(disk.name), args, accel="kvm", timeout=timeout, guest=guest).ok
        except GuestError:
            return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached guest; print its paths")
    r = sub.add_parser("run", help="boot the guest and run fio against --disk")
    for s in (b, r):
        s.add_argument("--cache", type=Path, help="default: $FUSEDISK_GUEST_CACHE or " + CACHE)
    r.add_argument("--disk", type=Path, required=True)
    r.add_argument("--format", choices=FORMATS, default="raw")
    r.add_argument("--accel", choices=ACCELS, default="tcg")
    r.add_argument("--memory", type=int, default=512, help="MiB")
    r.add_argument("--smp", type=int, default=1)
    r.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    r.add_argument("--fio-args", default="", help='one shell-quoted string: --fio-args="--name=x"')
    r.add_argument("fio", nargs="*", help="more fio arguments, after a `--`")
    r.add_argument("--job-file", type=Path, help="fio job file, passed after --fio-args")
    r.add_argument("--console-log", type=Path, help="save the serial console here")
    a = p.parse_args(argv)
    try:
        guest = build_guest(a.cache)
        if a.cmd == "build":
            print(f"kernel: {guest.kernel}\ninitrd: {guest.initrd}")
            return 0
        fio_args = shlex.split(a.fio_args) + a.fio
        if not fio_args and not a.job_file:
            p.error("run needs fio arguments or --job-file")
        opts = {k: getattr(a, k) for k in ("accel", "memory", "smp", "timeout", "job_file")}
        res = run_fio(a.disk, fio_args, fmt=a.format, guest=guest,
                      console_log=a.console_log, **opts)  # fmt: skip
    except (GuestError, OSError, subprocess.CalledProcessError) as e:
        print(f"guest.py: error: {e}", file=sys.stderr)
        return 2
    if res.fio is not None:
        print(json.dumps(res.fio, indent=2))
    _log(f"boot {res.boot_seconds:.1f}s, total {res.elapsed_seconds:.1f}s, fio rc={res.status}")
    if not res.ok:
        msg = f"fio in the guest failed (exit status {res.status})"
        print(f"guest.py: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
