"""The control channel: a Unix socket, one JSON request and one JSON reply per connection.

Security: the socket lives in a private directory (mode 0700, owned by the daemon's user), is
itself mode 0600, and every connection's peer uid (SO_PEERCRED) must be the daemon's own: only the
mount's owner can query or steer it.  The CLI recognises a fusedisk mount by its type in
/proc/self/mountinfo (``fuse.fusedisk``) and finds the socket in the mount's status file
(``MOUNTPOINT/.status``), which only the owner can read unless the mount is ``allow_other``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from fusedisk.errors import ControlError, FusediskError, NotMounted, StaleMount

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
FSTYPE = "fuse.fusedisk"  # the type in /proc/self/mountinfo: fuse.SUBTYPE
STATUS_NAME = ".status"  # the status file in the mount: found by name, never listed
MAX_REQUEST = 1 << 16


def runtime_dir() -> str:
    """A directory only this user can enter, for sockets and daemon logs."""
    uid = os.getuid()
    candidates = []
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.stat(base).st_uid == uid:  # not after a bare `su`
        candidates.append(os.path.join(base, "fusedisk"))
    candidates.append("/run/fusedisk" if uid == 0 else f"/tmp/fusedisk-{uid}")
    for path in candidates:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == uid and not st.st_mode & 0o077 and stat.S_ISDIR(st.st_mode):
            return path
    raise ControlError(message=f"no private runtime directory for uid {uid}: tried {candidates}")


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def serve_control(
    path: str, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` until cancelled; reply to each request with ``handler``'s dict."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    try:
        task_status.started()

        async def serve_one(stream: trio.SocketStream) -> None:
            await _serve_one(stream, handler)

        await trio.serve_listeners(serve_one, [trio.SocketListener(sock)])
    finally:
        with trio.CancelScope(shield=True):
            if os.path.lexists(path):
                os.unlink(path)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    """Answer one request (from the owner only)."""
    async with stream:
        uid = _peer_uid(stream.socket)
        if uid != os.getuid():
            log.warning("refused a control connection from uid %d", uid)
            await _reply(stream, {"ok": False, "error": "permission denied: not the mount's owner"})
            return
        data = b""
        with trio.move_on_after(10):
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        try:
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            reply = {"ok": True, **await handler(request)}
        except FusediskError as e:
            reply = {"ok": False, "error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}"}
        except Exception as e:  # never let one request take the daemon (and the disk) down
            log.exception("control request %r failed", data[:200])
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        await _reply(stream, reply)


async def _reply(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError):  # the client went away
        await stream.send_all(json.dumps(reply).encode() + b"\n")


# ---- the client side (blocking; used by the CLI) -----------------------------------------


def mounts() -> Iterator[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in /proc/self/mountinfo's order."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            yield point, fields[fields.index("-") + 1]


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted at ``mountpoint`` (the topmost mount), from
    /proc/self/mountinfo: unlike a stat, it answers for a stale mount too."""
    target = os.path.realpath(mountpoint)
    found = None
    for point, kind in mounts():
        if point == target:
            found = kind
    return found


def status_path(mountpoint: str) -> str:
    return os.path.join(mountpoint, STATUS_NAME)


def read_status(mountpoint: str) -> dict[str, Any]:
    """The live status of the fusedisk mount at ``mountpoint``, read from its status file.

    Raises NotMounted unless a fusedisk mount is there, StaleMount if its daemon is gone."""
    kind = mount_type(mountpoint)
    if kind != FSTYPE:
        if not os.path.lexists(mountpoint):
            reason = "no such file or directory"
        elif not os.path.isdir(mountpoint):
            reason = "not a directory"
        else:
            reason = "not a mount point" if kind is None else f"a {kind} mount"
        raise NotMounted(path=mountpoint, reason=reason)
    try:
        with open(status_path(mountpoint), "rb") as f:
            status: dict[str, Any] = json.loads(f.read())
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StaleMount(path=mountpoint) from None
        raise NotMounted(path=mountpoint, reason=f"its status: {e.strerror}") from None
    return status


def control_socket(mountpoint: str) -> str:
    """The control socket of the fusedisk daemon serving ``mountpoint``."""
    return str(read_status(mountpoint)["control"])


def request(mountpoint: str, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to the daemon serving ``mountpoint``; see :func:`ask`."""
    return ask(control_socket(mountpoint), command, timeout, mountpoint)


def ask(
    path: str, command: dict[str, Any], timeout: float = 30.0, mountpoint: str = "the mount"
) -> dict[str, Any]:
    """Send one command to the control socket ``path``; return the reply, or raise ControlError
    with the daemon's message.  Touches nothing in the mount (request counts stay exact)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(command).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise ControlError(
            message=f"cannot reach the fusedisk daemon of {mountpoint} at {path}: {e.strerror}"
        ) from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(message=f"the daemon of {mountpoint} sent no reply") from None
    if not reply.pop("ok", False):
        raise ControlError(message=str(reply.get("error", "unknown error")))
    return reply
