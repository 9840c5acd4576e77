"""The control channel: a Unix socket, one JSON request and one JSON reply per connection.

Security: the socket lives in a private directory (mode 0700, owned by the daemon's user), is
itself mode 0600, and every connection's peer uid (SO_PEERCRED) must be the daemon's own: only the
mount's owner can query or steer it.  The CLI finds the socket through the mount itself, in the
``user.fusedisk.control`` extended attribute of MOUNTPOINT, which only the owner can read because
the mount is not ``allow_other``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from fusedisk.errors import ControlError, FusediskError, NotMounted, StaleMount

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
CONTROL_XATTR = "user.fusedisk.control"
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


def control_socket(mountpoint: str) -> str:
    """The control socket of the fusedisk daemon serving ``mountpoint``."""
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StaleMount(path=mountpoint) from None
        if e.errno == errno.ENOENT:
            raise NotMounted(path=mountpoint, reason="no such file or directory") from None
        reason = "not served by fusedisk" if os.path.isdir(mountpoint) else "not a directory"
        raise NotMounted(path=mountpoint, reason=reason) from None


def request(mountpoint: str, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one command; return the reply, or raise ControlError with the daemon's message."""
    path = control_socket(mountpoint)
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
