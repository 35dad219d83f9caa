"""The ``hpc-compute`` command line.

Exit codes (documented in the README):

====  ===========================================================================
0     success (with ``--wait``: the job exited 0)
N     with ``submit --wait`` / ``wait``: the job's own exit code, like ``sbatch --wait``
1     with ``--wait``: the run failed without an exit code of its own (signal, setup, lost...)
      or was cancelled
2     bad input (usage, spec rule, config)
3     the ledger or a backend cannot be reached
4     unknown run or artifact
124   ``wait --timeout`` ran out
130   interrupted
====  ===========================================================================
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer

from hpc_compute import __version__
from hpc_compute.api import Client
from hpc_compute.config import Settings, load_settings
from hpc_compute.errors import (
    ArtifactNotFound,
    BackendUnavailable,
    ConfigError,
    HpcComputeError,
    IdempotencyConflict,
    LedgerUnavailable,
    RunNotFound,
    SchedulerLocked,
    SpecError,
    WaitTimeout,
)
from hpc_compute.ledger.states import RunState
from hpc_compute.records import RunInfo
from hpc_compute.spec import INPUT_NAME_RE, load_spec_mapping, parse_spec
from hpc_compute.sweep import expand, read_json_lines

# Recent typer releases raise the exceptions of a vendored click, not of the click package.
_USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException,)
try:
    from typer._click import exceptions as _vendored_click

    _USAGE_ERRORS += (_vendored_click.ClickException,)
except ImportError:  # pragma: no cover - older typer uses click itself
    pass

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

FLAG_FOR_FIELD = {
    "resources.memory": "--mem",
    "resources.cpus": "--cpus",
    "resources.gpus": "--gpus",
    "resources.time_limit": "--time",
    "image": "--image",
    "backend": "--backend",
    "command": "COMMAND",
    "env": "--env",
    "labels": "--label",
    "name": "--name",
}

app = typer.Typer(
    name="hpc-compute",
    help="Run untrusted research code sealed (no network) on this host, Slurm or OpenNebula, with a durable ledger.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Ledger database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")


class _State:
    settings: Settings | None = None


def _settings() -> Settings:
    if _State.settings is None:
        _State.settings = load_settings()
    return _State.settings


def _client() -> Client:
    settings = _settings()
    return Client(settings=settings, owner=settings.owner)


def _is_tty() -> bool:
    return sys.stdout.isatty()


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"hpc-compute: error: {message}", err=True)
    raise typer.Exit(code)


def _exit_code_for(run: RunInfo) -> int:
    """``sbatch --wait`` semantics: the job's code, else 1 for a failure without one."""
    if run.state == RunState.SUCCEEDED:
        return 0
    if run.state == RunState.FAILED and run.exit_code not in (None, 0) and run.signal is None:
        return int(run.exit_code or EXIT_FAILED) & 0xFF or EXIT_FAILED
    return EXIT_FAILED


def _progress_printer(run_id: str) -> Any:
    state: dict[str, Any] = {"last": None, "t0": time.monotonic()}
    tty = sys.stderr.isatty()

    def show(run: RunInfo) -> None:
        reason = f" ({run.pending_reason})" if run.pending_reason else ""
        line = f"run {run_id[:8]}: {run.state}{reason}"
        if tty:
            elapsed = time.monotonic() - state["t0"]
            sys.stderr.write(f"\r\x1b[K{line} [{elapsed:.0f}s]")
            sys.stderr.flush()
        elif line != state["last"]:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        state["last"] = line

    return show


def _wait_for(client: Client, run_id: str, timeout: float | None) -> RunInfo:
    show = _progress_printer(run_id)
    try:
        run = client.wait(run_id, timeout=timeout, drive=None, on_progress=show)
    finally:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    show(run)
    return run


# -- submit ------------------------------------------------------------------------------------


