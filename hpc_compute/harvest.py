"""Harvesting a job's ``output/`` directory (untrusted) into the trusted artifact store.

The job fully controlled ``output/``: it may hold symlinks (to ``/etc/shadow``, to another
run's data, to ``/proc/self/environ``), intermediate directory symlinks, hard links to files
outside the tree, FIFOs (a blocking open would hang the scheduler), sockets, device nodes, names
with newlines or invalid UTF-8, and trees built to exhaust the store. It may also keep changing
the tree while we walk it.

The rules this module keeps:

* Walk with directory file descriptors only. Every component is opened relative to its parent's
  fd with ``O_NOFOLLOW``, so a component swapped for a symlink mid-walk makes the open fail
  (``ELOOP``/``ENOTDIR``) instead of redirecting the read outside ``source``.
* ``lstat`` each entry, open it ``O_NOFOLLOW|O_NONBLOCK`` (a FIFO never blocks), then ``fstat`` the
  fd and require the same type and the same ``(st_dev, st_ino)``; copy from that fd, never from
  a path.
* Take regular files only, with ``st_nlink == 1`` (a hard link could alias a file outside) and on
  the same filesystem as ``source``. Everything else becomes a :class:`Refusal` with a reason;
  nothing is dropped silently.
* Cap file count, total bytes, bytes per file, depth (and the number of refusals recorded); what
  falls past a cap is refused and the report is marked ``truncated``.
* Write into a fresh destination the scheduler owns, again through directory fds, with
  ``O_CREAT|O_EXCL|O_NOFOLLOW``; directories 0o755, files 0o644, never a symlink.

Reading back (:func:`open_artifact_file`) walks the store the same way, so a symlink that somehow
got into the store still cannot lead outside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hpc_compute.errors import ArtifactNotFound, HpcComputeError

__all__ = [
    "HarvestLimits",
    "HarvestReport",
    "HarvestedFile",
    "Refusal",
    "UnsafeDestination",
    "UnsafePath",
    "harvest_directory",
    "open_artifact_file",
    "safe_relative_path",
]

#: hard ceiling on ``max_depth``: the walk holds one directory fd per level
MAX_DEPTH_CEILING = 256
_CHUNK = 1024 * 1024

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_NOCTTY | _O_CLOEXEC
_DEST_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC
_DIR_MODE = 0o755
_FILE_MODE = 0o644

# Refusal reasons (stable strings: tests and the ledger rely on them).
R_SOURCE_MISSING = "source does not exist"
R_SOURCE_SYMLINK = "source is a symlink"
R_SOURCE_NOT_DIR = "source is not a directory"
R_SYMLINK = "symlink"
R_FIFO = "fifo"
R_SOCKET = "socket"
R_BLOCK_DEVICE = "block device"
R_CHAR_DEVICE = "character device"
R_UNKNOWN_TYPE = "unsupported file type"
R_HARD_LINK = "hard link"  # followed by " (st_nlink=N)"
R_OTHER_FS = "on another filesystem"
R_NAME_NOT_UTF8 = "name is not valid UTF-8"
R_NAME_CONTROL = "name contains control characters"
R_DEPTH = "max_depth exceeded"
R_MAX_FILES = "max_files exceeded"
R_MAX_FILE_BYTES = "max_file_bytes exceeded"
R_MAX_TOTAL_BYTES = "max_total_bytes exceeded"
R_MAX_REFUSALS = "max_refusals reached: walk stopped, remaining entries not examined"
R_VANISHED = "vanished during harvest"
R_CHANGED = "changed during harvest"  # followed by ": <what>"
R_OPEN_FAILED = "cannot open"  # followed by ": <strerror>"
R_READ_FAILED = "read error"  # followed by ": <strerror>"
R_DEST_IS_SOURCE = "is the destination directory"
R_DEST_COLLISION = "destination already has this name"


class UnsafeDestination(HpcComputeError, ValueError):
    """The harvest destination is a symlink, not a directory, or not empty."""


class UnsafePath(HpcComputeError, ValueError):
    """An artifact path is not a plain relative path, or leads through a symlink / to a non-file."""


@dataclass(frozen=True)
class HarvestLimits:
    """Caps for one harvest. ``max_depth`` counts path components (``a.txt`` is 1, ``d/a.txt`` 2)."""

    max_files: int = 10_000
    max_total_bytes: int = 10 * 1024**3
    max_depth: int = 32
    max_file_bytes: int = 10 * 1024**3
    #: at most this many refusals are recorded; then the walk stops (one more refusal says so)
    max_refusals: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_files", "max_total_bytes", "max_file_bytes", "max_refusals"):
            if getattr(self, name) < 0:
                raise ValueError(f"HarvestLimits.{name} must be >= 0")
        if not 0 <= self.max_depth <= MAX_DEPTH_CEILING:
            raise ValueError(f"HarvestLimits.max_depth must be in 0..{MAX_DEPTH_CEILING}")


@dataclass(frozen=True)
class HarvestedFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Refusal:
    path: str
    reason: str


@dataclass
class HarvestReport:
    files: list[HarvestedFile] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    #: True when a cap (files, bytes, depth, refusals) left something out
    truncated: bool = False
    #: bytes actually copied into the destination
    total_bytes: int = 0


# ---------------------------------------------------------------------------------------------
# names and paths


def name_problem(name: str) -> str | None:
    """Why a directory entry name is unacceptable, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir decodes undecodable bytes to lone surrogates
        return R_NAME_NOT_UTF8
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return R_NAME_CONTROL
    return None


