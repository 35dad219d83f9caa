"""Sealing cost: the same trivial job as a bare ``/bin/true`` in a plain sbatch vs under the
hpc-compute wrapper with bubblewrap (an attempt directory staged by the real SlurmBackend).
Each job timestamps itself around the command (``date +%s.%N``), so the figure is the in-job
wall, free of sacct's 1 s resolution and of scheduling delay.  Usage: sealing.py K MEM_MB"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, rusage, wait_all_gone
from hpc import settings_for


def sbatch_wrap(body: str, mem_mb: int) -> str:
    argv = ["sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", "-c", "1", f"--mem={mem_mb}M",
            "-t", "1", "-J", "bench-seal", "--wrap", body]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def timed(cmd: str, stamp: Path) -> str:
    q = shlex.quote(str(stamp))
    return f't0=$(date +%s.%N); {cmd}; rc=$?; t1=$(date +%s.%N); echo "$t0 $t1 $rc" > {q}'


def main() -> None:
    k, mem_mb = int(sys.argv[1]), int(sys.argv[2])
    from hpc_compute.backends.base import Ticket
    from hpc_compute.backends.slurm import make_backend
    from hpc_compute.resources import wrapper_path
    from hpc_compute.spec import parse_spec

    home = Path(tempfile.mkdtemp(prefix="hpcc-seal-"))
    settings = settings_for(home, 0.5)
    backend = make_backend(settings)
    spec = parse_spec({"backend": "slurm", "image": "host", "command": ["/bin/true"],
                       "resources": {"cpus": 1, "memory": f"{mem_mb}M", "time_limit": 60}})
    wrapper = shlex.quote(str(wrapper_path()))
    ids: list[str] = []
    items: list[tuple[str, Path, Path | None]] = []
    for i in range(k):
        raw_stamp = home / f"raw-{i}.stamp"
        ids.append(sbatch_wrap(timed("/bin/true", raw_stamp), mem_mb))
        items.append(("raw", raw_stamp, None))
        run_id, attempt_id = f"seal{i}", str(uuid.uuid4())
        ticket = Ticket(run_id=run_id, attempt_id=attempt_id, number=1, spec=spec,
                        attempt_dir=settings.work_root / run_id / attempt_id)
        staged = Path(backend.stage(ticket)).parent
        hpc_stamp = home / f"hpc-{i}.stamp"
        cmd = f"/usr/bin/python3 {wrapper} {shlex.quote(str(staged))}"
        ids.append(sbatch_wrap(timed(cmd, hpc_stamp), mem_mb))
        items.append(("hpc", hpc_stamp, staged))
    wait_all_gone(ids)
    walls: dict[str, list[float]] = {"raw": [], "hpc": [], "payload": []}
    failures = 0
    for kind, stamp, staged in items:
        try:
            t0, t1, rc = stamp.read_text().split()
        except (OSError, ValueError):
            failures += 1
            continue
        if rc != "0":
            failures += 1
        walls[kind].append(float(t1) - float(t0))
        if staged is not None:
            result = json.loads((staged / "result.json").read_text())
            if result.get("wall_s") is not None:
                walls["payload"].append(float(result["wall_s"]))
    med = {key: statistics.median(v) if v else None for key, v in walls.items()}
    emit({"tool": "sealing", "k": k, "ok": failures == 0, "failures": failures,
          "raw_wall_s": med["raw"], "hpc_wall_s": med["hpc"], "bwrap_payload_wall_s": med["payload"],
          "overhead_s": (med["hpc"] - med["raw"]) if med["hpc"] is not None and med["raw"] is not None else None,
          "samples": {key: [round(x, 4) for x in v] for key, v in walls.items()}, "job_ids": ids, **rusage()})


if __name__ == "__main__":
    main()