def _parse_pairs(values: list[str], field: str, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(field, f"{flag} takes NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def _parse_input(value: str, index: int) -> dict[str, str]:
    source, name = value, ""
    head, sep, tail = value.rpartition(":")
    if sep and head and INPUT_NAME_RE.match(tail):
        source, name = head, tail
    path = Path(source).expanduser()
    resolved = str(path.resolve()) if path.exists() else str(path.absolute())
    if not name:
        name = path.name or "input"
    return {"source": resolved, "name": name}


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[list[str] | None, typer.Argument(help="the program and its arguments (after --)")] = None,
    image: Annotated[str | None, typer.Option(help="'host', a rootfs directory or a local .sif")] = None,
    backend: Annotated[str | None, typer.Option(help="local, slurm or opennebula")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPU cores")] = None,
    mem: Annotated[str | None, typer.Option(help="memory limit, e.g. 512M or 4G")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="wall-clock limit: 90s, 10m, 2h, HH:MM:SS")] = None,
    inputs: Annotated[
        list[str] | None, typer.Option("--input", help="SRC[:NAME], mounted read-only at /input/NAME")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="K=V for the job's environment")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="K=V label")] = None,
    name: Annotated[str | None, typer.Option(help="display name")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="job file (TOML or YAML), may hold a [sweep]")
    ] = None,
    jobs: Annotated[
        str | None, typer.Option("--jobs", help="many jobs as JSON lines, from a file or '-' for stdin")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="same key + same spec = same run")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the end; exit with the job's exit code")] = False,
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after this many seconds")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
    parsable: Annotated[bool, typer.Option("--parsable", help="print only the run id")] = False,
) -> None:
    """Accept runs into the ledger: ``hpc-compute submit --image host -- python3 -c 'print(1)'``.

    One job from the options (and ``--file``); many from a file with a ``\\[sweep]`` table or from
    ``--jobs`` (JSON lines), accepted in one transaction; options given here apply to each."""
    overrides: dict[str, Any] = {}
    if command:
        overrides["command"] = list(command)
    for key, value in (("image", image), ("backend", backend), ("name", name)):
        if value is not None:
            overrides[key] = value
    given: dict[str, int | str | None] = {"cpus": cpus, "memory": mem, "gpus": gpus, "time_limit": time_limit}
    resources = {key: value for key, value in given.items() if value is not None}
    extra_inputs = [_parse_input(v, i) for i, v in enumerate(inputs or [])]
    extra_env = _parse_pairs(env or [], "env", "--env")
    extra_labels = _parse_pairs(label or [], "labels", "--label")

    def build(base: dict[str, Any]) -> dict[str, Any]:
        data = {**base, **overrides}
        if resources:
            data["resources"] = {**dict(data.get("resources") or {}), **resources}
        if extra_inputs:
            data["inputs"] = [*list(data.get("inputs") or []), *extra_inputs]
        if extra_env:
            data["env"] = {**dict(data.get("env") or {}), **extra_env}
        if extra_labels:
            data["labels"] = {**dict(data.get("labels") or {}), **extra_labels}
        return data

    if jobs is not None and file is not None:
        raise SpecError("jobs", "give either --file or --jobs, not both")
    if jobs is not None:
        source = sys.stdin if jobs == "-" else _open_jobs(jobs)
        bases = list(read_json_lines(source))
        if not bases:
            raise SpecError("jobs", "holds no job")
    else:
        bases = expand(load_spec_mapping(file)) if file else [{}]
    client = _client()
    if len(bases) == 1 and jobs is None:
        runs = [client.submit(parse_spec(build(bases[0])), idempotency_key=idempotency_key)]
    else:
        if idempotency_key is not None:
            raise SpecError("idempotency_key", "applies to one run; a sweep or job list is accepted atomically")
        specs = []
        for index, base in enumerate(bases):
            try:
                specs.append(parse_spec(build(base)))
            except SpecError as exc:
                raise SpecError(f"jobs[{index}].{exc.field}", exc.rule) from None
        runs = client.submit_many(specs)
    if parsable:
        for run in runs:
            typer.echo(run.id)
    elif as_json and not wait:
        _emit_json(runs[0].summary() if len(runs) == 1 and jobs is None else [r.summary() for r in runs])
    elif not as_json:
        for run in runs[:20]:
            typer.echo(f"Submitted run {run.id}", err=wait)
        if len(runs) > 20:
            typer.echo(f"... and {len(runs) - 20} more ({len(runs)} runs in all)", err=wait)
    if not wait:
        return
    finished = [_wait_for(client, run.id, timeout) for run in runs]
    if as_json:
        _emit_json(finished[0].summary() if len(finished) == 1 and jobs is None else [r.summary() for r in finished])
    elif not parsable:
        for run in finished:
            _print_outcome(run)
    raise typer.Exit(max(_exit_code_for(run) for run in finished))


