"""Reading user-named files without blocking or unbounded reads, and strict numbers."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_allreduce.bounds import MAX_CONFIG_KEY, parse_count, parse_seconds
from pytest_allreduce.paths import UnusableFile, output_dir_problem, read_regular_file


@pytest.fixture(autouse=True)
def alarm() -> Iterator[None]:
    """Fail instead of hanging when a read blocks."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_regular_file_within_the_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, 100) == b"x" * 100
    with pytest.raises(UnusableFile, match=rf"^{path}: is 100 bytes, larger than 99"):
        read_regular_file(path, 99)


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
        (lambda p: p.mkdir(), "is a directory, not a regular file"),
        (lambda p: p.symlink_to("/dev/zero"), "is a character device, not a regular file"),
        (lambda p: None, "no such file"),
        (lambda p: _sparse(p, 1 << 30), "larger than"),
    ],
    ids=["fifo", "directory", "dev-zero", "missing", "sparse-1GiB"],
)
def test_anything_else_is_refused_naming_the_file(
    tmp_path: Path, make: object, message: str
) -> None:
    path = tmp_path / "config.json"
    make(path)  # type: ignore[operator]
    with pytest.raises(UnusableFile, match=str(path)) as refused:
        read_regular_file(path, 16 << 20)
    assert message in str(refused.value)


def test_a_path_under_a_file_and_a_nul_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnusableFile, match="a part of the path is a file"):
        read_regular_file(tmp_path / "file" / "config.json", 100)
    with pytest.raises(UnusableFile, match="NUL"):
        read_regular_file(f"{tmp_path}/a\0b", 100)


def test_output_dir_problems(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert output_dir_problem(tmp_path / "new" / "deeper") is None
    assert output_dir_problem(tmp_path) is None
    assert "not a directory" in str(output_dir_problem(tmp_path / "file"))
    assert "which is a regular file" in str(output_dir_problem(tmp_path / "file" / "out"))
    assert output_dir_problem("  ") == "is empty"


def test_counts_are_plain_bounded_decimals() -> None:
    assert parse_count("0042", MAX_CONFIG_KEY) == 42
    assert parse_count(str(MAX_CONFIG_KEY), MAX_CONFIG_KEY) == MAX_CONFIG_KEY
    with pytest.raises(ValueError, match="above the largest allowed value, 2147483647"):
        parse_count(str(MAX_CONFIG_KEY + 1), MAX_CONFIG_KEY)
    with pytest.raises(ValueError, match=r"\(5000 characters\) is above the largest") as huge:
        parse_count("9" * 5000, MAX_CONFIG_KEY)
    assert len(str(huge.value)) < 120
    for text in ("４２", "4_2", "+42", " 42", "42.0", "", "0x2a", "٤٢"):
        with pytest.raises(ValueError, match="is not an integer"):
            parse_count(text, MAX_CONFIG_KEY)


def test_seconds_are_plain_bounded_decimals() -> None:
    assert parse_seconds("2.5") == 2.5
    assert parse_seconds(" 90 ") == 90.0
    for text in ("1e300", "inf", "nan", "-1", "0", "0.999", "86400.5", "１０", "1_0", "0x10"):
        with pytest.raises(ValueError, match="positive number of seconds from 1 to 86400"):
            parse_seconds(text)
