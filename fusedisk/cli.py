"""The ``fusedisk`` command.  Every user mistake ends in one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from fusedisk.control import STATUS_NAME, request, runtime_dir
from fusedisk.destination import DEST_TIMEOUT
from fusedisk.errors import FusediskError, MoveFailed, UsageError
from fusedisk.units import human, parse_size

TERMINAL_PHASES = ("done", "failed", "cancelled")


def _abs(path: str) -> str:
    """Absolute without resolving links: the daemon runs elsewhere, and must see the same path."""
    return os.path.abspath(path)


# ---- mount and unmount --------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    import trio

    from fusedisk.daemon import MountConfig, runtime_name, serve

    image, mountpoint = _abs(args.image), _abs(args.mountpoint)
    config = MountConfig(
        image=image,
        mountpoint=mountpoint,
        name=args.name or os.path.basename(image),
        allow_other=args.allow_other,
    )
    if "/" in config.name or config.name in ("", ".", ".."):
        raise UsageError(message=f"--name {config.name!r} is not a plain file name")
    if config.name == STATUS_NAME:
        raise UsageError(message=f"--name {STATUS_NAME} is the mount's status file; choose another")
    if not args.foreground:
        return _spawn_daemon(args, mountpoint, runtime_name(mountpoint))

    def ready(found: str) -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"ok {found}\n".encode())
            os.close(args.ready_fd)
        elif found:
            print(f"fusedisk: {found}", file=sys.stderr)

    try:
        trio.run(serve, config, ready)
    except FusediskError as e:
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error {e}\n".encode())
        raise
    return 0


def _spawn_daemon(args: argparse.Namespace, mountpoint: str, name: str) -> int:
    """Run the daemon detached; return once it reports the mount ready (or why it is not)."""
    log_path = os.path.join(runtime_dir(), name + ".log")
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "fusedisk", "mount", "--foreground"]
    command += ["--ready-fd", str(write_end), args.image, args.mountpoint]
    if args.name:
        command += ["--name", args.name]
    if args.allow_other:
        command += ["--allow-other"]
    if args.debug:
        command += ["--debug"]
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_end,),
            start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        line = ready.readline().strip()
    status, _, message = line.partition(" ")
    if status == "ok":
        if message:
            print(f"fusedisk: {message}", file=sys.stderr)
        return 0
    if status == "error":
        child.wait()
        raise UsageError(message=message)
    code = child.wait()
    raise UsageError(message=f"the daemon exited ({code}) before mounting; see {log_path}")


def cmd_unmount(args: argparse.Namespace) -> int:
    mountpoint = _abs(args.mountpoint)
    pid: int | None = None
    try:
        pid = int(request(mountpoint, {"command": "status"})["pid"])
    except FusediskError as e:
        if "stale mount" not in str(e):
            raise
    try:
        result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError(message="fusermount3 is not installed (Debian package fuse3)") from None
    if result.returncode != 0:
        error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        if "busy" in error.lower():
            raise UsageError(
                message=f"{mountpoint} is busy (a process such as QEMU has the disk open); "
                "still mounted, nothing changed"
            )
        raise UsageError(message=f"could not unmount {mountpoint}: {error}")
    if pid is not None:
        _wait_for_exit(pid, timeout=120.0)
    return 0


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.02)
    raise UsageError(message=f"unmounted, but daemon pid {pid} still runs after {timeout:.0f} s")


# ---- status and moves -------------------------------------------------------------------


def _format_status(s: dict[str, Any]) -> str:
    lines = [
        f"mount:   {s['mountpoint']}/{s['name']} (daemon pid {s['pid']})",
        f"image:   {s['image']} ({human(s['size'])})",
        f"phase:   {s['phase']}",
    ]
    if s["phase"] != "idle":
        lines += [
            f"move:    {s['source']} -> {s['destination']} ({s['step']})",
            f"pass:    {human(s['progress_bytes'])} of {human(s['total_bytes'])}; copied "
            f"{human(s['copied_bytes'])}, synced by writes {human(s['synced_by_writes_bytes'])}, "
            f"holes {human(s['hole_bytes'])}, mirrored {human(s['mirrored_bytes'])}",
            f"rate:    {human(s['rate'])}/s (limit "
            f"{human(s['rate_limit']) + '/s' if s['rate_limit'] else 'none'})",
        ]
        if s["switch_pause_ms"] is not None:
            lines.append(f"switch:  I/O held for {s['switch_pause_ms']:.3f} ms")
        if s["error"]:
            lines.append(f"error:   {s['error']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = request(_abs(args.mountpoint), {"command": "status"})
    print(json.dumps(status, sort_keys=True) if args.json else _format_status(status))
    return 0


def _progress_line(s: dict[str, Any], width: int = 30) -> str:
    total = max(s["total_bytes"], 1)
    done = min(s["progress_bytes"], total)
    filled = int(width * done / total)
    rate = s["rate"]
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 and s["phase"] == "mirroring" else "-"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {human(done)}/{human(total)} "
        f"{human(rate)}/s ETA {eta} {s['phase']}: {s['step']}"
    )


def _watch(mountpoint: str, as_json: bool) -> dict[str, Any]:
    """Show progress until the move ends; Ctrl-C cancels it (the VM stays on the source)."""
    tty = sys.stderr.isatty() and not as_json
    last_line = 0.0
    try:
        while True:
            s = request(mountpoint, {"command": "status"})
            if s["phase"] in TERMINAL_PHASES:
                break
            now = time.monotonic()
            if tty:
                print("\r" + _progress_line(s), end="", file=sys.stderr, flush=True)
            elif now - last_line >= 2.0:
                print(_progress_line(s), file=sys.stderr, flush=True)
                last_line = now
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nfusedisk: interrupted: cancelling the move", file=sys.stderr)
        s = request(mountpoint, {"command": "cancel"}, timeout=120)
    if tty:
        print("\r" + _progress_line(s), file=sys.stderr)
    return s


def parse_seconds(option: str, text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 86400:  # NaN too
        raise UsageError(message=f"{option} {text!r} is not a number of seconds (0 to 86400)")
    return seconds


def cmd_migrate(args: argparse.Namespace) -> int:
    mountpoint = _abs(args.mountpoint)
    command = {
        "command": "migrate",
        "destination": _abs(args.destination),
        "rate_limit": parse_size(args.rate) if args.rate else 0,
        "keep_source": args.keep_source,
        "verify": args.verify,
        "force": args.force,
        "dest_timeout": (
            parse_seconds("--dest-timeout", args.dest_timeout) if args.dest_timeout else None
        ),
    }
    status = request(mountpoint, command)
    if not args.detach:
        status = _watch(mountpoint, args.json)
    if args.json:
        print(json.dumps(status, sort_keys=True))
    if status["phase"] in ("failed", "cancelled"):
        raise MoveFailed(
            dest=status["destination"],
            phase=status["phase"],
            reason=status["error"],
            source=status["source"],
        )
    if not args.json and status["phase"] == "done":
        print(
            f"moved to {status['destination']}: copied {human(status['copied_bytes'])}, "
            f"I/O held {status['switch_pause_ms']:.3f} ms at the switch"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    status = request(_abs(args.mountpoint), {"command": "cancel"}, timeout=120)
    if status["phase"] == "done":
        raise UsageError(
            message=f"too late: the move had switched; the disk is on {status['image']}"
        )
    print(f"cancelled: the disk stays on {status['image']}")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    rate = parse_size(args.rate)
    request(_abs(args.mountpoint), {"command": "rate", "rate_limit": rate})
    print(f"rate limit: {human(rate) + '/s' if rate else 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedisk", description="Serve a VM disk image through FUSE and live-move it."
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="serve IMAGE as MOUNTPOINT/NAME")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--name", help="the file's name in the mount (default: IMAGE's basename)")
    p.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    p.add_argument("--allow-other", action="store_true", help="let other users open the disk")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", help="flush everything to the image and stop the daemon")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_unmount)

    p = sub.add_parser("status", help="show the image, the move phase and its counters")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("migrate", help="live-move the mounted image to DEST")
    p.add_argument("mountpoint")
    p.add_argument("destination")
    p.add_argument("--rate", help="copy at most RATE bytes/s, like 50M or 1G (default: no limit)")
    p.add_argument("--keep-source", action="store_true", help="do not delete the source")
    p.add_argument("--verify", action="store_true", help="compare both files before switching")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument(
        "--dest-timeout",
        metavar="SECONDS",
        help=f"longest guest I/O may wait for DEST before the move fails back (default: "
        f"{DEST_TIMEOUT:g} on network and FUSE filesystems, 0 on local ones; 0: no bound, DEST "
        "is written inline)",
    )
    p.add_argument("--detach", action="store_true", help="return once the move has started")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("cancel", help="stop a move and fail back to the source")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("rate", help="change a running move's rate limit (0: none)")
    p.add_argument("mountpoint")
    p.add_argument("rate")
    p.set_defaults(func=cmd_rate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
        return code
    except FusediskError as e:
        print(f"fusedisk: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"fusedisk: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the last resort: still one line, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"fusedisk: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
