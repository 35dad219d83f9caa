#!/usr/bin/env python3
"""hpc-compute job-side wrapper: runs one sealed attempt.  Usage: hpcc_wrapper.py ATTEMPT_DIR

Standard library only; runs under any python3 >= 3.9 (inside Slurm allocations and VMs).

1. Claim the attempt: create ``wrapper.json`` with O_EXCL. If it exists (another wrapper, or a
   reconciler's tombstone) exit 75 and run nothing.
2. Read ``spec.json`` and build the runtime argv: ``launch.argv`` with, at ``launch.insert_at``,
   the status-fd flag (bubblewrap's ``--json-status-fd N``) and the forwarded variables of this
   allocation (``{value}`` replaced literally).
3. Trusted preflight: every ``launch.preflight_paths`` entry must exist.
4. Start the runtime without a shell, with exactly ``launch.runtime_env``, stdin from /dev/null,
   stdout/stderr appended to ``logs/``, in its own session; write ``started.json``.
5. Forward SIGTERM/SIGINT, enforce ``time_limit_s``, SIGKILL after ``kill_grace_s``.
6. Write ``result.json`` and exit with the payload's status (128+N for a signal, 1 for setup).

Setup or user failure: with a status fd (bubblewrap) the user program ran if and only if the fd
delivered an ``exit-code`` record (bwrap writes it only after exec'ing the program); otherwise
the runtime's stderr tail becomes ``setup_error``. Other runtimes count as started once the
preflight passed and the runtime process exists (Apptainer's 255 is recorded as is).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

SPEC_SCHEMA = "hpc-compute/attempt-spec/1"
RESULT_SCHEMA = "hpc-compute/result/1"

SPEC_FILE = "spec.json"
CLAIM_FILE = "wrapper.json"
STARTED_FILE = "started.json"
RESULT_FILE = "result.json"
WRAPPER_LOG = "wrapper.log"
STDOUT_FILE = os.path.join("logs", "stdout.log")
STDERR_FILE = os.path.join("logs", "stderr.log")

EXIT_ALREADY_CLAIMED = 75
EXIT_SETUP = 1
POLL_S = 0.05
STATUS_BUFFER_LIMIT = 1 << 20
STDERR_TAIL_BYTES = 4096
STDERR_TAIL_LINES = 5


class SpecInvalid(Exception):
    """spec.json is missing, malformed or of another schema."""


# ---------------------------------------------------------------------------------------------
# small helpers


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def write_atomic(path: str, data: dict) -> None:
    """Write JSON by tmp + fsync + rename so a reader never sees half of it."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def proc_start_time(pid: str = "self") -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2 :].split()
    try:
        return int(rest[22 - 3])
    except (IndexError, ValueError):
        return None


def pid_ns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def valid_signal(number: int) -> bool:
    return 1 <= number <= int(getattr(signal, "SIGRTMAX", 64))


def split_status(returncode: int | None) -> tuple[int | None, int | None]:
    """(exit_code, signal) from a Popen returncode, with the shell's 128+N convention."""
    if returncode is None:
        return None, None
    if returncode < 0:
        return None, -returncode
    if returncode > 128 and valid_signal(returncode - 128):
        return None, returncode - 128
    return returncode, None