def _open_jobs(path: str) -> Any:
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise SpecError("jobs", f"cannot read {path}: {exc.strerror}") from None


def _print_outcome(run: RunInfo) -> None:
    detail = f"exit code {run.exit_code}" if run.exit_code is not None else ""
    if run.signal is not None:
        detail = f"signal {run.signal}"
    if run.failure_kind:
        detail = f"{run.failure_kind}{', ' + detail if detail else ''}"
    typer.echo(f"run {run.id} {run.state}{': ' + detail if detail else ''}", err=True)


# -- reading -----------------------------------------------------------------------------------


def _fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(help="run id (or a unique prefix of 8+ characters)")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one run: state, failure kind, exit code, attempts, pending reason."""
    client = _client()
    run = client.get(run_id)
    if as_json:
        data = run.summary()
        data["attempt_history"] = [a.model_dump(mode="json") for a in client.attempts(run.id)]
        _emit_json(data)
        return
    rows = [
        ("id", run.id),
        ("name", run.name or "-"),
        ("state", run.state.value + (" (cancel requested)" if run.cancel_requested and not run.terminal else "")),
        ("failure_kind", run.failure_kind or "-"),
        ("exit_code", "-" if run.exit_code is None else str(run.exit_code)),
        ("signal", "-" if run.signal is None else str(run.signal)),
        ("pending_reason", run.pending_reason or "-"),
        ("backend", run.backend),
        ("backend_job_id", run.backend_job_id or "-"),
        ("attempts", f"{run.attempts}/{run.max_attempts}"),
        ("created_at", _fmt_time(run.created_at)),
        ("started_at", _fmt_time(run.started_at)),
        ("finished_at", _fmt_time(run.finished_at)),
        ("message", run.failure_message or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@app.command("list")
def list_runs(
    state: Annotated[list[str] | None, typer.Option("--state", "-t", help="filter by state (repeatable)")] = None,
    limit: Annotated[int, typer.Option(help="at most this many runs, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List your runs, newest first."""
    runs = _client().list(state=state or None, limit=limit)
    if as_json:
        _emit_json([r.summary() for r in runs])
        return
    headers = ("RUN", "NAME", "STATE", "KIND", "EXIT", "BACKEND", "JOB", "CREATED")
    table = [
        (
            r.id[:8],
            (r.name or "-")[:24],
            r.state.value,
            r.failure_kind or "-",
            "-" if r.exit_code is None else str(r.exit_code),
            r.backend,
            r.backend_job_id or "-",
            _fmt_time(r.created_at),
        )
        for r in runs
    ]
    if _is_tty():
        from rich.console import Console
        from rich.table import Table

        rich_table = Table(*headers, box=None, header_style="bold")
        for row in table:
            rich_table.add_row(*row)
        Console().print(rich_table)
    else:
        for row in [headers, *table]:
            typer.echo("\t".join(row))