def _printable(name: str) -> str:
    """A one-line, valid-UTF-8 rendering of an entry name for the report (escapes what is unsafe)."""
    raw = os.fsencode(name)
    text = raw.decode("utf-8", errors="backslashreplace")
    out: list[str] = []
    for c in text:
        if unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)


def safe_relative_path(path: str) -> str:
    """Validate an artifact path a user supplied; return it normalised (no trailing parts).

    Accepted: a relative POSIX path of non-empty components, none ``.`` or ``..``, without NUL,
    backslash or control characters. Anything else raises :class:`UnsafePath` (a ValueError).
    """
    if not isinstance(path, str):
        raise UnsafePath("artifact path must be a string")
    if path == "":
        raise UnsafePath("artifact path is empty")
    if "\x00" in path:
        raise UnsafePath("artifact path contains NUL")
    if path.startswith("/"):
        raise UnsafePath("artifact path must be relative")
    if "\\" in path:
        raise UnsafePath("artifact path contains a backslash")
    parts = path.split("/")
    for part in parts:
        if part == "":
            raise UnsafePath("artifact path has an empty component")
        if part in (".", ".."):
            raise UnsafePath(f"artifact path has a {part!r} component")
        problem = name_problem(part)
        if problem is not None:
            raise UnsafePath(f"artifact path: {problem}")
    return "/".join(parts)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def open_artifact_file(root: Path, rel: str) -> BinaryIO:
    """Open ``root/rel`` for reading, component by component with ``O_NOFOLLOW``.

    Raises :class:`UnsafePath` for a bad path, a symlink on the way or a non-regular file, and
    :class:`~hpc_compute.errors.ArtifactNotFound` when there is nothing at ``rel``.
    """
    parts = safe_relative_path(rel).split("/")
    try:
        dir_fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError as exc:
        raise ArtifactNotFound(rel) from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath("artifact store root is not a plain directory") from exc
        raise
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError as exc:
                raise ArtifactNotFound(rel) from exc
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/".join(parts[: i + 1])
                    raise UnsafePath(f"{where!r} is not a plain directory (symlink?)") from exc
                raise
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            raise ArtifactNotFound(rel) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{rel!r} is a symlink") from exc
            if exc.errno == errno.ENXIO:
                raise UnsafePath(f"{rel!r} is not a regular file") from exc
            raise
    finally:
        _close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{rel!r} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb")  # the caller owns (and closes) the file object


