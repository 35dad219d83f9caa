"""Sizes (512M, 4G) and durations (90s, 10m, 2h, HH:MM:SS) as users type them."""

from __future__ import annotations

import pytest

from hpc_compute.units import format_size, format_slurm_time, parse_duration, parse_size

K, M, G, T = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * M),
        ("4G", 4 * G),
        ("4g", 4 * G),
        ("1.5G", int(1.5 * G)),
        ("4GB", 4 * G),
        ("4GiB", 4 * G),
        ("4Gi", 4 * G),
        ("1K", K),
        ("2T", 2 * T),
        ("1P", 1024**5),
        ("100", 100),
        ("100B", 100),
        ("  512M  ", 512 * M),
        ("0", 0),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "G", "-1G", "-5", "1e5", "4X", "4 GG", "1,5G", "abc", "4iB", "9" * 400, "4G4", "0x10"],
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_refuses_negative_int_and_bool() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError):
        parse_size(True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 90),
        ("90", 90),
        ("10m", 600),
        ("10min", 600),
        ("2h", 7200),
        ("2H", 7200),
        ("1.5h", 5400),
        ("1d", 86400),
        ("90sec", 90),
        ("01:30:00", 5400),
        ("1:30:00", 5400),
        ("00:00:01", 1),
        ("10:30", 630),  # MM:SS, like Slurm
        ("90:00", 5400),  # minutes may exceed 59 without hours, like Slurm
        ("1-00:00:00", 86400),
        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("1-10:00", 86400 + 10 * 3600),  # Slurm's days-hours:minutes
        (" 2h ", 7200),
        (45, 45),
        (2.9, 2),
    ],
)
def test_parse_duration(text: str | int | float, expected: int) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "h",
        "-5m",
        "10 minutes",
        "2w",
        "1:60:00",
        "1:00:60",
        "00:99",
        "1-10:75",
        "1:2:3:4",
        "abc",
        "9" * 400,
        "9" * 400 + "d",
    ],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5, float("inf"), float("nan"), True])
def test_parse_duration_refuses_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(1, "0-00:01:00"), (60, "0-00:01:00"), (61, "0-00:02:00"), (3600, "0-01:00:00"), (90061, "1-01:02:00")],
)
def test_format_slurm_time_rounds_up_to_minutes(seconds: int, expected: str) -> None:
    assert format_slurm_time(seconds) == expected


def test_slurm_time_round_trips_through_parse() -> None:
    for seconds in (60, 3600, 5400, 86400, 2 * 86400 + 3 * 3600 + 4 * 60):
        assert parse_duration(format_slurm_time(seconds)) == seconds


@pytest.mark.parametrize(
    ("n_bytes", "expected"), [(0, "0B"), (1023, "1023B"), (1536, "1.5K"), (3 * M, "3.0M"), (4 * G, "4.0G")]
)
def test_format_size(n_bytes: int, expected: str) -> None:
    assert format_size(n_bytes) == expected
