"""The Python API (what a Django backend calls). Synchronous, typed and thread-safe; no Django import.

    from hpc_compute import Client
    client = Client(owner="alice")                  # sees and cancels only alice's runs
    run = client.submit({"image": "host", "command": ["python3", "-c", "print(1)"]},
                        idempotency_key=f"analysis:{pk}")
    client.wait(run.id, timeout=600)

The client only reads and writes the ledger; schedulers (``hpc-compute serve``) talk to the
backends. With the embedded SQLite ledger and no scheduler running, :meth:`Client.wait` can
drive the engine in-process (``drive=True``, or ``None`` to decide by itself).
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from hpc_compute.backends.base import Backend
from hpc_compute.config import Settings, load_settings
from hpc_compute.errors import ArtifactNotFound, SpecError, WaitTimeout
from hpc_compute.harvest import open_artifact_file, safe_relative_path
from hpc_compute.ledger.states import RunState
from hpc_compute.ledger.store import Ledger
from hpc_compute.records import ArtifactInfo, AttemptInfo, EventInfo, RunInfo
from hpc_compute.rundir import STDERR_FILE, STDOUT_FILE
from hpc_compute.spec import JobSpec, check_submittable, parse_spec

SpecInput = JobSpec | Mapping[str, Any]
ProgressCallback = Callable[[RunInfo], None]


class Client:
    """A handle on the ledger for one owner (or, with ``owner=None``, an operator who sees all runs)."""

    def __init__(
        self,
        ledger_url: str | None = None,
        *,
        owner: str | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            if ledger_url is not None:
                overrides["ledger_url"] = ledger_url
            settings = load_settings(overrides)
        self.settings = settings
        self.owner = owner
        self.ledger = Ledger(settings.ledger_url)
        self._backends: dict[str, Backend] | None = None

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- accepting runs -----------------------------------------------------------------------

    def _owner_for(self, spec: JobSpec, owner: str | None) -> str:
        if self.owner is not None and owner is not None and owner != self.owner:
            raise SpecError("owner", f"this client is scoped to {self.owner!r} and cannot submit as {owner!r}")
        effective = self.owner or owner or spec.owner or self.settings.owner
        if spec.owner is not None and spec.owner != effective:
            raise SpecError("owner", f"the spec names {spec.owner!r} but the run would belong to {effective!r}")
        return effective

    def validate(self, spec: SpecInput) -> JobSpec:
        """Everything :meth:`submit` checks, without writing anything."""
        job = spec if isinstance(spec, JobSpec) else parse_spec(dict(spec))
        check_submittable(job)
        self._check_backend(job)
        return job

    def _check_backend(self, spec: JobSpec) -> None:
        from hpc_compute.engine import default_backends

        if self._backends is None:
            self._backends = default_backends(self.settings)
        backend = self._backends.get(spec.backend)
        if backend is None:
            raise SpecError(
                "backend",
                f"backend {spec.backend!r} is not configured here (configured: {', '.join(self._backends)}); "
                f"add a [{spec.backend}] section to the config",
            )
        backend.check(spec)

    def submit(self, spec: SpecInput, *, owner: str | None = None, idempotency_key: str | None = None) -> RunInfo:
        """Accept a run into the ledger (state ``queued``). Invalid input raises SpecError and writes nothing."""
        job = self.validate(spec)
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 256):
            raise SpecError("idempotency_key", "must be 1 to 256 characters")
        return self.ledger.create_run(job, self._owner_for(job, owner), idempotency_key)

    def submit_many(self, specs: Iterable[SpecInput], *, owner: str | None = None) -> list[RunInfo]:
        """Accept many runs in one transaction; one invalid spec rejects them all (its index is named)."""
        jobs: list[JobSpec] = []
        for index, spec in enumerate(specs):
            try:
                jobs.append(self.validate(spec))
            except SpecError as exc:
                raise SpecError(f"specs[{index}].{exc.field}", exc.rule) from None
        owners = {self._owner_for(job, owner) for job in jobs}
        if len(owners) > 1:
            raise SpecError("owner", "one submit_many call submits for one owner")
        if not jobs:
            return []
        return self.ledger.create_runs(jobs, owners.pop())

    # -- reading ------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunInfo:
        return self.ledger.get_run(run_id, self.owner)

    def list(
        self,
        *,
        state: RunState | str | Sequence[RunState | str] | None = None,
        labels: Mapping[str, str] | None = None,
        updated_since: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[RunInfo]:
        states: builtins.list[RunState] | None = None
        if state is not None:
            raw = [state] if isinstance(state, str | RunState) else builtins.list(state)
            try:
                states = [RunState(s) for s in raw]
            except ValueError:
                raise SpecError("state", f"must be one of {', '.join(s.value for s in RunState)}") from None
        return self.ledger.list_runs(
            owner=self.owner, states=states, labels=dict(labels or {}), updated_since=updated_since, limit=limit
        )

    def events(self, run_id: str) -> builtins.list[EventInfo]:
        return self.ledger.events(run_id, self.owner)

    def attempts(self, run_id: str) -> builtins.list[AttemptInfo]:
        return self.ledger.attempts(run_id, self.owner)

    def artifacts(self, run_id: str) -> builtins.list[ArtifactInfo]:
        return self.ledger.artifacts(run_id, self.owner)

    def open_artifact(self, run_id: str, path: str) -> BinaryIO:
        """Open one harvested file for reading (never anything outside the run's artifact store)."""
        run = self.get(run_id)
        try:
            rel = safe_relative_path(path)
        except ValueError as exc:
            raise SpecError("path", str(exc)) from None
        for artifact in self.artifacts(run.id):
            if artifact.path == rel:
                root = self.settings.artifact_root / run.id / artifact.attempt_id
                return open_artifact_file(root, rel)
        raise ArtifactNotFound(f"run {run.id} has no artifact {rel!r}")

    def logs(self, run_id: str, *, stream: str = "stdout", offset: int = 0, limit: int | None = None) -> bytes:
        """The payload's stdout or stderr of the latest attempt, from byte ``offset``."""
        if stream not in {"stdout", "stderr"}:
            raise SpecError("stream", "must be stdout or stderr")
        run = self.get(run_id)
        attempt = self.ledger.latest_attempt(run.id, self.owner)
        if attempt is None:
            return b""
        rel = STDOUT_FILE if stream == "stdout" else STDERR_FILE
        try:
            handle = open_artifact_file(Path(attempt.attempt_dir), rel)
        except (FileNotFoundError, ArtifactNotFound):
            return b""
        with handle:
            handle.seek(offset)
            return handle.read() if limit is None else handle.read(limit)

    # -- acting -------------------------------------------------------------------------------

    def cancel(self, run_id: str) -> RunInfo:
        """Cancel a run: at once if still queued, else the scheduler cancels it and confirms by polling."""
        return self.ledger.request_cancel(run_id, self.owner)

    def wait(
        self,
        run_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        drive: bool | None = False,
        on_progress: ProgressCallback | None = None,
    ) -> RunInfo:
        """Block until the run is terminal; raise WaitTimeout if ``timeout`` passes first.

        ``drive=True`` runs the scheduler engine in this process while waiting (embedded ledger,
        nobody serving it); ``None`` does so only when no scheduler holds the embedded ledger.
        """
        run = self.get(run_id)
        if drive is None:
            drive = self.ledger.is_sqlite and not scheduler_running(self.settings)
        if drive and not run.terminal:
            from hpc_compute.engine import Engine

            engine = Engine(self.settings, self.ledger)
            engine.start()
            try:
                engine.drive_until(
                    [run.id],
                    timeout=timeout,
                    on_cycle=(lambda _e: on_progress(self.get(run.id))) if on_progress else None,
                )
            finally:
                engine.close()
            run = self.get(run.id)
            if not run.terminal:
                raise WaitTimeout(f"run {run.id} is still {run.state} after {timeout}s")
            return run
        deadline = None if timeout is None else time.monotonic() + timeout
        last_state: RunState | None = None
        while not run.terminal:
            if on_progress is not None and run.state != last_state:
                on_progress(run)
                last_state = run.state
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {run.id} is still {run.state} after {timeout}s")
            time.sleep(poll_interval)
            run = self.get(run.id)
        return run


def scheduler_running(settings: Settings) -> bool:
    """Whether a scheduler holds the embedded ledger's lock right now."""
    from hpc_compute.engine import SchedulerLock

    lock = SchedulerLock(settings.home / "scheduler.lock")
    if lock.try_acquire():
        lock.release()
        return False
    return True
