"""The harvester against hostile output trees (symlinks, hard links, FIFOs, devices, bombs, races)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_compute import harvest
from hpc_compute.errors import ArtifactNotFound
from hpc_compute.harvest import (
    HarvestedFile,
    HarvestLimits,
    HarvestReport,
    Refusal,
    UnsafeDestination,
    UnsafePath,
    harvest_directory,
    open_artifact_file,
    safe_relative_path,
)

SECRET = b"OUTSIDE-SECRET-7f3a9c"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the job's tree holding a secret the harvest must never copy."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(SECRET)
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_bytes(SECRET + b"-deep")
    return d


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "run" / "output"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "store" / "run-1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reasons(report: HarvestReport) -> dict[str, str]:
    return {r.path: r.reason for r in report.refused}


def paths(report: HarvestReport) -> list[str]:
    return [f.path for f in report.files]


def dest_tree(dest: Path) -> dict[str, bytes]:
    """Every file under dest (relative path -> content); fails on anything but dirs and files."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            assert not stat.S_ISLNK(st.st_mode), f"symlink in dest: {p}"
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o755, p
            else:
                assert stat.S_ISREG(st.st_mode), f"non-regular in dest: {p}"
                assert stat.S_IMODE(st.st_mode) == 0o644, p
                assert st.st_nlink == 1
                out[p.relative_to(dest).as_posix()] = p.read_bytes()
    return out


