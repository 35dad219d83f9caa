"""Run notifications: the relay of the ledger's transactional outbox.

Every run state change writes a row to ``hpcc_outbox`` in the transaction that made the change
(:func:`hpc_compute.ledger.store.transition`). The scheduler's :class:`Notifier` delivers those
rows, at least once, to

* every webhook of ``[notify] webhooks`` (an HTTP ``POST`` of JSON), and
* every Python hook registered in the ``hpc_compute.hooks`` entry point group: a callable that
  receives the payload ``dict``; an exception counts as a failed delivery and is retried.

A webhook request carries::

    Content-Type: application/json
    X-HPCC-Event: run.state
    X-HPCC-Delivery: <outbox id>-<target index>     the same on every retry: deduplicate on it
    X-HPCC-Timestamp: <unix seconds of this try>
    X-HPCC-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with the secret>

and a body such as ``{"delivery_id": "42-0", "run_id": ..., "owner": ..., "state": "failed",
"previous_state": "running", "failure_kind": "exit_code", "exit_code": 3, "signal": null,
"at": "<ISO 8601 UTC>", "event_id": 17, "attempt_id": ..., "message": ...}`` (a retry, state
``queued`` after a failed attempt, also has ``not_before``). Any 2xx answer is success;
redirects are not followed. Deliveries can arrive more than once and out of order: order by
``event_id`` (or ``at``) per run.

Failed deliveries are retried with exponential backoff and jitter; the schedule lives in the
table, so it survives restarts and is shared by every scheduler of a Postgres ledger (rows are
claimed with ``FOR UPDATE SKIP LOCKED``). After ``max_attempts`` tries the row is left
undelivered with its ``last_error`` and the run gets a ``notify_failed`` event. With no target
configured at all, rows are marked delivered as they come (nothing to deliver to); every
scheduler of one ledger should therefore share the same ``[notify]`` section.

Receivers check a delivery with :func:`verify_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from hpc_compute.config import Settings, WebhookSettings
from hpc_compute.ledger.store import DeliveryResult, Ledger, OutboxItem

log = logging.getLogger("hpc_compute.notify")

HOOK_GROUP = "hpc_compute.hooks"
SIGNATURE_PREFIX = "sha256="
USER_AGENT = "hpc-compute-notify/1"
PRUNE_EVERY_S = 600.0

Hook = Callable[[dict[str, Any]], object]


def sign(secret: str | bytes, timestamp: str | int, body: bytes) -> str:
    """The ``X-HPCC-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``b"<timestamp>." + body``."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: str | int,
    body: bytes | str,
    signature: str,
    *,
    tolerance_s: float | None = None,
    now: float | None = None,
) -> bool:
    """Check a webhook delivery, for receivers.

    ``secret`` is the webhook's shared secret; ``timestamp`` the ``X-HPCC-Timestamp`` header;
    ``body`` the raw request body *as received* (bytes; do not re-serialise parsed JSON);
    ``signature`` the ``X-HPCC-Signature`` header (``sha256=<hex>``; bare hex is accepted too).
    The comparison is constant-time (:func:`hmac.compare_digest`). With ``tolerance_s`` a
    timestamp further than that from ``now`` (default: this host's clock) fails too, which bounds
    replays; deduplicate on ``X-HPCC-Delivery`` as well, since deliveries are at least once.

    Example (any web framework)::

        ok = verify_signature(SECRET, request.headers["X-HPCC-Timestamp"], request.body,
                              request.headers["X-HPCC-Signature"], tolerance_s=300)
    """
    raw = body.encode() if isinstance(body, str) else body
    ts = str(timestamp).strip()
    if not ts.isdigit():
        return False
    if tolerance_s is not None and abs((time.time() if now is None else now) - int(ts)) > tolerance_s:
        return False
    given = signature.strip()
    if given.startswith(SIGNATURE_PREFIX):
        given = given[len(SIGNATURE_PREFIX) :]
    expected = sign(secret, ts, raw)[len(SIGNATURE_PREFIX) :]
    return hmac.compare_digest(expected.encode(), given.lower().encode())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx then surfaces as HTTPError: a failed delivery


