"""The real wrapper (under /usr/bin/python3) sealing real jobs with bubblewrap, image ``host``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.wrapper_support import (
    SYSTEM_PYTHON,
    make_attempt,
    result,
    run_wrapper,
    start_wrapper,
    started,
    stderr,
    stdout,
    stdout_json,
    wait_for_file,
    wrapper_log,
)

pytestmark = [
    pytest.mark.bwrap,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or not os.path.exists(SYSTEM_PYTHON), reason="needs bwrap"
    ),
]

PY = SYSTEM_PYTHON


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def test_exit_zero(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, sh("echo hello-out; echo hello-err >&2"))
    proc = run_wrapper(attempt)
    assert proc.returncode == 0, wrapper_log(attempt)
    res = result(attempt)
    assert res["schema"] == "hpc-compute/result/1"
    assert res["exit_code"] == 0 and res["signal"] is None
    assert res["user_code_started"] is True and res["setup_error"] is None
    assert res["timed_out"] is False and res["terminated_by"] is None
    assert res["attempt_id"] == attempt.name
    assert res["ended_at"] >= res["started_at"] and res["wall_s"] >= 0
    assert isinstance(res["peak_rss_kb"], int)
    assert stdout(attempt).strip() == "hello-out"
    assert stderr(attempt).strip() == "hello-err"
    start = started(attempt)
    assert start is not None
    assert set(start) == {"attempt_id", "started_at", "pid", "hostname", "cuda_visible_devices"}
    claim = json.loads((attempt / "wrapper.json").read_text())
    assert set(claim) == {"pid", "start_time", "hostname", "claimed_at"}
    assert isinstance(claim["pid"], int) and claim["pid"] != start["pid"]
    assert isinstance(claim["start_time"], int) and claim["start_time"] > 0


def test_exit_seven_reported_exactly(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, py("import sys; sys.exit(7)"))
    proc = run_wrapper(attempt)
    res = result(attempt)
    assert (proc.returncode, res["exit_code"], res["signal"]) == (7, 7, None)
    assert res["user_code_started"] is True and res["setup_error"] is None


@pytest.mark.parametrize("command", [sh("kill -9 $$"), py("import os; os.kill(os.getpid(), 9)")])
def test_killed_by_signal(tmp_path: Path, command: list[str]) -> None:
    attempt = make_attempt(tmp_path, command)
    proc = run_wrapper(attempt)
    res = result(attempt)
    assert (res["exit_code"], res["signal"]) == (None, 9)
    assert proc.returncode == 128 + 9
    assert res["user_code_started"] is True


def test_network_is_unreachable(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except OSError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    # control: the listener works from the host
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    deadline = time.monotonic() + 5
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert accepted, "control connection from the host must reach the listener"
    accepted.clear()

    code = f"""
import json, socket
out = {{}}
for host, port in (("127.0.0.1", {port}), ("1.1.1.1", 443), ("10.0.0.1", 22)):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[host] = "connected"
    except OSError as exc:
        out[host] = "failed: %s" % exc.errno
try:
    socket.getaddrinfo("example.org", 443)
    out["dns"] = "resolved"
except OSError as exc:
    out["dns"] = "failed"
