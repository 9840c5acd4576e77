"""Named points where a test can make the daemon die at once, as a crash or kill -9 would.

The crash-safety suite sets ``FUSEDISK_CRASH_AT=NAME[:N]`` in the daemon's environment: the Nth
time (default first) execution reaches ``crash_point(NAME)``, the process sends itself SIGKILL.
With the variable unset (always, outside tests) this costs one dictionary lookup.
Names: mirroring-started, copy-chunk, switch-held, switch-recorded, source-deleted.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("FUSEDISK_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_remaining = {_name: int(_count or 1)} if _name else {}


def crash_point(name: str) -> None:
    if name in _remaining:
        _remaining[name] -= 1
        if _remaining[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