class DeliveryError(Exception):
    """A target did not take a delivery. ``unreachable``: the receiver could not be reached at all
    (the notifier then skips that target for the rest of the batch instead of waiting again)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class _Target:
    index: int
    label: str
    webhook: WebhookSettings | None = None
    secret: bytes | None = None
    hook: Hook | None = None
    load_error: str | None = None


def body_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


class Notifier:
    """Delivers the outbox, one bounded batch per :meth:`run_once` (the engine calls it each cycle)."""

    def __init__(self, settings: Settings, ledger: Ledger, *, hooks: dict[str, Hook] | None = None) -> None:
        """``hooks`` replaces the entry point discovery (tests, embedding)."""
        self.settings = settings.notify
        self.ledger = ledger
        self._opener = urllib.request.build_opener(_NoRedirect())
        self.targets: list[_Target] = []
        self._last_prune: float | None = None
        for index, webhook in enumerate(self.settings.webhooks):
            self.targets.append(
                _Target(index=index, label=f"webhook {webhook.url}", webhook=webhook, secret=webhook.read_secret())
            )
        for name, hook, error in self._hooks(hooks):
            self.targets.append(_Target(index=len(self.targets), label=f"hook {name}", hook=hook, load_error=error))

    def _hooks(self, given: dict[str, Hook] | None) -> list[tuple[str, Hook | None, str | None]]:
        if given is not None:
            return [(name, given[name], None) for name in sorted(given)]
        if not self.settings.hooks:
            return []
        out: list[tuple[str, Hook | None, str | None]] = []
        for ep in sorted(entry_points(group=HOOK_GROUP), key=lambda e: e.name):
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken hook is retried until fixed, never skipped
                log.error("notification hook %s (%s) cannot be loaded: %s", ep.name, ep.value, exc)
                out.append((ep.name, None, f"cannot load {ep.value}: {exc.__class__.__name__}: {exc}"))
                continue
            if not callable(loaded):
                out.append((ep.name, None, f"{ep.value} is not callable"))
                continue
            out.append((ep.name, loaded, None))
        return out

    # -- delivery -----------------------------------------------------------------------------

    def backoff(self, tries: int) -> float:
        """Seconds before the next try after ``tries`` failed ones: exponential, capped, with jitter
        (between half and all of the nominal delay)."""
        nominal = min(self.settings.max_backoff, self.settings.backoff * (2 ** max(0, tries - 1)))
        return float(nominal) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography

    def _lease_s(self) -> float:
        return self.settings.timeout * (len(self.targets) + 1) + 60.0

    def prune(self, *, force: bool = False) -> int:
        """Delete rows delivered longer than ``keep_delivered`` ago (at most every ten minutes)."""
        now = time.monotonic()
        if not force and self._last_prune is not None and now - self._last_prune < PRUNE_EVERY_S:
            return 0
        self._last_prune = now
        return self.ledger.prune_outbox(older_than_s=self.settings.keep_delivered)

    def run_once(self) -> int:
        """Deliver one batch of due notifications; return how many were fully delivered."""
        self.prune()
        items = self.ledger.claim_outbox(
            limit=self.settings.batch, lease_s=self._lease_s(), max_attempts=self.settings.max_attempts
        )
        if not items:
            return 0
        unreachable: dict[int, str] = {}
        results = [self._deliver(item, unreachable) for item in items]
        self.ledger.record_deliveries(results)
        return sum(1 for r in results if r.delivered)

    def _deliver(self, item: OutboxItem, unreachable: dict[int, str]) -> DeliveryResult:
        done = set(item.delivered_targets)
        errors: list[str] = []
        for target in self.targets:
            if target.index in done:
                continue
            if target.index in unreachable:
                errors.append(f"{target.label}: not tried, unreachable earlier in this batch")
                continue
            delivery_id = f"{item.id}-{target.index}"
            payload = {**item.payload, "delivery_id": delivery_id}
            try:
                self._send(target, item, payload)
            except DeliveryError as exc:
                errors.append(f"{target.label}: {exc}")
                if exc.unreachable:
                    unreachable[target.index] = str(exc)
                continue
            except Exception as exc:
                errors.append(f"{target.label}: {exc.__class__.__name__}: {exc}")
                continue
            done.add(target.index)
        tries = item.attempts + 1
        delivered = not errors
        gave_up = not delivered and tries >= self.settings.max_attempts
        error = "; ".join(errors) if errors else None
        if error:
            level = logging.ERROR if gave_up else logging.WARNING
            log.log(level, "notification %s (run %s) try %d failed%s: %s", item.id, item.run_id, tries,
                    ", giving up" if gave_up else "", error)  # fmt: skip
        return DeliveryResult(
            outbox_id=item.id,
            delivered_targets=frozenset(done),
            delivered=delivered,
            error=error,
            retry_in_s=0.0 if delivered else self.backoff(tries),
            gave_up=gave_up,
        )

    def _send(self, target: _Target, item: OutboxItem, payload: dict[str, Any]) -> None:
        if target.load_error is not None:
            raise DeliveryError(target.load_error)
        if target.hook is not None:
            try:
                target.hook(dict(payload))
            except Exception as exc:
                log.exception("notification hook %s failed on %s", target.label, payload["delivery_id"])
                raise DeliveryError(f"{exc.__class__.__name__}: {exc}") from exc
            return
        assert target.webhook is not None and target.secret is not None
        body = body_bytes(payload)
        timestamp = str(int(time.time()))
        request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked in config (http/https)
            target.webhook.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "X-HPCC-Event": item.kind,
                "X-HPCC-Delivery": str(payload["delivery_id"]),
                "X-HPCC-Timestamp": timestamp,
                "X-HPCC-Signature": sign(target.secret, timestamp, body),
            },
        )
        try:
            with self._opener.open(request, timeout=self.settings.timeout) as response:
                response.read(65536)
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DeliveryError(f"unreachable: {reason}", unreachable=True) from None
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status}")