out["ifaces"] = sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:])
print(json.dumps(out))
raise SystemExit(0 if all(str(v).startswith("failed") for k, v in out.items() if k != "ifaces") else 3)
"""
    try:
        attempt = make_attempt(tmp_path, py(code))
        proc = run_wrapper(attempt)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()
    report = stdout_json(attempt)
    assert proc.returncode == 0, report
    assert report["ifaces"] == ["lo"]
    assert report["127.0.0.1"] == "failed: 111"  # ECONNREFUSED: the sandbox's own loopback
    assert report["1.1.1.1"] == "failed: 101"  # ENETUNREACH
    assert report["dns"] == "failed"
    assert accepted == [], "nothing may reach the host listener"


def test_host_environment_does_not_leak(tmp_path: Path) -> None:
    hostile = "$(touch /output/pwned) `id` 'single' \"double\" ; | \n second line ,=,"
    attempt = make_attempt(
        tmp_path, py("import os, json; print(json.dumps(dict(os.environ)))"), env={"JOB_VAR": hostile}
    )
    secret = "s3cr3t-" + str(random.randrange(10**9))
    proc = run_wrapper(
        attempt,
        extra_env={
            "HPCC_TEST_SECRET": secret,
            "AWS_SECRET_ACCESS_KEY": secret,
            "LD_PRELOAD": "/nonexistent/evil.so",
            "APPTAINERENV_FOO": secret,
            "http_proxy": "http://proxy.invalid:3128",
        },
    )
    assert proc.returncode == 0, wrapper_log(attempt)
    env = stdout_json(attempt)
    assert secret not in stdout(attempt)
    assert set(env) == {"PATH", "HOME", "TMPDIR", "LANG", "HPCC_RUN_ID", "HPCC_ATTEMPT_ID", "JOB_VAR", "PWD"}
    assert env["JOB_VAR"] == hostile, "a job value is passed literally"
    assert env["HOME"] == "/tmp" and env["PWD"] == "/scratch"
    assert env["HPCC_ATTEMPT_ID"] == attempt.name
    assert not (attempt / "output" / "pwned").exists()
    assert "LD_PRELOAD" not in stderr(attempt), "the runtime itself ran without the host environment"


def test_input_read_only_and_output_written(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("original\n")
    single = tmp_path / "single.csv"
    single.write_text("a,b\n")
    code = """
import json, os
out = {"read": open("/input/d/in.txt").read(), "csv": open("/input/s.csv").read()}
attempts = {"overwrite": lambda: open("/input/d/in.txt", "w").write("evil"),
            "create": lambda: open("/input/d/new.txt", "w").write("evil"),
            "top": lambda: open("/input/new.txt", "w").write("evil"),
            "mkdir": lambda: os.mkdir("/input/dir"),
            "root": lambda: open("/evil", "w").write("evil"),
            "usr": lambda: open("/usr/bin/evil", "w").write("evil"),
            "etc": lambda: open("/etc/passwd", "a").write("evil")}
for name, fn in attempts.items():
    try:
        fn()
        out[name] = "written"
    except OSError as exc:
        out[name] = "failed: %s" % exc.errno
with open("/output/result.txt", "w") as handle:
    handle.write("result-42\\n")
os.makedirs("/output/sub", exist_ok=True)
open("/output/sub/x.bin", "wb").write(b"\\0" * 1024)
open("/scratch/blob", "wb").write(b"1" * 4096)
open("/tmp/t", "w").write("tmp ok")
print(json.dumps(out))
"""
    attempt = make_attempt(tmp_path, py(code), inputs=((str(data), "d"), (str(single), "s.csv")))
    proc = run_wrapper(attempt)
    assert proc.returncode == 0, stderr(attempt) + wrapper_log(attempt)
    out = stdout_json(attempt)
    assert out["read"] == "original\n" and out["csv"] == "a,b\n"
    for name in ("overwrite", "create", "top", "mkdir", "root", "usr", "etc"):
        assert out[name] == "failed: 30", (name, out[name])  # EROFS
    assert (data / "in.txt").read_text() == "original\n"
    assert sorted(p.name for p in data.iterdir()) == ["in.txt"]
    host_out = attempt / "output" / "result.txt"
    assert host_out.read_text() == "result-42\n"
    assert host_out.stat().st_uid == os.getuid()
    assert (attempt / "output" / "sub" / "x.bin").stat().st_size == 1024
    assert (attempt / "scratch" / "blob").stat().st_size == 4096


def test_host_directories_invisible(tmp_path: Path) -> None:
    code = """
import json, os
out = {}
for path in ("/home", "/root", "/run", "/var", "/mnt", "/srv", "/opt", "/etc/shadow", "/etc/ssh", "/boot"):
    if not os.path.lexists(path):
        out[path] = "absent"
    elif os.path.isdir(path):
        out[path] = sorted(os.listdir(path))
    else:
        out[path] = "present"