# ---------------------------------------------------------------------------------------------
# the walk


class StopWalk(Exception):
    """Raised inside the walk once max_refusals is reached."""


def _lstat(dir_fd: int, name: str) -> os.stat_result:
    """``lstat`` of an entry relative to its directory fd (a seam for the race tests)."""
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_dev == b.st_dev and a.st_ino == b.st_ino


def type_reason(mode: int) -> str | None:
    """The refusal reason for a non-regular, non-directory mode; None for regular files and dirs."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return R_SYMLINK
    if stat.S_ISFIFO(mode):
        return R_FIFO
    if stat.S_ISSOCK(mode):
        return R_SOCKET
    if stat.S_ISBLK(mode):
        return R_BLOCK_DEVICE
    if stat.S_ISCHR(mode):
        return R_CHAR_DEVICE
    return R_UNKNOWN_TYPE


class _VerifyError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _what_is_there(dir_fd: int, name: str, directory: bool) -> str:
    """A best-effort description of an entry that could not be opened as expected."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return "vanished"
    if stat.S_ISLNK(mode):
        return "became a symlink"
    if directory:
        return "no longer a directory"
    return f"not a regular file ({type_reason(mode) or 'directory'})"


def _open_verified(dir_fd: int, name: str, expected: os.stat_result, *, directory: bool) -> int:
    """Open ``name`` under ``dir_fd`` without following symlinks and check it is what lstat saw.

    Returns the fd; raises :class:`_VerifyError` with a refusal reason otherwise. A FIFO is never
    waited on (``O_NONBLOCK``), a swapped-in symlink fails the open, a swapped-in other file fails
    the ``(st_dev, st_ino)`` check.
    """
    flags = _DIR_FLAGS if directory else _FILE_FLAGS
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise _VerifyError(R_VANISHED) from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            # O_NOFOLLOW refused a symlink (Linux says ENOTDIR when O_DIRECTORY is set too), or
            # the entry turned into a non-directory / a socket: say what is there now
            raise _VerifyError(f"{R_CHANGED}: {_what_is_there(dir_fd, name, directory)}") from exc
        raise _VerifyError(f"{R_OPEN_FAILED}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if directory:
            if not stat.S_ISDIR(st.st_mode):
                raise _VerifyError(f"{R_CHANGED}: no longer a directory")
        elif not stat.S_ISREG(st.st_mode):
            reason = type_reason(st.st_mode) or R_UNKNOWN_TYPE
            raise _VerifyError(f"{R_CHANGED}: not a regular file ({reason})")
        if not _same_inode(st, expected):
            raise _VerifyError(f"{R_CHANGED}: replaced by another file")
        if not directory and st.st_nlink > 1:
            raise _VerifyError(f"{R_HARD_LINK} (st_nlink={st.st_nlink})")
    except BaseException:
        os.close(fd)
        raise
    return fd


class HarvestTally:
    """The report and the refusal cap every harvester shares (local here, SFTP in transports)."""

    def __init__(self, limits: HarvestLimits) -> None:
        self.limits = limits
        self.report = HarvestReport()

    def refuse(self, rel: str, reason: str, *, truncated: bool = False) -> None:
        """Record a refusal; past ``max_refusals`` stop the walk (raises StopWalk)."""
        if truncated:
            self.report.truncated = True
        if len(self.report.refused) >= self.limits.max_refusals:
            self.report.truncated = True
            self.report.refused.append(Refusal(rel, R_MAX_REFUSALS))
            raise StopWalk
        self.report.refused.append(Refusal(rel, reason))


class _Harvester(HarvestTally):
    def __init__(self, limits: HarvestLimits, root_dev: int, dest_id: tuple[int, int]) -> None:
        super().__init__(limits)
        self.root_dev = root_dev
        self.dest_id = dest_id

    def walk(self, src_fd: int, dst_fd: int, prefix: str, depth: int) -> None:
        """Harvest the entries of the directory ``src_fd`` (whose own path has ``depth`` parts)."""
        with os.scandir(src_fd) as it:
            names = sorted((entry.name for entry in it), key=os.fsencode)
        for name in names:
            rel = prefix + _printable(name)
            if depth + 1 > self.limits.max_depth:
                self.refuse(rel, R_DEPTH, truncated=True)
                continue
            problem = name_problem(name)
            if problem is not None:
                self.refuse(rel, problem)
                continue
            try:
                st = _lstat(src_fd, name)
            except FileNotFoundError:
                self.refuse(rel, R_VANISHED)
                continue
            if stat.S_ISDIR(st.st_mode):
                self.directory(src_fd, dst_fd, name, rel, st, depth + 1)
            elif stat.S_ISREG(st.st_mode):
                self.file(src_fd, dst_fd, name, rel, st)
            else:
                self.refuse(rel, type_reason(st.st_mode) or R_UNKNOWN_TYPE)

    def directory(self, src_fd: int, dst_fd: int, name: str, rel: str, st: os.stat_result, depth: int) -> None:
        if st.st_dev != self.root_dev:
            self.refuse(rel, R_OTHER_FS)
            return
        if (st.st_dev, st.st_ino) == self.dest_id:
            self.refuse(rel, R_DEST_IS_SOURCE)
            return
        # entries of this directory would have depth + 1 components
        if depth >= self.limits.max_depth:
            self.refuse(rel, R_DEPTH, truncated=True)
            return
        try:
            sub_fd = _open_verified(src_fd, name, st, directory=True)
        except _VerifyError as exc:
            self.refuse(rel, exc.reason)
            return
        try:
            try:
                os.mkdir(name, _DIR_MODE, dir_fd=dst_fd)
            except FileExistsError:
                self.refuse(rel, R_DEST_COLLISION)
                return
            sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                os.fchmod(sub_dst, _DIR_MODE)
                self.walk(sub_fd, sub_dst, rel + "/", depth)
            finally:
                os.close(sub_dst)
        finally:
            os.close(sub_fd)

    def file(self, src_fd: int, dst_fd: int, name: str, rel: str, st: os.stat_result) -> None:
        limits = self.limits
        if st.st_nlink > 1:
            self.refuse(rel, f"{R_HARD_LINK} (st_nlink={st.st_nlink})")
            return
        if st.st_dev != self.root_dev:
            self.refuse(rel, R_OTHER_FS)
            return
        if len(self.report.files) >= limits.max_files:
            self.refuse(rel, R_MAX_FILES, truncated=True)
            return
        if st.st_size > limits.max_file_bytes:
            self.refuse(rel, R_MAX_FILE_BYTES, truncated=True)
            return
        if self.report.total_bytes + st.st_size > limits.max_total_bytes:
            self.refuse(rel, R_MAX_TOTAL_BYTES, truncated=True)
            return
        try:
            fd = _open_verified(src_fd, name, st, directory=False)
        except _VerifyError as exc:
            self.refuse(rel, exc.reason)
            return
        try:
            # the budget is the size lstat saw, already checked against every cap: a file that
            # grows meanwhile is cut there, one that shrinks is recorded as read
            budget = st.st_size
            try:
                out = os.open(name, _DEST_FILE_FLAGS, _FILE_MODE, dir_fd=dst_fd)
            except FileExistsError:
                self.refuse(rel, R_DEST_COLLISION)
                return
            try:
                os.fchmod(out, _FILE_MODE)
                size, digest = _copy(fd, out, budget)
            except _VerifyError as exc:
                os.close(out)
                os.unlink(name, dir_fd=dst_fd)
                self.refuse(rel, exc.reason)
                return
            except BaseException:
                os.close(out)
                os.unlink(name, dir_fd=dst_fd)
                raise
            os.close(out)
        finally:
            os.close(fd)
        self.report.files.append(HarvestedFile(rel, size, digest))
        self.report.total_bytes += size


def _copy(src: int, dst: int, budget: int) -> tuple[int, str]:
    """Copy at most ``budget`` bytes from fd ``src`` to fd ``dst``; hash and count in one pass."""
    h = hashlib.sha256()
    size = 0
    while size < budget:
        try:
            chunk = os.read(src, min(_CHUNK, budget - size))
        except BlockingIOError as exc:  # cannot happen for a regular file; be strict anyway
            raise _VerifyError(f"{R_READ_FAILED}: would block") from exc
        except OSError as exc:
            raise _VerifyError(f"{R_READ_FAILED}: {exc.strerror}") from exc
        if not chunk:
            break  # shrank during the copy: record what was read
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            n = os.write(dst, view)
            view = view[n:]
        size += len(chunk)
    return size, h.hexdigest()


def _prepare_dest(dest: Path) -> int:
    """Create (or accept an empty) destination directory; return an fd on it."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        dest.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.mkdir(dest, _DIR_MODE)
        st = os.lstat(dest)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDestination(f"harvest destination {dest} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDestination(f"harvest destination {dest} is not a directory")
    try:
        fd = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDestination(f"harvest destination {dest} changed (symlink?)") from exc
        raise
    try:
        if not _same_inode(os.fstat(fd), st):
            raise UnsafeDestination(f"harvest destination {dest} changed while opening it")
        with os.scandir(fd) as it:
            if next(it, None) is not None:
                raise UnsafeDestination(f"harvest destination {dest} is not empty")
        os.fchmod(fd, _DIR_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def harvest_directory(
    source: Path,
    dest: Path,
    limits: HarvestLimits = HarvestLimits(),
) -> HarvestReport:
    """Copy the regular files under ``source`` (untrusted) into ``dest`` (fresh, scheduler-owned).

    Never follows a symlink, never blocks on a FIFO, never reads anything outside ``source``;
    every entry not taken is listed in ``report.refused`` with a reason. Returned paths are
    relative POSIX paths, sorted. ``dest`` that is a symlink, not a directory or not empty raises
    :class:`UnsafeDestination` before anything is read.
    """
    dst_fd = _prepare_dest(dest)
    try:
        dest_st = os.fstat(dst_fd)
        report = HarvestReport()
        try:
            src_st = os.lstat(source)
        except FileNotFoundError:
            report.refused.append(Refusal(".", R_SOURCE_MISSING))
            return report
        if stat.S_ISLNK(src_st.st_mode):
            report.refused.append(Refusal(".", R_SOURCE_SYMLINK))
            return report
        if not stat.S_ISDIR(src_st.st_mode):
            report.refused.append(Refusal(".", R_SOURCE_NOT_DIR))
            return report
        try:
            src_fd = os.open(source, _DIR_FLAGS)
        except OSError as exc:
            reason = (
                f"{R_CHANGED}: became a symlink"
                if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                else f"{R_OPEN_FAILED}: {exc.strerror}"
            )
            report.refused.append(Refusal(".", reason))
            return report
        try:
            if not _same_inode(os.fstat(src_fd), src_st):
                report.refused.append(Refusal(".", f"{R_CHANGED}: replaced by another directory"))
                return report
            if (src_st.st_dev, src_st.st_ino) == (dest_st.st_dev, dest_st.st_ino):
                report.refused.append(Refusal(".", R_DEST_IS_SOURCE))
                return report
            harvester = _Harvester(limits, src_st.st_dev, (dest_st.st_dev, dest_st.st_ino))
            with contextlib.suppress(StopWalk):  # max_refusals: already recorded as a refusal
                harvester.walk(src_fd, dst_fd, "", 0)
            report = harvester.report
        finally:
            os.close(src_fd)
    finally:
        os.close(dst_fd)
    report.files.sort(key=lambda f: f.path)
    report.refused.sort(key=lambda r: r.path)
    return report
