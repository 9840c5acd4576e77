"""Errors a user can cause or meet, each with the facts needed to act on it.

Every error here is shown to the user as one line (``fusedisk: <message>``) and a non-zero exit;
the message says what failed and what state the disk is in now.  Engine code raises these or plain
``OSError``; only the FUSE layer turns them into errno replies, and only the CLI prints them.
"""

from __future__ import annotations


class FusediskError(Exception):
    """Base class: ``template`` is formatted with the keyword arguments given."""

    template = "{message}"

    def __init__(self, **facts: object) -> None:
        self.facts = facts
        super().__init__(self.template.format(**facts))


class UsageError(FusediskError):
    """Bad input from the user; nothing was changed."""


class NotMounted(UsageError):
    template = "{path} is not a fusedisk mount ({reason})"


class StaleMount(UsageError):
    template = (
        "{path} is a stale mount left by a fusedisk daemon that is gone; "
        "clear it with 'fusedisk unmount {path}' (or 'fusermount3 -u {path}')"
    )


class MoveRefused(UsageError):
    template = "cannot move to {dest}: {reason}; nothing was changed, the disk stays on {source}"


class MoveFailed(FusediskError):
    template = "move to {dest} {phase}: {reason}; the VM is still on {source}"


class StateError(FusediskError):
    """An illegal phase transition: a bug, never a user mistake."""

    template = "illegal move transition {current} -> {wanted}"


class VerifyMismatch(FusediskError):
    template = "verify found {source} and {dest} differ at offset {offset} ({length} bytes)"


class ControlError(FusediskError):
    template = "{message}"
