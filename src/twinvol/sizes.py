"""Human sizes: '1G', '512MiB', '4096' <-> bytes (binary units, as storage operators expect)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    m = _RE.match(text)
    if not m:
        raise SizeError(f"invalid size {text!r}: use bytes or a number with K, M, G, T "
                        "(e.g. 1G, 512M)")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise SizeError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def decimal_looking(text: str) -> bool:
    """True for '1GB', '500 MB' and the like: units that some tools read as powers of ten,
    which twinvol reads as binary (GiB, MiB); the CLI says so rather than guess silently."""
    m = _RE.match(text)
    return bool(m and m.group(2) and re.search(r"[KMGTP]B\s*$", text, re.IGNORECASE))


def human_size(n: int) -> str:
    """A short reading of `n` bytes (e.g. free space: '77.5GiB'), rounded, never a
    seven-digit KiB count."""
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult:
            value = n / mult
            return f"{value:.0f}{unit}iB" if value >= 100 or value == int(value) else \
                f"{value:.1f}{unit}iB"
    return f"{n}B"


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}iB"
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult:
            return f"{n / mult:.1f}{unit}iB"
    return f"{n}B"