out["host_tmp"] = sorted(os.listdir("/tmp"))
out["ps"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["hostname"] = open("/proc/sys/kernel/hostname").read().strip()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
out["CapEff"] = status["CapEff"].strip()
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
print(json.dumps(out))
"""
    attempt = make_attempt(tmp_path, py(code))
    marker = Path("/tmp") / f"hpcc-host-marker-{os.getpid()}"
    marker.write_text("host")
    try:
        proc = run_wrapper(attempt)
    finally:
        marker.unlink()
    assert proc.returncode == 0, stderr(attempt)
    out = stdout_json(attempt)
    for path in (
        "/home",
        "/root",
        "/run",
        "/var",
        "/mnt",
        "/srv",
        "/opt",
        "/etc/shadow",
        "/etc/ssh",
        "/boot",
    ):
        assert out[path] in ("absent", []), (path, out[path])
    assert out["host_tmp"] == []
    assert max(out["ps"]) < 10, "a private pid namespace"
    assert out["hostname"] == "hpcc-sandbox"
    assert out["CapEff"] == "0000000000000000"
    assert out["NoNewPrivs"] == "1"


def test_nested_user_namespaces_blocked(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, ["/usr/bin/unshare", "-U", "true"])
    run_wrapper(attempt)
    res = result(attempt)
    assert res["user_code_started"] is True
    assert res["exit_code"] not in (0, None), "unshare -U must fail inside the sandbox"


def test_command_not_found_is_setup_error(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, ["/no/such/program", "arg"])
    proc = run_wrapper(attempt)
    res = result(attempt)
    assert proc.returncode == 1
    assert res["user_code_started"] is False
    assert res["exit_code"] is None and res["signal"] is None
    assert res["setup_error"] and "execvp" in res["setup_error"] and "No such file" in res["setup_error"]


def test_missing_input_fails_preflight_without_starting(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, sh("echo ran > /output/ran"), inputs=((str(tmp_path / "missing"), "m"),))
    proc = run_wrapper(attempt)
    res = result(attempt)
    assert proc.returncode == 1
    assert res["user_code_started"] is False
    assert "preflight" in res["setup_error"] and str(tmp_path / "missing") in res["setup_error"]
    assert started(attempt) is None
    assert not (attempt / "output" / "ran").exists()


def test_missing_bind_source_reported_by_bwrap(tmp_path: Path) -> None:
    source = tmp_path / "vanishes"
    source.mkdir()
    attempt = make_attempt(tmp_path, sh("echo ran > /output/ran"), inputs=((str(source), "v"),))
    spec = json.loads((attempt / "spec.json").read_text())
    spec["launch"]["preflight_paths"] = []  # bypass the preflight to see bwrap's own failure
    (attempt / "spec.json").write_text(json.dumps(spec))
    source.rmdir()
    proc = run_wrapper(attempt)
    res = result(attempt)
    assert proc.returncode == 1 and res["user_code_started"] is False
    assert "Can't find source path" in res["setup_error"]
    assert not (attempt / "output" / "ran").exists()


def test_unknown_schema_refused(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, sh("echo ran > /output/ran"))
    spec = json.loads((attempt / "spec.json").read_text())
    spec["schema"] = "hpc-compute/attempt-spec/999"
    (attempt / "spec.json").write_text(json.dumps(spec))
    proc = run_wrapper(attempt)
    res = result(attempt)
    assert proc.returncode == 1 and "schema" in res["setup_error"]
    assert not (attempt / "output" / "ran").exists()


def test_sigterm_runs_the_job_trap(tmp_path: Path) -> None:
    script = (
        "trap 'echo got-TERM; echo partial > /output/checkpoint; exit 42' TERM; "
        "echo ready > /output/ready; while true; do sleep 0.1; done"
    )
    attempt = make_attempt(tmp_path, sh(script))
    wrapper = start_wrapper(attempt)
    try:
        assert wait_for_file(attempt / "output" / "ready"), wrapper_log(attempt)
        wrapper.send_signal(signal.SIGTERM)
        rc = wrapper.wait(timeout=30)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    res = result(attempt)
    assert res["terminated_by"] == "SIGTERM"
    assert (res["exit_code"], res["signal"]) == (42, None)
    assert rc == 42
    assert (attempt / "output" / "checkpoint").read_text() == "partial\n"
    assert "got-TERM" in stdout(attempt)
    assert res["timed_out"] is False


def test_time_limit(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, ["/bin/sleep", "60"], time_limit_s=2)
    begin = time.monotonic()
    proc = run_wrapper(attempt, timeout=30)
    elapsed = time.monotonic() - begin
    res = result(attempt)
    assert res["timed_out"] is True
    assert elapsed < 15
    assert res["signal"] == signal.SIGTERM and res["exit_code"] is None
    assert proc.returncode == 128 + signal.SIGTERM
    assert res["terminated_by"] is None


def test_time_limit_escalates_to_sigkill(tmp_path: Path) -> None:
    attempt = make_attempt(
        tmp_path, sh("trap '' TERM; while true; do sleep 0.1; done"), time_limit_s=1, kill_grace_s=1
    )
    begin = time.monotonic()
    proc = run_wrapper(attempt, timeout=30)
    res = result(attempt)
    assert time.monotonic() - begin < 15
    assert res["timed_out"] is True and res["signal"] == signal.SIGKILL
    assert proc.returncode == 128 + signal.SIGKILL
    assert res["user_code_started"] is True and res["setup_error"] is None


def test_tombstone_prevents_running(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, sh("echo ran > /output/ran"))
    (attempt / "wrapper.json").write_text('{"tombstone": true}')
    proc = run_wrapper(attempt)
    assert proc.returncode == 75
    assert not (attempt / "output" / "ran").exists()
    assert not (attempt / "result.json").exists() and started(attempt) is None
    assert json.loads((attempt / "wrapper.json").read_text()) == {"tombstone": True}
    assert "already claimed" in wrapper_log(attempt)


def test_second_wrapper_on_same_attempt_exits_75(tmp_path: Path) -> None:
    attempt = make_attempt(tmp_path, py("print('once')"))
    assert run_wrapper(attempt).returncode == 0
    assert run_wrapper(attempt).returncode == 75
    assert stdout(attempt).strip() == "once"


def _pgrep(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def test_sigkill_of_wrapper_kills_the_sandbox_tree(tmp_path: Path) -> None:
    tag = f"{random.randrange(1000, 9999)}.{os.getpid()}"
    # a foreground sleep and a daemonised grandchild, both with a unique argument
    script = f"(setsid sleep {tag} &) ; sleep {tag}"
    attempt = make_attempt(tmp_path, sh(script))
    wrapper = start_wrapper(attempt)
    try:
        deadline = time.monotonic() + 20
        while len(_pgrep(f"sleep {tag}")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_pgrep(f"sleep {tag}")) >= 2, wrapper_log(attempt)
        wrapper.kill()
        wrapper.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _pgrep(f"sleep {tag}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pgrep(f"sleep {tag}") == [], "no process of the sandbox may survive the wrapper"
        assert _pgrep(f"bwrap.*{tag}") == []
    finally:
        for pid in _pgrep(f"sleep {tag}"):
            os.kill(pid, signal.SIGKILL)


def test_cuda_visible_devices_forwarded_when_gpus(tmp_path: Path) -> None:
    code = "import os, json; print(json.dumps(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    with_gpu = make_attempt(tmp_path, py(code), gpus=1)
    assert run_wrapper(with_gpu, extra_env={"CUDA_VISIBLE_DEVICES": "0,1"}).returncode == 0
    assert stdout_json(with_gpu) == "0,1"
    start = started(with_gpu)
    assert start is not None and start["cuda_visible_devices"] == "0,1"
    without = make_attempt(tmp_path, py(code), gpus=0)
    assert run_wrapper(without, extra_env={"CUDA_VISIBLE_DEVICES": "0,1"}).returncode == 0
    assert stdout_json(without) is None
