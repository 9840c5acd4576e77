"""Parsing and printing sizes and rates."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'50M' -> 52428800.  Binary units (K, M, G, T; an 'iB' or 'B' may follow); 0 = none."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?(?:/s)?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 50M, 1G, 0 for unlimited)")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    return max(1, int(value)) if value > 0 else 0  # 0.5 means one byte, not "no limit"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