def assert_no_leak(dest: Path) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    for rel, data in dest_tree(dest).items():
        assert SECRET not in data, f"outside content leaked into {rel}"
        assert data != passwd, f"/etc/passwd leaked into {rel}"


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of every entry under root except the exclude subtree."""
    snap: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != exclude]
        for name in [*dirnames, *filenames, "."]:
            p = here / name
            if p == exclude:
                continue
            st = p.lstat()
            snap[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


# ---------------------------------------------------------------------------------------------
# normal trees


def test_nested_regular_files_are_copied_with_size_and_sha256(src: Path, dest: Path) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)  # several copy chunks
    content = {
        "a.txt": b"hello\n",
        "empty": b"",
        "-leading-dash": b"dash",
        "données.txt": "é".encode(),
        "d1/b.bin": big,
        "d1/d2/d3/c.txt": b"deep",
        "d1/d2/e.txt": b"e" * 1000,
    }
    (src / "empty_dir").mkdir()
    for rel, data in content.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o600)

    report = harvest_directory(src, dest)

    assert report.refused == []
    assert report.truncated is False
    expected = [HarvestedFile(rel, len(data), sha(data)) for rel, data in sorted(content.items())]
    assert report.files == expected
    assert paths(report) == sorted(paths(report))
    assert report.total_bytes == sum(len(v) for v in content.values())
    assert dest_tree(dest) == content  # also checks modes 0o755 / 0o644 and no symlinks
    assert (dest / "empty_dir").is_dir()


def test_existing_empty_dest_is_accepted(src: Path, dest: Path) -> None:
    (src / "f").write_bytes(b"x")
    dest.mkdir(parents=True)
    report = harvest_directory(src, dest)
    assert paths(report) == ["f"]


# ---------------------------------------------------------------------------------------------
# hostile entries


def test_symlinks_are_refused_wherever_they_point(src: Path, dest: Path, outside: Path) -> None:
    (src / "ok.txt").write_bytes(b"fine")
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "abs_secret").symlink_to(outside / "secret.txt")
    (src / "rel_secret").symlink_to("../../outside/secret.txt")
    (src / "environ").symlink_to("/proc/self/environ")
    (src / "dangling").symlink_to("/nonexistent/nowhere")
    (src / "loop").symlink_to("loop")
    (src / "inner_target.txt").write_bytes(b"inner")
    (src / "inner_link").symlink_to("inner_target.txt")  # even pointing inside: refused
    (src / "hop").symlink_to(outside)  # intermediate directory symlink
    (src / "d").mkdir()
    (src / "d" / "up").symlink_to("..")

    report = harvest_directory(src, dest)

    assert paths(report) == ["inner_target.txt", "ok.txt"]
    assert reasons(report) == {
        "abs_secret": "symlink",
        "d/up": "symlink",
        "dangling": "symlink",
        "environ": "symlink",
        "hop": "symlink",
        "inner_link": "symlink",
        "loop": "symlink",
        "passwd": "symlink",
        "rel_secret": "symlink",
    }
    assert_no_leak(dest)
    assert not (dest / "hop").exists()


def test_hard_link_to_outside_file_is_refused(src: Path, dest: Path, outside: Path) -> None:
    os.link(outside / "secret.txt", src / "alias.txt")
    (src / "ok.txt").write_bytes(b"fine")
    report = harvest_directory(src, dest)
    assert paths(report) == ["ok.txt"]
    assert reasons(report) == {"alias.txt": "hard link (st_nlink=2)"}
    assert_no_leak(dest)


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_hanging(src: Path, dest: Path) -> None:
    os.mkfifo(src / "pipe")
    (src / "d").mkdir()
    os.mkfifo(src / "d" / "pipe2")
    (src / "ok.txt").write_bytes(b"fine")
    report = harvest_directory(src, dest)
    assert paths(report) == ["ok.txt"]
    assert reasons(report) == {"d/pipe2": "fifo", "pipe": "fifo"}


@pytest.mark.timeout(10)
def test_unix_socket_is_refused(src: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(src)  # bind by a short relative name (AF_UNIX paths are limited to 108 bytes)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("sock")
        report = harvest_directory(src, dest)
    assert reasons(report) == {"sock": "socket"}
    assert report.files == []


@pytest.mark.timeout(10)
def test_device_nodes_are_refused(src: Path, dest: Path) -> None:
    try:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a character device here (mknod: {exc})")
    expected = {"null": "character device"}
    with contextlib.suppress(OSError):
        os.mknod(src / "loop0", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        expected["loop0"] = "block device"
    report = harvest_directory(src, dest)
    assert reasons(report) == expected
    assert report.files == []


def test_bad_names_are_refused_and_reported_on_one_line(src: Path, dest: Path) -> None:
    (src / "evil\nname.txt").write_bytes(b"x")
    (src / "tab\there").write_bytes(b"x")
    (src / "line\u2028sep").write_bytes(b"x")
    (src / "nl\ndir").mkdir()
    (src / "nl\ndir" / "inside.txt").write_bytes(b"x")
    fd = os.open(os.fsencode(src) + b"/bad\xff.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    (src / "ok.txt").write_bytes(b"fine")

    report = harvest_directory(src, dest)

    assert paths(report) == ["ok.txt"]
    assert reasons(report) == {
        "bad\\xff.txt": "name is not valid UTF-8",
        "evil\\x0aname.txt": "name contains control characters",
        "line\\u2028sep": "name contains control characters",
        "nl\\x0adir": "name contains control characters",
        "tab\\x09here": "name contains control characters",
    }
    for r in report.refused:
        r.path.encode("utf-8")  # valid UTF-8
        assert "\n" not in r.path
    assert sorted(os.listdir(dest)) == ["ok.txt"]


def test_top_level_source_symlink_or_not_a_dir(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "output_link"
    link.symlink_to(outside)
    report = harvest_directory(link, tmp_path / "d1")
    assert report.files == []
    assert report.refused == [Refusal(".", "source is a symlink")]
    assert list((tmp_path / "d1").iterdir()) == []

    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"x")
    report = harvest_directory(a_file, tmp_path / "d2")
    assert report.files == [] and report.refused == [Refusal(".", "source is not a directory")]

    report = harvest_directory(tmp_path / "missing", tmp_path / "d3")
    assert report.files == [] and report.refused == [Refusal(".", "source does not exist")]


def test_unsafe_dest_is_rejected_before_anything_is_read(src: Path, tmp_path: Path, outside: Path) -> None:
    (src / "f").write_bytes(b"x")
    before = sorted(p.name for p in outside.iterdir())

    link = tmp_path / "dest_link"
    link.symlink_to(outside)
    with pytest.raises(UnsafeDestination, match="symlink"):
        harvest_directory(src, link)
    assert sorted(p.name for p in outside.iterdir()) == before

    non_empty = tmp_path / "non_empty"
    non_empty.mkdir()
    (non_empty / "old").write_bytes(b"old")
    with pytest.raises(UnsafeDestination, match="not empty"):
        harvest_directory(src, non_empty)

    a_file = tmp_path / "dest_file"
    a_file.write_bytes(b"")
    with pytest.raises(UnsafeDestination, match="not a directory"):
        harvest_directory(src, a_file)


def test_hostile_tree_writes_nothing_outside_dest(
    tmp_path: Path, src: Path, dest: Path, outside: Path
) -> None:
    (src / "ok.txt").write_bytes(b"fine")
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "hop").symlink_to(outside)
    os.link(outside / "secret.txt", src / "alias")
    os.mkfifo(src / "pipe")
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "x.txt").write_bytes(b"x")
    (src / "d" / "out").symlink_to(outside / "sub")
    dest.mkdir(parents=True)  # fresh and empty, made by the scheduler: its parent's mtime stays put
    before = snapshot(tmp_path, exclude=dest)

    report = harvest_directory(src, dest, HarvestLimits(max_files=1))

    assert snapshot(tmp_path, exclude=dest) == before
    assert_no_leak(dest)
    assert paths(report) == ["d/e/x.txt"]
    assert reasons(report) == {
        "alias": "hard link (st_nlink=2)",
        "d/out": "symlink",
        "hop": "symlink",
        "ok.txt": "max_files exceeded",
        "passwd": "symlink",
        "pipe": "fifo",
    }
    assert report.truncated


# ---------------------------------------------------------------------------------------------
# caps


def test_max_files_cap(src: Path, dest: Path) -> None:
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x")
    report = harvest_directory(src, dest, HarvestLimits(max_files=3))
    assert paths(report) == ["f0", "f1", "f2"]
    assert reasons(report) == {"f3": "max_files exceeded", "f4": "max_files exceeded"}
    assert report.truncated
    assert sorted(os.listdir(dest)) == ["f0", "f1", "f2"]


def test_max_total_bytes_cap(src: Path, dest: Path) -> None:
    (src / "a").write_bytes(b"a" * 10)
    (src / "b").write_bytes(b"b" * 10)
    (src / "c").write_bytes(b"c" * 10)  # would make 30 > 25
    (src / "d").write_bytes(b"d" * 5)  # still fits: 25
    report = harvest_directory(src, dest, HarvestLimits(max_total_bytes=25))
    assert paths(report) == ["a", "b", "d"]
    assert reasons(report) == {"c": "max_total_bytes exceeded"}
    assert report.total_bytes == 25
    assert report.truncated
    assert not (dest / "c").exists()


def test_max_file_bytes_cap_and_sparse_bomb(src: Path, dest: Path) -> None:
    (src / "small").write_bytes(b"s" * 10)
    (src / "big").write_bytes(b"b" * 11)
    try:
        with open(src / "sparse", "wb") as f:
            f.truncate(2**40)  # 1 TiB apparent size, no blocks: the apparent size counts
    except OSError:
        (src / "sparse").write_bytes(b"z" * 100)
    report = harvest_directory(src, dest, HarvestLimits(max_file_bytes=10))
    assert paths(report) == ["small"]
    assert reasons(report) == {"big": "max_file_bytes exceeded", "sparse": "max_file_bytes exceeded"}
    assert report.truncated


@pytest.mark.timeout(30)
def test_default_caps_refuse_a_sparse_terabyte_without_reading_it(src: Path, dest: Path) -> None:
    try:
        with open(src / "sparse", "wb") as f:
            f.truncate(2**40)
    except OSError as exc:
        pytest.skip(f"filesystem cannot hold a sparse 1 TiB file: {exc}")
    report = harvest_directory(src, dest)
    assert reasons(report) == {"sparse": "max_file_bytes exceeded"}


def test_max_depth_cap(src: Path, dest: Path) -> None:
    (src / "top.txt").write_bytes(b"1")
    (src / "a").mkdir()
    (src / "a" / "x.txt").write_bytes(b"2")
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "a" / "b" / "c" / "deep.txt").write_bytes(b"3")
    report = harvest_directory(src, dest, HarvestLimits(max_depth=2))
    assert paths(report) == ["a/x.txt", "top.txt"]
    assert reasons(report) == {"a/b": "max_depth exceeded"}
    assert report.truncated
    assert not (dest / "a" / "b").exists()


def test_max_depth_zero_takes_nothing(src: Path, dest: Path) -> None:
    (src / "top.txt").write_bytes(b"1")
    report = harvest_directory(src, dest, HarvestLimits(max_depth=0))
    assert report.files == [] and reasons(report) == {"top.txt": "max_depth exceeded"}


def test_max_refusals_stops_the_walk_and_says_so(src: Path, dest: Path) -> None:
    for i in range(20):
        (src / f"l{i:02d}").symlink_to("/etc/passwd")
    report = harvest_directory(src, dest, HarvestLimits(max_refusals=5))
    assert len(report.refused) == 6
    assert [r.reason for r in report.refused].count(harvest.R_MAX_REFUSALS) == 1
    assert report.truncated


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        HarvestLimits(max_files=-1)
    with pytest.raises(ValueError):
        HarvestLimits(max_depth=harvest.MAX_DEPTH_CEILING + 1)


# ---------------------------------------------------------------------------------------------
# races: the tree changes between listing/lstat and open


@pytest.fixture
def lstat_hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """After the harvester lstats entry ``name``, run ``action()`` (once)."""
    hooks: dict[str, object] = {}
    real = harvest._lstat

    def patched(dir_fd: int, name: str) -> os.stat_result:
        st = real(dir_fd, name)
        action = hooks.pop(name, None)
        if callable(action):
            action()
        return st

    monkeypatch.setattr(harvest, "_lstat", patched)
    yield hooks


def test_directory_swapped_for_symlink_after_lstat(
    src: Path, dest: Path, outside: Path, lstat_hook: dict[str, object]
) -> None:
    (src / "sub").mkdir()
    (src / "sub" / "deep.txt").write_bytes(b"benign")

    def swap() -> None:
        (src / "sub").rename(src / "parked")
        (src / "sub").symlink_to(outside)  # outside/ has a sub/deep.txt too

    lstat_hook["sub"] = swap
    report = harvest_directory(src, dest)
    assert reasons(report)["sub"] == "changed during harvest: became a symlink"
    assert "sub/deep.txt" not in paths(report)
    assert_no_leak(dest)


def test_file_swapped_for_symlink_after_lstat(
    src: Path, dest: Path, outside: Path, lstat_hook: dict[str, object]
) -> None:
    (src / "f.txt").write_bytes(b"benign")

    def swap() -> None:
        (src / "f.txt").unlink()
        (src / "f.txt").symlink_to(outside / "secret.txt")

    lstat_hook["f.txt"] = swap
    report = harvest_directory(src, dest)
    assert reasons(report) == {"f.txt": "changed during harvest: became a symlink"}
    assert_no_leak(dest)


def test_file_swapped_for_hard_link_to_outside_after_lstat(
    src: Path, dest: Path, outside: Path, lstat_hook: dict[str, object]
) -> None:
    (src / "f.txt").write_bytes(b"benign")

    def swap() -> None:
        (src / "f.txt").unlink()
        os.link(outside / "secret.txt", src / "f.txt")

    lstat_hook["f.txt"] = swap
    report = harvest_directory(src, dest)
    assert reasons(report) == {"f.txt": "changed during harvest: replaced by another file"}
    assert_no_leak(dest)


@pytest.mark.timeout(10)
def test_file_swapped_for_fifo_after_lstat_does_not_hang(
    src: Path, dest: Path, lstat_hook: dict[str, object]
) -> None:
    (src / "f.txt").write_bytes(b"benign")

    def swap() -> None:
        (src / "f.txt").unlink()
        os.mkfifo(src / "f.txt")

    lstat_hook["f.txt"] = swap
    report = harvest_directory(src, dest)
    assert reasons(report) == {"f.txt": "changed during harvest: not a regular file (fifo)"}


def test_file_growing_or_shrinking_during_harvest_records_what_was_read(
    src: Path, dest: Path, lstat_hook: dict[str, object]
) -> None:
    (src / "grow").write_bytes(b"0123456789")
    (src / "shrink").write_bytes(b"0123456789")

    def grow() -> None:
        with open(src / "grow", "ab") as f:
            f.write(b"EXTRA" * 1000)

    def shrink() -> None:
        os.truncate(src / "shrink", 4)

    lstat_hook["grow"] = grow
    lstat_hook["shrink"] = shrink
    report = harvest_directory(src, dest, HarvestLimits(max_total_bytes=20))
    assert report.files == [
        HarvestedFile("grow", 10, sha(b"0123456789")),
        HarvestedFile("shrink", 4, sha(b"0123")),
    ]
    assert dest_tree(dest) == {"grow": b"0123456789", "shrink": b"0123"}
    assert report.total_bytes == 14


def test_open_verified_rejects_identity_mismatch_directly(src: Path) -> None:
    (src / "a").write_bytes(b"a")
    (src / "b").write_bytes(b"b")
    dir_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st_b = os.stat("b", dir_fd=dir_fd, follow_symlinks=False)
        with pytest.raises(harvest._VerifyError, match="replaced by another file"):
            harvest._open_verified(dir_fd, "a", st_b, directory=False)
        st_a = os.stat("a", dir_fd=dir_fd, follow_symlinks=False)
        os.unlink("a", dir_fd=dir_fd)
        os.symlink("b", "a", dir_fd=dir_fd)
        with pytest.raises(harvest._VerifyError, match="became a symlink"):
            harvest._open_verified(dir_fd, "a", st_a, directory=False)
        fd = harvest._open_verified(dir_fd, "b", st_b, directory=False)
        os.close(fd)
    finally:
        os.close(dir_fd)


_FLIPPER = """
import os, sys
src, outside, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
secret = os.path.join(outside, "secret.txt")
pairs = []
for i in range(n):
    pairs.append((os.path.join(src, f"hop{i}"), outside))
    pairs.append((os.path.join(src, f"f{i}.txt"), secret))
