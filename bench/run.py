#!/usr/bin/env python3
"""hpc-compute vs a raw sbatch loop, PSI/J and submitit on the Slurm cluster of this machine.

    python bench/run.py [--quick] [--n 100,500] [--reps 3] [--out bench/RESULTS.md]

For each N and repetition the tools run one after another in a fixed interleaved order
(raw loop, raw array, hpc-compute, PSI/J, submitit loop, submitit map_array, then the sealing
probe), each in its own process.  Before every measurement the runner waits until ``squeue -h``
shows no job (all of ours have ended by then, so any job is someone else's) and the controller
answers; a measurement during which another user's job ran or slurmctld restarted is marked
disturbed and retried once.  Ratios are taken pair by pair within one repetition, then the
median over repetitions.

Exit status (for CI, ``--quick``): non-zero if hpc-compute did not finish every run, or made
more than one squeue call in any engine cycle.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DRIVERS = BENCH / "drivers"
VENV_PY = BENCH / ".venv" / "bin" / "python"
PY = sys.executable
MEM_MB = 256
PSIJ_POLL_S = 1
DRIVER_TIMEOUT = 3600

TOOLS = ("raw-loop", "raw-array", "hpc", "hpc-array", "psij", "submitit-loop", "submitit-array")
EXTRA_TOOLS = ("raw-loop-export-none", "raw-loop-export-nil", "raw-loop-export-path", "raw-loop-export-all-clean")  # only with --tools: diagnostics
PEERS = ("psij", "submitit-loop", "submitit-array")
BULK_CLI_N = 500  # runs in the bulk CLI accept probe


def sh(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the shared machine -----------------------------------------------------------------------


def ctld_pid() -> str | None:
    try:
        return Path("/run/slurmctld.pid").read_text().strip()
    except OSError:
        return None


def controller_up() -> bool:
    try:
        out = sh(["scontrol", "ping"], timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and "UP" in out.stdout


def queue_jobs() -> list[str]:
    out = sh(["squeue", "-h", "-o", "%i"], timeout=10)
    if out.returncode != 0:
        return ["<squeue failed>"]
    return out.stdout.split()


def wait_quiet(max_wait: float = 900.0) -> float:
    """Block until no job is queued or running and the controller answers, twice 2 s apart."""
    t0 = time.monotonic()
    calm = 0
    announced = False
    while time.monotonic() - t0 < max_wait:
        if controller_up() and not queue_jobs() and sh(["sinfo", "-h", "-o", "%T"]).stdout.strip() in ("idle", ""):
            calm += 1
            if calm >= 2:
                return time.monotonic() - t0
        else:
            calm = 0
            if not announced:
                log("machine busy (other jobs queued or controller down): waiting")
                announced = True
        time.sleep(2)
    log(f"still busy after {max_wait:.0f}s: measuring anyway (marked)")
    return -1.0


def window_jobs(since: str) -> set[str]:
    """Base job ids that sacct knows between ``since`` and now."""
    out = sh(["sacct", "-a", "-X", "-n", "-P", "-S", since, "-E", "now", "-o", "JobID"], timeout=60)
    return {line.split("_")[0] for line in out.stdout.split() if line and line[0].isdigit()}


# -- one measurement --------------------------------------------------------------------------


def driver_argv(tool: str, n: int, profile: str | None) -> list[str]:
    if tool.startswith("raw-"):
        return [PY, str(DRIVERS / "raw.py"), tool[4:], str(n), str(MEM_MB)]
    if tool in ("hpc", "hpc-array"):
        argv = [PY, str(DRIVERS / "hpc.py"), str(n), str(MEM_MB)]
        if tool == "hpc-array":  # alike runs as job arrays, all claimed in one cycle
            argv += ["--array-min", "2", "--submit-batch", "1000"]
        return argv + (["--profile", profile] if profile else [])
    if tool == "sealing":
        return [PY, str(DRIVERS / "sealing.py"), str(n), str(MEM_MB)]
    return [str(VENV_PY), str(DRIVERS / "peers.py"), tool, str(n), str(MEM_MB), str(PSIJ_POLL_S)]


def measure_once(tool: str, n: int, profile: str | None = None) -> dict:
    waited = wait_quiet()
    pid_before = ctld_pid()
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    argv = driver_argv(tool, n, profile)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=DRIVER_TIMEOUT + n, check=False)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, rc = str(exc.stdout or ""), str(exc.stderr or ""), -9
    wall = time.monotonic() - t0
    result: dict = {"tool": tool, "n": n, "ok": False}
    for line in stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            result = json.loads(line[len("BENCH-RESULT "):])
            result["tool"] = tool  # one driver serves several tools (hpc, hpc-array)
    result.setdefault("ok", rc == 0)
    if rc != 0:
        result["ok"] = False
        result["error"] = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit {rc}"
    time.sleep(1.0)  # let sacct catch up
    ours = {j.split("_")[0] for j in result.get("job_ids") or []}  # array tasks (123_4) count as their array
    foreign = sorted(window_jobs(since) - ours, key=lambda x: int(x) if x.isdigit() else 0)
    restarted = ctld_pid() != pid_before
    result.update(
        wall_s=wall, waited_s=waited, foreign_jobs=len(foreign), ctld_restarted=restarted,
        disturbed=bool(foreign) or restarted or waited < 0, returncode=rc,
    )
    result.pop("cycle_log_full", None)
    return result


def measure(tool: str, n: int, tries: int = 2, profile: str | None = None) -> dict:
    for attempt in range(1, tries + 1):
        log(f"{tool} N={n} (try {attempt})")
        result = measure_once(tool, n, profile)
        result["tries"] = attempt
        brief = {k: result.get(k) for k in ("ok", "submit_s", "done_s", "foreign_jobs", "ctld_restarted")}
        log(f"  -> {brief}")
        if not result["disturbed"]:
            return result
        log("  disturbed by another user's jobs or a controller restart: retrying" if attempt < tries else
            "  disturbed again: kept, marked")
    return result


# -- CLI accept time ----------------------------------------------------------------------------


def cli_accept(samples: int = 3) -> dict:
    home = Path(tempfile.mkdtemp(prefix="hpcc-cli-"))
    config = home / "config.toml"
    config.write_text(
        '[slurm]\nruntime = "bubblewrap"\npython = "/usr/bin/python3"\naccounting = "auto"\nmin_poll_interval = 0.5\n'
    )
    env = {**os.environ, "HPC_COMPUTE_HOME": str(home), "HPC_COMPUTE_CONFIG": str(config)}
    cmd = [str(Path(PY).with_name("hpc-compute")) if Path(PY).with_name("hpc-compute").exists() else "hpc-compute",
           "submit", "--backend", "slurm", "--image", "host", "--mem", f"{MEM_MB}M", "--time", "60s",
           "--parsable", "--", "/bin/true"]
    times = []
    for _ in range(samples + 1):  # the first creates the ledger (schema): reported apart
        t0 = time.monotonic()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        times.append(time.monotonic() - t0)
        if out.returncode != 0:
            return {"ok": False, "error": out.stderr.strip()[-300:], "command": shlex.join(cmd)}
    # bulk: N jobs as JSON lines in one `submit --jobs` call (one transaction)
    jobs = home / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"command": ["/bin/true"], "name": f"j{i}"}) + "\n" for i in range(BULK_CLI_N)))
    bulk_cmd = [*cmd[:cmd.index("--parsable")], "--parsable", "--jobs", str(jobs)]
    t0 = time.monotonic()
    out = subprocess.run(bulk_cmd, env=env, capture_output=True, text=True, check=False)
    bulk_s = time.monotonic() - t0
    accepted = len(out.stdout.split()) if out.returncode == 0 else 0
    return {"ok": True, "first_s": times[0], "per_call_s": statistics.median(times[1:]), "samples": times[1:],
            "bulk_cli": accepted == BULK_CLI_N, "bulk_n": BULK_CLI_N, "bulk_s": bulk_s,
            "bulk_error": None if out.returncode == 0 else out.stderr.strip()[-300:],
            "command": shlex.join(cmd), "bulk_command": shlex.join(bulk_cmd)}


# -- report -------------------------------------------------------------------------------------


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, unit: str = "s", digits: int = 2) -> str:
    if v is None:
        return "–"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.{digits}f}" + (f" {unit}" if unit else "")


def span(values: list[float], unit: str = "s", digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0], unit, digits)
    return f"{fmt(statistics.median(values), unit, digits)} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def machine() -> dict:
    mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    conf = Path("/etc/slurm/slurm.conf").read_text().splitlines() if Path("/etc/slurm/slurm.conf").exists() else []
    keys = ("SchedulerType", "SchedulerParameters", "SelectType", "SelectTypeParameters", "MinJobAge",
            "AccountingStorageType", "ProctrackType", "TaskPlugin", "NodeName", "DefMemPerCPU")
    sched = [line for line in conf if line.split("=", 1)[0] in keys]
    try:
        slurm_version = sh(["sinfo", "--version"]).stdout.strip()
    except OSError:
        slurm_version = "?"
    return {
        "nproc": os.cpu_count(),
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?") if hasattr(platform, "freedesktop_os_release") else "?",
        "python": platform.python_version(),
        "slurm": slurm_version,
        "slurm_conf": sched,
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"),
    }


LABEL = {
    "raw-loop": "raw `sbatch` loop",
    "raw-array": "raw `sbatch --array`",
    "raw-loop-export-none": "raw loop + `--export=NONE`",
    "raw-loop-export-nil": "raw loop + `--export=NIL`",
    "raw-loop-export-path": "raw loop + `--export=PATH=/usr/bin:/bin`",
    "raw-loop-export-all-clean": "raw loop + `--export=ALL`, scrubbed sbatch env",
    "hpc": "hpc-compute",
    "hpc-array": "hpc-compute, arrays (`array_min=2`)",
    "psij": f"PSI/J (poll {PSIJ_POLL_S} s)",
    "submitit-loop": "submitit loop",
    "submitit-array": "submitit `map_array`",
}


def report(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Benchmarks: hpc-compute vs raw sbatch, PSI/J, submitit",
        "",
        f"Generated by `{data['command']}` on {data['date']} (took {data['took_s'] / 60:.1f} min).",
        "",
        "**The machine is shared and noisy**: colleagues run Slurm integration tests on the same",
        "single-node cluster (some restart slurmctld). Before every measurement the runner waited for",
        "an empty `squeue -h` and a responding controller; a measurement during which a foreign job",
        "ran or slurmctld restarted was retried once (and marked `*` if disturbed again). Figures are",
        "medians of the repetitions (min–max in brackets); ratios are taken pair by pair within one",
        "repetition, then their median.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs ({m['cpu']}), {m['mem_gb']} GB RAM, kernel {m['kernel']}, {m['os']}, Python {m['python']}",
        f"- {m['slurm']}, single node, accounting via slurmdbd; slurm.conf:",
        "",
        "```",
        *m["slurm_conf"],
        "```",
        "",
        f"Jobs: 1 CPU, `--mem={MEM_MB}M`, 1 min limit, payload `/bin/true`. The node has 2 CPUs, so at",
        "most 2 jobs run at a time: end-to-end times are bound by slurmctld/slurmd's job start rate.",
        "",
    ]
    if data.get("skipped"):
        lines += [f"**Skipped**: {data['skipped']}", ""]
    for note in data.get("notes") or []:
        lines += [f"- {note}"]
    if data.get("notes"):
        lines.append("")
    for n in data["ns"]:
        reps = [r for r in data["results"] if r["n"] == n]
        lines += [f"## N = {n}", "", "(ok = measurements that finished correctly / measurements; each is one repetition)", ""]
        lines += ["| tool | submit / accept | all submitted to Slurm | all seen finished | Slurm calls | CPU (self + children) | peak RSS | ok |",
                  "|---|---|---|---|---|---|---|---|"]
        for tool in TOOLS + EXTRA_TOOLS:
            rs = [r for r in reps if r["tool"] == tool]
            if not rs:
                continue
            star = "*" if any(r.get("disturbed") for r in rs) else ""
            if tool in ("hpc", "hpc-array"):
                submit = span([r.get("accept_s") for r in rs]) + " (accept)"
                all_sub = span([r.get("submit_s") for r in rs])
                calls = med([sum(r["calls"].values()) for r in rs if r.get("calls")])
                calls_s = f"{calls:.0f}" if calls is not None else "–"
            else:
                submit = span([r.get("submit_s") for r in rs])
                all_sub = "= submit"
                if tool.startswith("raw"):
                    c = med([(r.get("sbatch_calls") or 0) + (r.get("squeue_calls") or 0) for r in rs])
                    calls_s = f"{c:.0f}" if c is not None else "–"
                else:
                    calls_s = "n/a"
            cpu = span([(r.get("cpu_s") or 0) + (r.get("children_cpu_s") or 0) if r.get("cpu_s") is not None else None for r in rs])
            rss = span([r.get("peak_rss_mb") for r in rs], "MB", 0)
            ok = f"{sum(1 for r in rs if r.get('ok'))}/{len(rs)}"
            lines.append(f"| {LABEL[tool]}{star} | {submit} | {all_sub} | {span([r.get('done_s') for r in rs])} | {calls_s} | {cpu} | {rss} | {ok} |")
        lines.append("")
        ratio_rows = []
        for subject, other, label in [("hpc", o, lab) for o, lab in (("raw-loop", "hpc / raw loop"), ("raw-loop-export-none", "hpc / raw loop + --export=NONE"),
                             ("raw-loop-export-nil", "hpc / raw loop + --export=NIL"),
                             ("raw-loop-export-all-clean", "hpc / raw loop + scrubbed --export=ALL"),
                             ("raw-array", "hpc / raw array"), ("psij", "hpc / PSI/J"),
                             ("submitit-loop", "hpc / submitit loop"), ("submitit-array", "hpc / submitit map_array"))] + [
                ("hpc-array", "raw-array", "hpc arrays / raw array"), ("hpc-array", "raw-loop", "hpc arrays / raw loop"),
                ("hpc-array", "psij", "hpc arrays / PSI/J"), ("hpc-array", "submitit-array", "hpc arrays / submitit map_array")]:
            sub, done = [], []
            for rep in sorted({r["rep"] for r in reps}):
                h = next((r for r in reps if r["rep"] == rep and r["tool"] == subject and r.get("ok")), None)
                o = next((r for r in reps if r["rep"] == rep and r["tool"] == other and r.get("ok")), None)
                if h is None or o is None:
                    continue
                if h.get("submit_s") and o.get("submit_s"):
                    sub.append(h["submit_s"] / o["submit_s"])
                if h.get("done_s") and o.get("done_s"):
                    done.append(h["done_s"] / o["done_s"])
            if sub or done:
                ratio_rows.append(f"| {label} | {span(sub, 'x')} | {span(done, 'x')} |")
        if ratio_rows:
            lines += ["Pair-by-pair ratios (hpc-compute's *all submitted to Slurm* vs the other's submit time; end to end):", "",
                      "| ratio | submit | all seen finished |", "|---|---|---|", *ratio_rows, ""]
        hs = [r for r in reps if r["tool"] == "hpc" and r.get("cycles") is not None]
        if hs:
            calls = {}
            for prog in ("squeue", "sacct", "sbatch", "scontrol", "scancel"):
                calls[prog] = med([(r.get("calls") or {}).get(prog, 0) for r in hs])
            lines += [
                "hpc-compute engine detail (medians):", "",
                f"- cycles: {med([r.get('cycles') for r in hs]):.0f}; median cycle {fmt(med([r.get('median_cycle_s') for r in hs]), 's', 3)};"
                f" max squeue per cycle: {max(r.get('max_squeue_per_cycle', 0) for r in hs)}, max sacct per cycle:"
                f" {max(r.get('max_sacct_per_cycle', 0) for r in hs)}, max scontrol per cycle: {max(r.get('max_scontrol_per_cycle', 0) for r in hs)},"
                f" max sbatch per cycle: {max(r.get('max_sbatch_per_cycle', 0) for r in hs)}",
                "- Slurm calls in all: " + ", ".join(f"{k} {v:.0f}" for k, v in calls.items() if v),
                "- time in engine phases (s): " + ", ".join(
                    f"{k.strip('_')} {med([(r.get('phase_s') or {}).get(k, 0) for r in hs]):.2f}"
                    for k in ("_claim_and_submit", "_poll", "_apply_cancellations", "_reconcile")),
                f"- scheduler CPU {span([r.get('cpu_s') for r in hs])} (its own), Slurm commands' CPU {span([r.get('children_cpu_s') for r in hs])};"
                f" peak RSS {span([r.get('peak_rss_mb') for r in hs], 'MB', 0)}; ledger (db + WAL when the drive ended) {span([(r.get('ledger_bytes') or 0) / 1024 for r in hs], 'KiB', 0)}"
                f" ({span([(r.get('ledger_bytes') or 0) / n for r in hs], 'B', 0)} per run)",
                "- code measured (sha256 of hpc_compute/**/*.py, the tree was being edited by colleagues): "
                + ", ".join(sorted({str(r.get("code_hash", "?")) for r in hs}))
                + f"; strict_submit: {sorted({str(r.get('strict_submit', '?')) for r in hs})}",
                "",
            ]
    seal = [r for r in data["results"] if r["tool"] == "sealing" and r.get("ok")]
    if seal:
        lines += [
            "## Sealing cost (per job, measured inside the allocation)", "",
            "| job | in-job wall |", "|---|---|",
            f"| bare `/bin/true` in a plain sbatch | {span([r['raw_wall_s'] * 1000 for r in seal], 'ms', 1)} |",
            f"| hpc-compute wrapper + bubblewrap + `/bin/true` | {span([r['hpc_wall_s'] * 1000 for r in seal], 'ms', 1)} |",
            f"| of which the sandboxed payload (result.json `wall_s`) | {span([r['bwrap_payload_wall_s'] * 1000 for r in seal], 'ms', 1)} |",
            f"| **sealing overhead per job** | **{span([r['overhead_s'] * 1000 for r in seal], 'ms', 1)}** |",
            "",
            f"({seal[0]['k']} jobs of each kind per repetition, alternating; median per repetition, then over repetitions.",
            "Timestamps by `date +%s.%N` in the job script around the command; Slurm's own job start/stop",
            "overhead is the same for both and not included.)", "",
        ]
    cli = data.get("cli") or []
    good = [c for c in cli if c.get("ok")]
    if good:
        lines += [
            "## CLI accept time", "",
            f"- `hpc-compute submit` of one run: {span([c['per_call_s'] for c in good])} per call"
            f" (first call on a fresh home, creating the ledger: {span([c['first_s'] for c in good])}).",
            f"- N runs through one call each cost about N × that (N = 500: ~{500 * med([c['per_call_s'] for c in good]):.0f} s).",
        ]
        bulk = [c for c in good if c.get("bulk_cli")]
        if bulk:
            lines.append(f"- **bulk**: {bulk[0]['bulk_n']} runs in one `hpc-compute submit --jobs FILE` (JSON lines, one"
                         f" transaction): {span([c['bulk_s'] for c in bulk])} in all, process start included.")
        elif any("bulk_s" in c for c in good):
            lines.append(f"- bulk `submit --jobs` failed: {good[0].get('bulk_error')}")
        lines += [f"- command: `{good[0]['command']}`"]
        if bulk:
            lines += [f"- bulk command: `{bulk[0]['bulk_command']}`"]
        lines += [""]
    elif cli:
        lines += ["## CLI accept time", "", f"failed: {cli[0].get('error')}", ""]
    lines += [
        "## Exact commands", "",
        f"- raw loop: N × `sbatch --parsable -o /dev/null -e /dev/null -c 1 --mem={MEM_MB}M -t 1 -J bench-raw --wrap true`,"
        " then `squeue -h -j <all ids> -o '%i %A %F %T'` every 0.5 s until none is PENDING/RUNNING/COMPLETING",
        "- raw array: one `sbatch ... --array=0-(N-1) --wrap true` (chunks of 1000), same poll",
        f"- hpc-compute: `bench/drivers/hpc.py N {MEM_MB}`: `Client.submit_many` of N specs (`backend=slurm`, `image=host`,"
        f" `command=[/bin/true]`, 1 CPU, {MEM_MB}M, 60 s) into a fresh SQLite ledger, then `Engine.drive_until(ids)`;"
        " `[slurm] runtime=bubblewrap, python=/usr/bin/python3, accounting=auto, min_poll_interval=0.5`;"
        " `[scheduler] poll_interval=0.5, min_poll_interval=0.5`; Slurm calls counted by wrapping `SlurmBackend._run`",
        f"- PSI/J {data.get('versions', {}).get('psij', '?')}: `SlurmExecutorConfig(queue_polling_interval={PSIJ_POLL_S},"
        f" initial_queue_polling_delay={PSIJ_POLL_S})` (default 30 s / 2 s), N × `executor.submit(Job(JobSpec('/bin/true', ...)))`, then `job.wait()`",
        f"- submitit {data.get('versions', {}).get('submitit', '?')}: `AutoExecutor(cluster='slurm')`, `timeout_min=5` (a 1 min limit"
        " meets its `--signal=USR2@90` at start), N × `executor.submit(int, i)` (0.2 s throttle per sbatch) or"
        " `executor.map_array(int, range(N))`, then `job.result()`",
        f"- sealing: `bench/drivers/sealing.py K {MEM_MB}`",
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=20, 1 repetition, peers only if bench/.venv exists")
    parser.add_argument("--n", default=None, help="comma-separated N values (default 100,500)")
    parser.add_argument("--reps", default=None, help="repetitions: one number, or one per N (3,1)")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--json", default=None, help="raw results as JSON (default: next to --out)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--tools", default=None, help=f"subset of {','.join(TOOLS)},sealing")
    parser.add_argument("--seal-k", type=int, default=10, help="jobs of each kind in the sealing probe")
    parser.add_argument("--profile", action="store_true", help="cProfile the hpc-compute drive (bench/profiles/)")
    parser.add_argument("--render", default=None,
                        help="only re-render --out from results JSON file(s), comma-separated (merged in order)")
    args = parser.parse_args()
    if args.render:
        parts = [json.loads(Path(p).read_text()) for p in args.render.split(",")]
        data = parts[0]
        for extra in parts[1:]:
            data["ns"] = sorted(set(data["ns"]) | set(extra["ns"]))
            for n in extra["ns"]:  # later files' repetitions come after the earlier ones'
                offset = 1 + max((r["rep"] for r in data["results"] if r["n"] == n), default=-1)
                for r in extra["results"]:
                    if r["n"] == n:
                        r["rep"] += offset
            data["results"] += extra["results"]
            data["notes"] = (data.get("notes") or []) + (extra.get("notes") or [])
            data["cli"] += extra.get("cli") or []
            data["took_s"] += extra["took_s"]
            data["command"] += " ; " + extra["command"]
            data["reps"] = {**{str(k): v for k, v in data["reps"].items()}, **{str(k): v for k, v in extra["reps"].items()}}
            data["date"] = extra["date"]
        data["skipped"] = "; ".join(x for x in str(data.get("skipped") or "").split("; ") if not x.startswith("(partial"))
        Path(args.out).write_text(report(data))
        if len(parts) > 1 and args.json:
            Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        return 0

    ns = [int(x) for x in (args.n or ("20" if args.quick else "100,500")).split(",")]
    rep_list = [int(x) for x in str(args.reps or (1 if args.quick else 3)).split(",")]
    reps_for = {n: rep_list[min(i, len(rep_list) - 1)] for i, n in enumerate(ns)}
    tools = list(TOOLS) + ["sealing"]
    if args.tools:
        tools = [t for t in args.tools.split(",") if t]
    skipped = []
    if args.no_peers:
        tools = [t for t in tools if t not in PEERS]
        skipped.append("peers (PSI/J, submitit): --no-peers")
    elif not VENV_PY.exists():
        tools = [t for t in tools if t not in PEERS]
        skipped.append(f"peers (PSI/J, submitit): {VENV_PY} is missing (see docs/benchmarks.md to create it)")
        log("peer venv missing: PSI/J and submitit skipped")
    seal_k = 3 if args.quick else args.seal_k

    versions = {}
    if VENV_PY.exists():
        out = sh([str(VENV_PY), "-c", "import importlib.metadata as m; print(m.version('psij-python'), m.version('submitit'))"])
        if out.returncode == 0:
            versions = dict(zip(("psij", "submitit"), out.stdout.split()))
    started = time.monotonic()
    results: list[dict] = []
    cli: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_out = Path(args.json or out.with_suffix(".json"))
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    mach = machine()

    def write(final: bool) -> None:
        """Rewrite the report after every measurement, so an interrupted run still leaves one."""
        done_ns = [n for n in ns if any(r["n"] == n for r in results)]
        data = {
            "command": command,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "took_s": time.monotonic() - started,
            "machine": mach,
            "versions": versions,
            "ns": done_ns,
            "reps": reps_for,
            "skipped": "; ".join(skipped + ([] if final else ["(partial: the run was still going or was interrupted)"])),
            "results": results,
            "cli": cli,
        }
        out.write_text(report(data))
        json_out.write_text(json.dumps(data, indent=1, default=str))

    for n in ns:
        for rep in range(reps_for[n]):
            for tool in tools:
                if tool == "sealing":
                    if n != ns[0]:
                        continue
                    r = measure(tool, seal_k)
                    r["n"] = n
                else:
                    profile = None
                    if args.profile and tool == "hpc":
                        (BENCH / "profiles").mkdir(exist_ok=True)
                        profile = str(BENCH / "profiles" / f"hpc-n{n}-rep{rep}.prof")
                    r = measure(tool, n, profile=profile)
                r["rep"] = rep
                r.pop("job_ids", None)
                results.append(r)
                write(False)
            if n == ns[0]:
                wait_quiet()
                cli.append(cli_accept())
                write(False)
    write(True)
    log(f"wrote {out}")

    failures = []
    for r in results:
        if r["tool"] in ("hpc", "hpc-array"):
            if not r.get("ok"):
                failures.append(f"hpc-compute N={r['n']} rep {r['rep']}: not every run succeeded ({r.get('states')}, {r.get('error')})")
            if r.get("max_squeue_per_cycle", 0) > 1:
                failures.append(f"hpc-compute N={r['n']} rep {r['rep']}: {r['max_squeue_per_cycle']} squeue calls in one cycle")
    for f in failures:
        log("FAIL: " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
