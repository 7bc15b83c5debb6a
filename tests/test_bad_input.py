"""Bad values for every option: a usage error (exit 4) naming the option, and nothing written.

Each case prepares what it needs in the pytester directory (a file where a directory is
expected, a FIFO, a truncated baseline...), runs pytest in-process (a usage error ends it
before any rank starts) and checks that the tree of that directory is exactly as it was:
no output dir, no baseline, no temp file. Hostile values come from a campaign against the
plugin: full-width digits, empty items, repeats, numbers of twenty and of 5000 digits, ranges
of a billion values, timeouts of 1e300, inf and nan, devices and FIFOs as files.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_allreduce import gate  # noqa: F401  (imported before pytester snapshots sys.modules: numpy cannot be imported twice)
from pytest_allreduce.options import check_baseline_device

TEST_CASE_PY = """
def test_case(allreduce_case):
    pass
"""

BASELINE = {
    "format": "pytest-allreduce-baseline",
    "format_version": 1,
    "device": "cpu",
    "device_name": "cpu",
    "world_sizes": [2],
    "entries": [
        {
            "backend": "gloo",
            "world_size": 2,
            "hidden": 4096,
            "dtype": "bfloat16",
            "batch_size": 1,
            "job": "allreduce",
            "samples_us": [10.0, 11.0],
        }
    ],
}

Prepare = Callable[[Path], list[str]]


def _flag(option: str, value: str) -> Prepare:
    return lambda _: [f"--{option}={value}"]


def _with_file(option: str, name: str, content: bytes | None, value: str | None = None) -> Prepare:
    """A file `name` (None content: a directory) made first, then --option=value (or name)."""

    def prepare(root: Path) -> list[str]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return [f"--{option}={value if value is not None else name}"]

    return prepare


def _fifo(option: str) -> Prepare:
    def prepare(root: Path) -> list[str]:
        os.mkfifo(root / "pipe")
        return [f"--{option}=pipe"]

    return prepare


def _sparse(option: str, size: int) -> Prepare:
    def prepare(root: Path) -> list[str]:
        with open(root / "huge.json", "wb") as handle:
            handle.truncate(size)
        return [f"--{option}=huge.json"]

    return prepare


def _symlink(option: str) -> Prepare:
    def prepare(root: Path) -> list[str]:
        (root / "real.json").write_text("{}")
        (root / "link.json").symlink_to("real.json")
        return [f"--{option}=link.json"]

    return prepare


def _ini(key: str, value: str) -> Prepare:
    def prepare(root: Path) -> list[str]:
        (root / "tox.ini").write_text(f"[pytest]\n{key} = {value}\n")
        return []

    return prepare


FIVE_THOUSAND_DIGITS = "7" * 5000
TOO_LONG_NAME = "n" * 300
BAD = [
    # (id, prepare, what the error must name, a fragment of why)
    ("backends-empty", _flag("allreduce-backends", ""), "--allreduce-backends", "empty list"),
    ("backends-empty-item", _flag("allreduce-backends", "gloo,,cpu_shm"), "", "empty item"),
    ("backends-repeat", _flag("allreduce-backends", "gloo,gloo"), "", "listed twice"),
    ("backends-all-and", _flag("allreduce-backends", "all,gloo"), "", "cannot be combined"),
    ("backends-unknown", _flag("allreduce-backends", "nosuch"), "", "unknown backend"),
    ("backends-fullwidth", _flag("allreduce-backends", "ｇｌｏｏ"), "", "unknown backend"),
    ("device-unknown", _flag("allreduce-device", "tpu"), "--allreduce-device", "auto, cuda"),
    ("device-fullwidth", _flag("allreduce-device", "ｃｐｕ"), "", "allowed values"),
    ("device-empty", _flag("allreduce-device", ""), "", "allowed values"),
    ("ws-zero", _flag("allreduce-world-sizes", "0"), "--allreduce-world-sizes", "positive"),
    ("ws-empty-item", _flag("allreduce-world-sizes", "2,,4"), "", "empty item"),
    ("ws-trailing-comma", _flag("allreduce-world-sizes", "2,"), "", "empty item"),
    ("ws-repeat", _flag("allreduce-world-sizes", "2,2"), "", "listed twice"),
    ("ws-fullwidth", _flag("allreduce-world-sizes", "２"), "", "not an integer"),
    ("ws-arabic-indic", _flag("allreduce-world-sizes", "٢"), "", "not an integer"),
    ("ws-20-digits", _flag("allreduce-world-sizes", "99999999999999999999"), "", "largest"),
    ("ws-5000-digits", _flag("allreduce-world-sizes", FIVE_THOUSAND_DIGITS), "", "largest"),
    ("ws-above-bound", _flag("allreduce-world-sizes", "1025"), "", "1024"),
    ("ws-billion-range", _flag("allreduce-world-sizes", "1:1000000000"), "", "largest"),
    ("ws-negative", _flag("allreduce-world-sizes", "-2"), "", "positive integer"),
    ("ws-float", _flag("allreduce-world-sizes", "2.0"), "", "not an integer"),
    ("ws-underscore", _flag("allreduce-world-sizes", "1_0"), "", "not an integer"),
    ("ws-plus", _flag("allreduce-world-sizes", "+2"), "", "not an integer"),
    ("hidden-zero", _flag("allreduce-hidden-sizes", "0"), "--allreduce-hidden-sizes", "positive"),
    ("hidden-above", _flag("allreduce-hidden-sizes", "131073"), "", "131072"),
    ("hidden-repeat", _flag("allreduce-hidden-sizes", "4096,4096"), "", "listed twice"),
    ("hidden-fullwidth", _flag("allreduce-hidden-sizes", "４０９６"), "", "not an integer"),
    (
        "batch-billion",
        _flag("allreduce-batch-sizes", "1:1000000000"),
        "--allreduce-batch",
        "1048576",
    ),
    ("batch-count", _flag("allreduce-batch-sizes", "1:5000"), "", "more than 4096 values"),
    ("batch-count-many", _flag("allreduce-batch-sizes", "1:4000,5000:6000"), "", "more than 4096"),
    ("batch-overlap", _flag("allreduce-batch-sizes", "3,1:4"), "", "3 is listed twice"),
    ("batch-empty-item", _flag("allreduce-batch-sizes", "1,,8"), "", "empty item"),
    ("batch-only-comma", _flag("allreduce-batch-sizes", ","), "", "empty item"),
    ("batch-empty", _flag("allreduce-batch-sizes", ""), "", "empty list"),
    ("batch-step-zero", _flag("allreduce-batch-sizes", "1:8:0"), "", "positive integer"),
    ("batch-huge-step", _flag("allreduce-batch-sizes", "1:8:99999999999"), "", "largest"),
    ("batch-bad-range", _flag("allreduce-batch-sizes", "1:2:3:4"), "", "a:b or a:b:step"),
    ("batch-backwards", _flag("allreduce-batch-sizes", "64:32:8"), "", "ends before it starts"),
    ("dtype-repeat", _flag("allreduce-dtypes", "bfloat16,bfloat16"), "--allreduce-dtypes", "twice"),
    ("dtype-unknown", _flag("allreduce-dtypes", "float8"), "", "unknown dtype"),
    ("dtype-empty-item", _flag("allreduce-dtypes", "bfloat16,,float16"), "", "empty item"),
    ("timeout-1e300", _flag("allreduce-timeout", "1e300"), "--allreduce-timeout", "plain decimal"),
    ("timeout-inf", _flag("allreduce-timeout", "inf"), "", "number of seconds"),
    ("timeout-nan", _flag("allreduce-timeout", "nan"), "", "number of seconds"),
    ("timeout-zero", _flag("allreduce-timeout", "0"), "", "from 1 to 86400"),
    ("timeout-negative", _flag("allreduce-timeout", "-5"), "", "number of seconds"),
    ("timeout-tiny", _flag("allreduce-timeout", "0.5"), "", "from 1 to 86400"),
    ("timeout-day-plus", _flag("allreduce-timeout", "86401"), "", "from 1 to 86400"),
    ("timeout-20-digits", _flag("allreduce-timeout", "99999999999999999999"), "", "86400"),
    ("timeout-fullwidth", _flag("allreduce-timeout", "１０"), "", "plain decimal"),
    ("timeout-empty", _flag("allreduce-timeout", ""), "", "number of seconds"),
    ("startup-1e300", _flag("allreduce-startup-timeout", "1e300"), "--allreduce-startup", ""),
    ("startup-nan", _flag("allreduce-startup-timeout", "nan"), "--allreduce-startup", ""),
    ("startup-zero", _flag("allreduce-startup-timeout", "0"), "--allreduce-startup", "from 1"),
    ("out-is-file", _with_file("allreduce-output-dir", "out", b"x"), "--allreduce-output", "file"),
    (
        "out-under-file",
        _with_file("allreduce-output-dir", "f", b"x", "f/out"),
        "--allreduce-output-dir",
        "which is a regular file",
    ),
    ("out-device", _flag("allreduce-output-dir", "/dev/null"), "", "character device"),
    ("out-long-name", _flag("allreduce-output-dir", TOO_LONG_NAME), "", "the file system allows"),
    ("out-long-path", _flag("allreduce-output-dir", "/".join(["d" * 200] * 25)), "", "limit"),
    ("out-empty", _flag("allreduce-output-dir", ""), "--allreduce-output-dir", "empty"),
    ("out-blank", _flag("allreduce-output-dir", "   "), "--allreduce-output-dir", "empty"),
    ("baseline-empty-value", _flag("allreduce-baseline", ""), "--allreduce-baseline", "empty"),
    ("baseline-missing", _flag("allreduce-baseline", "nope.json"), "", "no such baseline"),
    ("baseline-dir", _with_file("allreduce-baseline", "b", None), "", "directory"),
    ("baseline-empty-file", _with_file("allreduce-baseline", "b.json", b""), "", "empty"),
    ("baseline-blank-file", _with_file("allreduce-baseline", "b.json", b" \n"), "", "empty"),
    (
        "baseline-truncated",
        _with_file("allreduce-baseline", "b.json", json.dumps(BASELINE).encode()[:-40]),
        "--allreduce-baseline",
        "invalid JSON",
    ),
    (
        "baseline-not-a-baseline",
        _with_file("allreduce-baseline", "b.json", b'{"1": {"backend_type": "nccl"}}'),
        "",
        "'format'",
    ),
    ("baseline-fifo", _fifo("allreduce-baseline"), "", "FIFO"),
    ("baseline-dev-zero", _flag("allreduce-baseline", "/dev/zero"), "", "character device"),
    ("baseline-huge", _sparse("allreduce-baseline", 300 << 20), "", "larger than"),
    ("save-dir", _with_file("allreduce-save-baseline", "s", None), "--allreduce-save", "directory"),
    (
        "save-under-file",
        _with_file("allreduce-save-baseline", "f", b"x", "f/b.json"),
        "",
        "which is a regular file",
    ),
    ("save-blank", _flag("allreduce-save-baseline", "   "), "", "empty"),
    ("save-blank-name", _flag("allreduce-save-baseline", "sub/   "), "", "blanks"),
    ("save-leading-blank", _flag("allreduce-save-baseline", " b.json"), "", "blanks"),
    ("save-trailing-slash", _flag("allreduce-save-baseline", "newdir/"), "", "directory"),
    ("save-dev-null", _flag("allreduce-save-baseline", "/dev/null"), "", "character device"),
    ("save-fifo", _fifo("allreduce-save-baseline"), "", "FIFO"),
    ("save-symlink", _symlink("allreduce-save-baseline"), "", "symbolic link"),
    ("save-long-name", _flag("allreduce-save-baseline", TOO_LONG_NAME), "", "allows"),
    ("save-empty", _flag("allreduce-save-baseline", ""), "--allreduce-save-baseline", "empty"),
    ("ini-ws-empty-item", _ini("allreduce_world_sizes", "2,,4"), "ini key allreduce_world", ""),
    ("ini-batch-billion", _ini("allreduce_batch_sizes", "1:1000000000"), "ini key allreduce", ""),
    ("ini-timeout-inf", _ini("allreduce_timeout", "inf"), "ini key allreduce_timeout", ""),
    ("ini-startup-nan", _ini("allreduce_startup_timeout", "nan"), "ini key allreduce_startup", ""),
    ("ini-out-device", _ini("allreduce_output_dir", "/dev/null"), "ini key allreduce_output", ""),
    ("ini-save-dir", _ini("allreduce_save_baseline", "."), "ini key allreduce_save_baseline", ""),
]


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under root (files, dirs, FIFOs, links): kind, inode, size, mtime."""
    tree = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        tree[str(path.relative_to(root))] = (
            stat.S_IFMT(info.st_mode),
            info.st_ino,
            info.st_size,
            info.st_mtime_ns,
        )
    return tree


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging when a check blocks (a FIFO opened for reading)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the option check blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("prepare", "names", "why"), [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_bad_value_is_a_usage_error_naming_the_option_and_writes_nothing(
    pytester: pytest.Pytester, alarm: None, prepare: Prepare, names: str, why: str
) -> None:
    pytester.makepyfile(test_case=TEST_CASE_PY)
    args = prepare(pytester.path)
    devices = {p: os.stat(p).st_mode for p in ("/dev/null", "/dev/zero")}
    before = _tree(pytester.path)
    result = pytester.runpytest(*args, "-p", "no:cacheprovider", "test_case.py")
    error = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, error + result.stdout.str()
    option = names or args[0].split("=", 1)[0]
    assert option in error, error
    assert why in error, error
    assert len(error) < 2000, "the error repeats a huge value"
    assert _tree(pytester.path) == before
    assert {p: os.stat(p).st_mode for p in devices} == devices
    assert "test_case" not in result.stdout.str()


def test_output_dir_this_process_cannot_write_is_a_usage_error(pytester: pytest.Pytester) -> None:
    readonly = pytester.path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    # As root a mode of 0555 does not stop writes; procfs's sysctl tree does.
    candidates = [readonly, Path("/proc/sys")]
    target = next((c for c in candidates if not os.access(c, os.W_OK)), None)
    if target is None:
        pytest.skip("no directory here that this process cannot write to")
    pytester.makepyfile(test_case=TEST_CASE_PY)
    before = _tree(pytester.path)
    result = pytester.runpytest(f"--allreduce-output-dir={target}/out", "test_case.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--allreduce-output-dir" in result.stderr.str()
    assert "cannot write" in result.stderr.str()
    assert _tree(pytester.path) == before
    assert not (target / "out").exists()


def test_baseline_from_another_device_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(BASELINE))
    check_baseline_device(path, "cpu")
    check_baseline_device(path, "cpu", "cpu")
    with pytest.raises(pytest.UsageError, match=r"--allreduce-baseline=.*recorded on cpu \(cpu\)"):
        check_baseline_device(path, "cuda")
    with pytest.raises(pytest.UsageError, match="this session runs on NVIDIA_H200 \\(cuda\\)"):
        check_baseline_device(path, "cuda", "NVIDIA_H200")
    h200 = {**BASELINE, "device": "cuda", "device_name": "NVIDIA_H200"}
    path.write_text(json.dumps(h200))
    check_baseline_device(path, "cuda", "NVIDIA_H200")
    with pytest.raises(pytest.UsageError, match="recorded on NVIDIA_H200 \\(cuda\\)"):
        check_baseline_device(path, "cuda", "NVIDIA_H100_80GB_HBM3")


@pytest.mark.parametrize(
    ("args", "world_sizes"),
    [
        (["--allreduce-world-sizes=4,2", "--allreduce-startup-timeout=600"], "(2, 4)"),
        (["--allreduce-world-sizes=0002"], "(2,)"),
        (["--allreduce-timeout=2.5", "--allreduce-world-sizes= 2 , 3 "], "(2, 3)"),
    ],
)
def test_good_values_still_parse(
    pytester: pytest.Pytester, args: list[str], world_sizes: str
) -> None:
    pytester.makeconftest(
        """
        from pytest_allreduce.plugin import SESSION_KEY


        def pytest_collection_finish(session):
            options = session.config.stash[SESSION_KEY].options
            print("OPTIONS", options.world_sizes, options.timeout_s, options.startup_timeout_s)
        """
    )
    pytester.makepyfile(test_case=TEST_CASE_PY)
    result = pytester.runpytest(
        *args, "--allreduce-device=cpu", "--collect-only", "-q", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    assert f"OPTIONS {world_sizes}" in result.stdout.str()