print("ready", flush=True)
while True:
    for entry, target in pairs:
        try:
            os.rename(entry, entry + ".parked")
            os.symlink(target, entry)
            os.unlink(entry)
            os.rename(entry + ".parked", entry)
        except OSError:
            pass
"""


@pytest.mark.timeout(120)
def test_tight_loop_swapping_dirs_and_files_for_symlinks_never_leaks(
    tmp_path: Path, src: Path, outside: Path
) -> None:
    """A separate process (true parallelism, no GIL) flips entries between real and symlink."""
    n = 8
    for i in range(n):
        (src / f"hop{i}").mkdir()
        (src / f"hop{i}" / "secret.txt").write_bytes(b"benign-dir-file")  # same name as outside's
        (src / f"f{i}.txt").write_bytes(b"benign-file")
    flipper = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(src), str(outside), str(n)], stdout=subprocess.PIPE, text=True
    )
    seen: set[str] = set()
    try:
        assert flipper.stdout is not None and flipper.stdout.readline().strip() == "ready"
        for i in range(1000):
            d = tmp_path / "stores" / str(i)
            report = harvest_directory(src, d)
            seen.update(r.reason for r in report.refused)
            seen.update("took a file" for f in report.files if f.path.startswith("f"))
            assert_no_leak(d)
    finally:
        flipper.kill()
        flipper.wait()
    assert "took a file" in seen and "symlink" in seen  # both states of the race were observed


# ---------------------------------------------------------------------------------------------
# reading back from the store


@pytest.mark.parametrize(
    "bad",
    ["../x", "/etc/passwd", "", "a//b", "a/", "./a", "a/./b", "a/../b", "..", "a\x00b", "a\nb", "a\\b"],
)
def test_safe_relative_path_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        safe_relative_path(bad)


@pytest.mark.parametrize("good", ["a", "a/b.txt", "-x", "d1/d2/données.txt", "..hidden", "a..b"])
def test_safe_relative_path_accepts(good: str) -> None:
    assert safe_relative_path(good) == good


def test_open_artifact_file_reads_back_harvested_files(src: Path, dest: Path) -> None:
    (src / "d").mkdir()
    (src / "d" / "f.txt").write_bytes(b"payload")
    harvest_directory(src, dest)
    with open_artifact_file(dest, "d/f.txt") as f:
        assert f.read() == b"payload"
    with pytest.raises(ArtifactNotFound):
        open_artifact_file(dest, "d/missing.txt")
    with pytest.raises(ArtifactNotFound):
        open_artifact_file(dest, "nodir/f.txt")


@pytest.mark.timeout(10)
def test_open_artifact_file_cannot_escape_the_store(tmp_path: Path, outside: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "real").mkdir()
    (store / "real" / "ok.txt").write_bytes(b"ok")
    (store / "link.txt").symlink_to("/etc/passwd")
    (store / "hop").symlink_to(outside)
    (store / "real" / "up").symlink_to("..")
    os.mkfifo(store / "pipe")

    for rel in ("../outside/secret.txt", "/etc/passwd", "real/../../outside/secret.txt"):
        with pytest.raises(ValueError):
            open_artifact_file(store, rel)
    for rel in ("link.txt", "hop/secret.txt", "real/up/link.txt", "pipe", "real"):
        with pytest.raises(UnsafePath):
            open_artifact_file(store, rel)
    with open_artifact_file(store, "real/ok.txt") as f:
        assert f.read() == b"ok"