@app.command()
def logs(
    run_id: Annotated[str, typer.Argument()],
    stderr: Annotated[bool, typer.Option("--stderr", help="show stderr instead of stdout")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the run ends")] = False,
) -> None:
    """Print the job's stdout (or stderr) of its latest attempt."""
    client = _client()
    stream = "stderr" if stderr else "stdout"
    offset = 0
    out = sys.stdout.buffer
    while True:
        chunk = client.logs(run_id, stream=stream, offset=offset)
        if chunk:
            out.write(chunk)
            out.flush()
            offset += len(chunk)
        if not follow or client.get(run_id).terminal:
            if follow:
                tail = client.logs(run_id, stream=stream, offset=offset)
                out.write(tail)
                out.flush()
            return
        time.sleep(0.5)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a run (queued: at once; pending or running: the scheduler stops it)."""
    run = _client().cancel(run_id)
    if run.terminal:
        typer.echo(f"run {run.id} is {run.state}")
    else:
        typer.echo(f"run {run.id}: cancel requested ({run.state})")


@app.command("wait")
def wait_cmd(
    run_id: Annotated[str, typer.Argument()],
    timeout: Annotated[float | None, typer.Option(help="seconds; exit 124 when they pass")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Wait for a run to end; exit with its exit code (like ``sbatch --wait``)."""
    client = _client()
    run = _wait_for(client, run_id, timeout)
    if as_json:
        _emit_json(run.summary())
    else:
        _print_outcome(run)
    raise typer.Exit(_exit_code_for(run))


@app.command()
def artifacts(
    run_id: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    download: Annotated[Path | None, typer.Option(help="copy the files into this directory")] = None,
) -> None:
    """List the files harvested from the run's /output (path, size, sha256)."""
    client = _client()
    items = client.artifacts(run_id)
    if download is not None:
        run = client.get(run_id)
        for item in items:
            target = download / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with client.open_artifact(run.id, item.path) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    if as_json:
        _emit_json([{"path": a.path, "size": a.size, "sha256": a.sha256} for a in items])
        return
    for item in items:
        typer.echo(f"{item.sha256}  {item.size:>12}  {item.path}")


# -- operating ---------------------------------------------------------------------------------


@app.command()
def serve(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the scheduler daemon: claim, submit, poll, harvest, finish, until SIGTERM/SIGINT."""
    from hpc_compute.engine import Engine
    from hpc_compute.ledger.store import Ledger

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = _settings()
    ledger = Ledger(settings.ledger_url)
    engine = Engine(settings, ledger)
    engine.start()

    def _stop(signum: int, _frame: Any) -> None:
        logging.getLogger("hpc_compute").info("signal %d: stopping after this cycle", signum)
        engine.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logging.getLogger("hpc_compute").info(
        "scheduler %s serving %s (backends: %s)", engine.scheduler_id, settings.home, ", ".join(engine.backends)
    )
    try:
        engine.run_forever()
    finally:
        engine.close()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the ledger schema to the newest revision."""
    from hpc_compute.ledger import db
    from hpc_compute.ledger.store import Ledger

    settings = _settings()
    ledger = Ledger(settings.ledger_url, auto_upgrade=False)
    ledger.upgrade()
    typer.echo(f"ledger {db.safe_url(settings.ledger_url)} at revision {db.current_revision(ledger.engine)}")


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Check what is installed, reachable and migrated, and whether sealing really holds here."""
    from hpc_compute.doctor import run_checks

    checks = run_checks(_settings())
    if as_json:
        _emit_json([c.__dict__ for c in checks])
    else:
        for check in checks:
            mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[check.status]
            typer.echo(f"[{mark}] {check.name}: {check.detail}")
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(EXIT_FAILED)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        typer.echo(f"hpc-compute {__version__}")
        raise typer.Exit(0)


def _spec_message(exc: SpecError) -> str:
    flag = FLAG_FOR_FIELD.get(exc.field.split("[")[0])
    return f"{exc.field}{f' ({flag})' if flag else ''}: {exc.rule}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: map every expected error to its documented exit code, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except _USAGE_ERRORS as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, typer.Abort):
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except SpecError as exc:
        _stderr(_spec_message(exc))
        sys.exit(EXIT_USAGE)
    except (ConfigError, IdempotencyConflict) as exc:
        _stderr(str(exc))
        sys.exit(EXIT_USAGE)
    except (LedgerUnavailable, BackendUnavailable, SchedulerLocked) as exc:
        _stderr(str(exc))
        sys.exit(EXIT_UNAVAILABLE)
    except (RunNotFound, ArtifactNotFound) as exc:
        _stderr(str(exc))
        sys.exit(EXIT_NOT_FOUND)
    except WaitTimeout as exc:
        _stderr(str(exc))
        sys.exit(EXIT_TIMEOUT)
    except HpcComputeError as exc:
        _stderr(str(exc))
        sys.exit(EXIT_FAILED)
    except BrokenPipeError:
        os._exit(0)


def _stderr(message: str) -> None:
    sys.stderr.write(f"hpc-compute: error: {message}\n")


if __name__ == "__main__":  # pragma: no cover
    main()