def assemble_argv(launch: dict, environ: dict, status_fd: int | None = None) -> list[str]:
    """The final runtime argv: ``launch.argv`` with the status-fd flag and forwarded env inserted.

    At ``insert_at`` come first ``[status_fd_flag, str(status_fd)]`` (when both are set), then,
    for each ``forward_env`` entry whose variable is set in ``environ``, its ``args`` with the
    literal ``{value}`` replaced by the value (plain ``str.replace``, nothing else).
    """
    argv = launch.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise SpecInvalid("launch.argv must be a non-empty list of strings")
    insert_at = launch.get("insert_at")
    if not isinstance(insert_at, int) or isinstance(insert_at, bool) or not 0 < insert_at <= len(argv):
        raise SpecInvalid("launch.insert_at must be an index into launch.argv")
    inserted = []  # type: list[str]
    flag = launch.get("status_fd_flag")
    if flag is not None and not isinstance(flag, str):
        raise SpecInvalid("launch.status_fd_flag must be a string or null")
    if flag and status_fd is not None:
        inserted += [flag, str(status_fd)]
    forward = launch.get("forward_env") or []
    if not isinstance(forward, list):
        raise SpecInvalid("launch.forward_env must be a list")
    for entry in forward:
        if not isinstance(entry, dict):
            raise SpecInvalid("launch.forward_env entries must be objects")
        name, args = entry.get("name"), entry.get("args")
        if not isinstance(name, str) or not _str_list(args):
            raise SpecInvalid("launch.forward_env entries need a name and a list of string args")
        if name in environ:
            value = environ[name]
            inserted += [arg.replace("{value}", value) for arg in args]
    return argv[:insert_at] + inserted + argv[insert_at:]


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def load_spec(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            data = handle.read(STATUS_BUFFER_LIMIT + 1)
    except OSError as exc:
        raise SpecInvalid(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > STATUS_BUFFER_LIMIT:
        raise SpecInvalid("spec.json is too large")
    try:
        spec = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise SpecInvalid(f"spec.json is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise SpecInvalid("spec.json must hold an object")
    if spec.get("schema") != SPEC_SCHEMA:
        raise SpecInvalid("spec.json schema {!r} is not {!r}".format(spec.get("schema"), SPEC_SCHEMA))
    launch = spec.get("launch")
    if not isinstance(launch, dict):
        raise SpecInvalid("spec.json has no launch object")
    env = launch.get("runtime_env") or {}
    if not isinstance(env, dict) or not _str_list(list(env)) or not _str_list(list(env.values())):
        raise SpecInvalid("launch.runtime_env must map strings to strings")
    for key in ("preflight_paths", "prepare_dirs"):
        paths = launch.get(key) or []
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
            raise SpecInvalid(f"launch.{key} must be a list of absolute paths")
    limit = spec.get("time_limit_s")
    if limit is not None and (not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0):
        raise SpecInvalid("time_limit_s must be a positive number or null")
    grace = spec.get("kill_grace_s", 10)
    if not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace < 0:
        raise SpecInvalid("kill_grace_s must be a non-negative number")
    return spec


class StatusReader(threading.Thread):
    """Reads bwrap's --json-status-fd records (a stream of JSON objects)."""

    def __init__(self, fd: int) -> None:
        threading.Thread.__init__(self, name="status-fd", daemon=True)
        self.fd = fd
        self.lock = threading.Lock()
        self.records = []  # type: list[dict]
        self.child_pid = None  # type: int | None
        self.pid_namespace = None  # type: int | None
        self.exit_code = None  # type: int | None
        self.got_exit_code = False

    def run(self) -> None:
        decoder = json.JSONDecoder()
        buffer = ""
        raw = b""
        try:
            while True:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                raw += chunk
                if len(raw) > STATUS_BUFFER_LIMIT:
                    break
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue  # a multi-byte character split across reads
                raw = b""
                buffer += text
                while True:
                    stripped = buffer.lstrip()
                    if not stripped:
                        buffer = ""
                        break
                    try:
                        record, end = decoder.raw_decode(stripped)
                    except ValueError:
                        buffer = stripped
                        break  # incomplete: wait for more
                    buffer = stripped[end:]
                    if isinstance(record, dict):
                        self._take(record)
        finally:
            os.close(self.fd)

    def _take(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)
            pid = record.get("child-pid")
            if isinstance(pid, int) and self.child_pid is None:
                self.child_pid = pid
                ns = record.get("pid-namespace")
                if isinstance(ns, int):
                    self.pid_namespace = ns
            if "exit-code" in record:
                self.got_exit_code = True
                code = record.get("exit-code")
                self.exit_code = code if isinstance(code, int) else None


# ---------------------------------------------------------------------------------------------


class Wrapper:
    def __init__(self, attempt_dir: str) -> None:
        self.dir = os.path.abspath(attempt_dir)
        self.attempt_id = os.path.basename(self.dir.rstrip("/"))
        self.hostname = socket.gethostname()
        self.proc = None  # type: subprocess.Popen | None
        self.status = None  # type: StatusReader | None
        self.uses_status = False
        self.pending_signal = None  # type: int | None
        self.terminated_by = None  # type: str | None
        self.timed_out = False
        self.stopping = False
        self.kill_at = None  # type: float | None
        self.killed = False
        self.started_at = None  # type: float | None
        self.started_mono = None  # type: float | None
        self.stderr_offset = 0
        self.result_written = False
        self.spec = {}  # type: dict

    # -- bookkeeping ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def log(self, message: str) -> None:
        line = f"{now_iso()} [{os.getpid()}] {message}\n"
        try:
            with open(self.path(WRAPPER_LOG), "a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError:
            sys.stderr.write(line)

    def claim(self) -> bool:
        try:
            fd = os.open(self.path(CLAIM_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False
        claim = {
            "pid": os.getpid(),
            "start_time": proc_start_time(),
            "hostname": self.hostname,
            "claimed_at": time.time(),
        }
        try:
            os.write(fd, (json.dumps(claim, sort_keys=True) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.terminated_by is None:
            self.terminated_by = signal_name(signum)
        self.pending_signal = signum

    def write_result(
        self, exit_code: int | None, sig: int | None, user_code_started: bool, setup_error: str | None
    ) -> None:
        ended = time.time()
        wall = None if self.started_mono is None else round(time.monotonic() - self.started_mono, 3)
        peak = None  # type: int | None
        if self.proc is not None:
            try:
                peak = int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            except (OSError, ValueError):
                peak = None
        result = {
            "schema": RESULT_SCHEMA,
            "attempt_id": self.attempt_id,
            "exit_code": exit_code,
            "signal": sig,
            "started_at": self.started_at,
            "ended_at": ended,
            "wall_s": wall,
            "peak_rss_kb": peak,
            "timed_out": self.timed_out,
            "terminated_by": self.terminated_by,
            "user_code_started": user_code_started,
            "setup_error": setup_error,
        }
        write_atomic(self.path(RESULT_FILE), result)
        self.result_written = True
        self.log(f"result: {json.dumps(result, sort_keys=True)}")

    def setup_failure(self, message: str) -> int:
        self.log(f"setup error: {message}")
        self.write_result(None, None, False, message)
        return EXIT_SETUP

    def stderr_tail(self) -> str:
        try:
            with open(self.path(STDERR_FILE), "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                start = max(self.stderr_offset, size - STDERR_TAIL_BYTES)
                handle.seek(start)
                data = handle.read()
        except OSError:
            return ""
        lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        return "\n".join(lines[-STDERR_TAIL_LINES:])

    # -- stopping --------------------------------------------------------------------------------

    def sandbox_pids(self) -> list[int]:
        """Host pids in the sandbox's pid namespace, except its init (bwrap's child-pid)."""
        status = self.status
        if status is None or status.pid_namespace is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid == status.child_pid:
                continue
            if pid_ns_inode(pid) == status.pid_namespace:
                pids.append(pid)
        return pids

    def signal_group(self, signum: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def begin_stop(self, signum: int, why: str) -> None:
        self.stopping = True
        grace = float(self.spec.get("kill_grace_s", 10))
        self.kill_at = time.monotonic() + grace
        if self.uses_status and self.status is not None and self.status.pid_namespace is not None:
            # bwrap does not forward signals: deliver to every process of the sandbox but its init
            pids = self.sandbox_pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            self.log(f"{why}: sent {signal_name(signum)} to sandbox pids {pids}; SIGKILL in {grace}s")
        else:
            self.signal_group(signum)
            self.log(f"{why}: sent {signal_name(signum)} to process group; SIGKILL in {grace}s")

    def hard_kill(self) -> None:
        self.killed = True
        status = self.status
        if (
            self.uses_status
            and status is not None
            and status.child_pid is not None
            and pid_ns_inode(status.child_pid) == status.pid_namespace
        ):
            # killing the sandbox init tears the pid namespace down; bwrap then reports exit-code 137
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(status.child_pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        self.signal_group(signal.SIGKILL)
        self.log("grace expired: SIGKILL sent")

    # -- the run ---------------------------------------------------------------------------------

    def main(self) -> int:
        # handlers first: a signal right after the claim must still end in a result
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        if not self.claim():
            self.log(f"attempt already claimed ({CLAIM_FILE} exists): not running")
            return EXIT_ALREADY_CLAIMED
        self.log(f"claimed attempt {self.dir} on {self.hostname}")
        try:
            return self.run()
        except BaseException as exc:  # any failure still leaves a result
            self.log(f"wrapper error: {traceback.format_exc()}")
            self.emergency_kill()
            if not self.result_written:
                started = self.proc is not None and not self.uses_status
                try:
                    self.write_result(None, None, started, f"wrapper error: {type(exc).__name__}: {exc}")
                except BaseException:
                    self.log(f"could not write the result: {traceback.format_exc()}")
            return EXIT_SETUP

    def emergency_kill(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.hard_kill()
            self.proc.wait(timeout=10)
        except BaseException:
            self.log(f"emergency kill failed: {traceback.format_exc()}")

    def run(self) -> int:
        try:
            self.spec = load_spec(self.path(SPEC_FILE))
        except SpecInvalid as exc:
            self.spec = {}
            return self.setup_failure(f"invalid spec: {exc}")
        spec = self.spec
        if isinstance(spec.get("attempt_id"), str):
            self.attempt_id = spec["attempt_id"]
        launch = spec["launch"]
        self.uses_status = bool(launch.get("status_fd_flag"))

        for directory in launch.get("prepare_dirs") or []:
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                return self.setup_failure(f"cannot create {directory}: {exc.strerror}")
        missing = [p for p in launch.get("preflight_paths") or [] if not os.path.lexists(p)]
        if missing:
            return self.setup_failure("preflight: missing {}".format(", ".join(missing)))
        if self.pending_signal is not None:
            self.log(f"{self.terminated_by} before the payload started: not starting it")
            self.write_result(None, None, False, None)
            return 128 + self.pending_signal

        read_fd, write_fd = (None, None)
        if self.uses_status:
            read_fd, write_fd = os.pipe()
        try:
            argv = assemble_argv(launch, dict(os.environ), write_fd)
        except SpecInvalid as exc:
            if write_fd is not None:
                os.close(write_fd)
                os.close(read_fd)
            return self.setup_failure(f"invalid spec: {exc}")

        os.makedirs(self.path("logs"), exist_ok=True)
        # ExitStack rather than one multi-item "with": formatters would parenthesise that (3.10+ syntax)
        with contextlib.ExitStack() as files:
            stdout = files.enter_context(open(self.path(STDOUT_FILE), "ab"))
            stderr = files.enter_context(open(self.path(STDERR_FILE), "ab"))
            devnull = files.enter_context(open(os.devnull, "rb"))
            self.stderr_offset = stderr.seek(0, os.SEEK_END)
            self.log(f"starting: {json.dumps(argv)}")
            try:
                self.proc = subprocess.Popen(
                    argv,
                    env=dict(launch.get("runtime_env") or {}),
                    stdin=devnull,
                    stdout=stdout,
                    stderr=stderr,
                    close_fds=True,
                    pass_fds=(write_fd,) if write_fd is not None else (),
                    start_new_session=True,
                    cwd=self.dir,
                )
            except OSError as exc:
                if write_fd is not None:
                    os.close(write_fd)
                    os.close(read_fd)
                return self.setup_failure(f"cannot start the runtime {argv[0]!r}: {exc}")
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        if write_fd is not None:
            os.close(write_fd)
            self.status = StatusReader(read_fd)
            self.status.start()
        write_atomic(
            self.path(STARTED_FILE),
            {
                "attempt_id": self.attempt_id,
                "started_at": self.started_at,
                "pid": self.proc.pid,
                "hostname": self.hostname,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            },
        )
        self.log(f"payload started: pid {self.proc.pid}")

        limit = spec.get("time_limit_s")
        deadline = None if limit is None else self.started_mono + float(limit)
        handled_signal = None
        while True:
            try:
                self.proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.pending_signal is not None and self.pending_signal != handled_signal:
                handled_signal = self.pending_signal
                if not self.stopping:
                    self.begin_stop(handled_signal, f"received {signal_name(handled_signal)}")
                else:
                    self.log(f"received {signal_name(handled_signal)} while stopping: ignored")
            if deadline is not None and not self.stopping and now >= deadline:
                self.timed_out = True
                self.begin_stop(signal.SIGTERM, f"time limit of {limit}s reached")
            if self.stopping and not self.killed and self.kill_at is not None and now >= self.kill_at:
                self.hard_kill()
        return self.finish()

    def finish(self) -> int:
        returncode = self.proc.returncode
        self.log(f"runtime exited with status {returncode}")
        exit_code, sig = split_status(returncode)
        setup_error = None
        if self.uses_status:
            status = self.status
            status.join(timeout=5)
            with status.lock:
                user_code_started = status.got_exit_code
            if not user_code_started:
                if self.stopping:
                    self.log("stopped before the sandbox reported that the program started")
                else:
                    tail = self.stderr_tail()
                    setup_error = tail or f"the sandbox exited ({returncode}) before starting the program"
        else:
            user_code_started = True
        if setup_error is not None:
            # the program never ran: its exit code is unknown (the runtime's own status is logged)
            self.write_result(None, None, False, setup_error)
            return EXIT_SETUP
        self.write_result(exit_code, sig, user_code_started, None)
        if sig is not None:
            return 128 + sig if sig < 128 else EXIT_SETUP
        return exit_code & 0xFF if exit_code is not None else EXIT_SETUP


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: hpcc_wrapper.py ATTEMPT_DIR\n")
        return 2
    if not os.path.isdir(argv[1]):
        sys.stderr.write(f"hpcc_wrapper: {argv[1]} is not a directory\n")
        return 2
    return Wrapper(argv[1]).main()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
