"""Parsing of the human units users type: sizes (``512M``, ``4G``) and durations (``90s``, ``2h``, ``HH:MM:SS``)."""

from __future__ import annotations

import math
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(?:i?B?)|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_CLOCK_RE = re.compile(r"^\s*(?:(\d+)-)?(?:(\d+):)?(\d+):(\d{1,2})\s*$")


def parse_size(text: str | int) -> int:
    """Return a size in bytes. Suffixes are binary (Slurm's habit): ``4G`` = 4 GiB; bare numbers are bytes."""
    if isinstance(text, bool):
        raise ValueError("a size must be a number of bytes or a string like 512M or 4G")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a size must not be negative")
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; use a number with an optional K, M, G, T suffix (512M, 4G)")
    value = float(match.group(1)) * _SIZE_FACTORS[(match.group(2) or "").upper()]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large a size")
    return int(value)


def parse_duration(text: str | int | float) -> int:
    """Return a duration in whole seconds from ``90``, ``90s``, ``10m``, ``2h``, ``1d``, ``MM:SS``,
    ``HH:MM:SS`` or Slurm's ``D-HH:MM:SS``."""
    if isinstance(text, bool):
        raise ValueError("a duration must be seconds or a string like 90s, 10m, 2h or HH:MM:SS")
    if isinstance(text, int | float):
        if not math.isfinite(text):
            raise ValueError("a duration must be a finite number of seconds")
        if text < 0:
            raise ValueError("a duration must not be negative")
        return int(text)
    match = _DURATION_RE.match(text)
    if match:
        unit = (match.group(2) or "s").lower()
        value = float(match.group(1)) * _DURATION_FACTORS[unit]
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is too long a duration")
        return int(value)
    clock = _CLOCK_RE.match(text)
    if clock:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in clock.groups())
        has_hours = clock.group(2) is not None
        if clock.group(1) is not None and not has_hours:
            # Slurm reads D-HH:MM as days-hours:minutes (not minutes:seconds).
            hours, minutes, seconds, has_hours = minutes, seconds, 0, True
        if seconds >= 60 or (has_hours and minutes >= 60):
            raise ValueError(f"{text!r}: minutes and seconds must be below 60")
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    raise ValueError(f"{text!r} is not a duration; use 90s, 10m, 2h, 1d or HH:MM:SS")


def format_slurm_time(seconds: int) -> str:
    """Slurm's ``--time`` format, in whole minutes rounded up: ``D-HH:MM:SS``."""
    minutes = max(1, -(-seconds // 60))
    days, rem = divmod(minutes * 60, 86400)
    hours, rem = divmod(rem, 3600)
    mins = rem // 60
    return f"{days}-{hours:02d}:{mins:02d}:00"


def format_size(n_bytes: int) -> str:
    """A short human size: 1.5K, 3.0M, 4.0G."""
    value = float(n_bytes)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
