"""structlog, configured once per process.

Standard-library loggers (temporalio, uvicorn, SQLAlchemy, alembic) are routed
through the same processor chain, so one process writes one format: JSON lines
in production or when piped, a readable console on a terminal.

Every line carries the correlation fields that apply (``request_id``, ``client_id``,
``idempotency_key`` in the API; ``workflow_id``, ``run_id``, ``activity``, ``attempt``
in the worker), and a last processor masks secrets wherever they slipped in.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
import temporalio.activity
import temporalio.workflow
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

_configured = False

REDACTED = "[redacted]"

# Values that are secrets whatever field they sit in. Prefixes stay, so a reader
# still sees what kind of thing was there.
_SECRET_VALUES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+"), r"\1 " + REDACTED),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), "whsec_" + REDACTED),
    # API keys (admin/credentials.py) and provider secret keys share the sk_ prefix.
    (re.compile(r"\bsk_[A-Za-z0-9_\-]+"), "sk_" + REDACTED),
    (re.compile(r"\bpm_[A-Za-z0-9_]+"), "pm_" + REDACTED),
]
# Fields whose whole value is a secret, by name (also inside nested dicts: headers).
_SECRET_FIELDS = re.compile(
    r"(?i)(authorization|api_?key|secret|password|passwd|token|cookie|payment_method|"
    r"card_number|payload_keys?)"
)
_NOT_SECRET_FIELDS = {"event", "level", "logger", "timestamp", "idempotency_key"}


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        for pattern, replacement in _SECRET_VALUES:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, Mapping):
        return {k: _redact_field(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def _redact_field(name: str, value: Any) -> Any:
    if value is None or name in _NOT_SECRET_FIELDS:
        return redact_value(value)
    if _SECRET_FIELDS.search(name):
        return REDACTED
    return redact_value(value)


def redact_secrets(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Mask API keys, bearer credentials, card tokens, webhook and provider secrets."""
    return {name: _redact_field(name, value) for name, value in event_dict.items()}


def _flatten_temporal_context(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """The SDK's workflow/activity loggers put their context in a nested ``extra`` dict;
    lift the correlation fields to the same names the rest of our lines use."""
    workflow = event_dict.pop("temporal_workflow", None)
    if isinstance(workflow, Mapping):
        event_dict.setdefault("workflow_id", workflow.get("workflow_id"))
        event_dict.setdefault("run_id", workflow.get("run_id"))
        event_dict.setdefault("workflow_type", workflow.get("workflow_type"))
    act = event_dict.pop("temporal_activity", None)
    if isinstance(act, Mapping):
        event_dict.setdefault("workflow_id", act.get("workflow_id"))
        event_dict.setdefault("run_id", act.get("workflow_run_id"))
        event_dict.setdefault("activity", act.get("activity_type"))
        event_dict.setdefault("attempt", act.get("attempt"))
    for name in [k for k in event_dict if k.startswith("__")]:
        del event_dict[name]
    return event_dict


class _DropSdkActivityFailureLines(logging.Filter):
    """The SDK logs every failed attempt with a traceback; our interceptor already writes
    one line per attempt with its outcome, so that second line only doubles the volume."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "__temporal_error_identifier", None) != "ActivityFailure"


def configure_logging(
    level: str = "INFO",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    environment: str = "development",
) -> None:
    global _configured
    if _configured:
        return
    _configured = True

    use_console = fmt == "console" or (
        fmt == "auto" and environment != "production" and sys.stderr.isatty()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        _add_logger_name_unless_canonical,
        _timestamp_ms,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        _flatten_temporal_context,
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer(separators=(",", ":"))
    )

    structlog.configure(
        processors=[
            shared[0],
            # structlog's own lines only: a stdlib record cannot be dropped by a formatter.
            fold_into_attempt_line,
            *shared[1:],
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Tracebacks become text first, so the redaction sees them too.
                structlog.processors.format_exc_info,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request access lines come from our own middleware; uvicorn's would double them,
    # and httpx would add one line per provider or webhook call.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("temporalio.activity").addFilter(_DropSdkActivityFailureLines())
    # Their context arrives as fields (flattened above), not as a dict appended to the text.
    temporalio.workflow.logger.workflow_info_on_message = False
    temporalio.activity.logger.activity_info_on_message = False


# The one line per HTTP request and per activity attempt: their event names say which
# process and part wrote them, so they go without the logger's name (20 bytes of the
# ≈ 2 KB a payment may write in the storm benchmark).
CANONICAL_EVENTS = frozenset({"http.request", "activity.attempt"})


def _add_logger_name_unless_canonical(
    logger: Any, name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    if event_dict.get("event") in CANONICAL_EVENTS:
        return event_dict
    return structlog.stdlib.add_logger_name(logger, name, event_dict)


def _timestamp_ms(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """UTC, to the millisecond: durations are measured on their own, so microseconds
    only cost bytes."""
    event_dict["timestamp"] = datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    return event_dict


def _drop_color_message(
    _logger: object, _name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    # uvicorn duplicates its message with ANSI codes in an extra field.
    event_dict.pop("color_message", None)
    return event_dict


# -- lines that repeat under load ----------------------------------------------------


class LineSampler:
    """Lets ``lines_per_second`` lines through per one-second window and counts the
    rest by kind, for one summary line per window: for lines that say the same thing
    thousands of times under load (requests turned away, the SDK's slow-task warnings),
    where the count is the information."""

    def __init__(self, lines_per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._budget = lines_per_second
        self._clock = clock
        self._window_started = clock()
        self._logged = 0
        self._suppressed: Counter[str] = Counter()  # in the current window
        self._ended: Counter[str] = Counter()  # in windows that ended, not yet reported

    def admit(self, kind: str) -> bool:
        """True: write this line. False: it was counted instead."""
        self._roll()
        if self._logged < self._budget:
            self._logged += 1
            return True
        self._suppressed[kind] += 1
        return False

    def take_summary(self, *, force: bool = False) -> dict[str, int] | None:
        """What was counted in the windows that have ended (with ``force``, at
        shutdown, the current one too), once; None when nothing was."""
        self._roll()
        if force:
            self._ended.update(self._suppressed)
            self._suppressed.clear()
        if not self._ended:
            return None
        summary = dict(self._ended)
        self._ended.clear()
        return summary

    def _roll(self) -> None:
        now = self._clock()
        if now - self._window_started >= 1.0:
            self._window_started = now
            self._logged = 0
            self._ended.update(self._suppressed)
            self._suppressed.clear()


# -- the API: fields learned while a request is handled --------------------------------

# What the canonical request line should carry; filled in by whoever learns it
# (authentication knows the client). A dict shared with the handler's task, because
# fields bound there do not flow back to the middleware's context.
_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def usable_request_id(offered: str | None) -> str | None:
    """A caller's X-Request-Id, if it is safe to echo and to log."""
    return offered if offered and _REQUEST_ID.fullmatch(offered) else None


def start_request_context(**fields: Any) -> dict[str, Any]:
    """Begin a request: fresh context with these fields; returns the shared field dict."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**fields)
    shared = dict(fields)
    _request_fields.set(shared)
    return shared


def bind_request_fields(**fields: Any) -> None:
    """Add correlation fields to this request's lines, its canonical line included."""
    structlog.contextvars.bind_contextvars(**fields)
    shared = _request_fields.get()
    if shared is not None:
        shared.update(fields)


# -- the worker: one canonical line per activity attempt ------------------------------

activity_log = structlog.get_logger("activity")

# While an attempt runs, the INFO events its activity logs are gathered here and written
# on the attempt's canonical line: one line per attempt, however chatty the activity.
_attempt_fields: ContextVar[dict[str, Any] | None] = ContextVar("attempt_fields", default=None)
_CANONICAL = "activity.attempt"
_MAX_FOLDED_EVENTS = 20  # a chatty loop must not grow one line without bound


def fold_into_attempt_line(
    _logger: object, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    collected = _attempt_fields.get()
    """Inside an activity attempt, an INFO event becomes fields of the attempt's line."""
    if collected is None or method_name != "info" or event_dict.get("event") == _CANONICAL:
        return event_dict
    bound = structlog.contextvars.get_contextvars()
    events = collected.setdefault("events", [])
    if len(events) < _MAX_FOLDED_EVENTS:
        events.append(event_dict.get("event"))
    for name, value in event_dict.items():
        if name != "event" and name not in bound:
            collected.setdefault(name, value)
    raise structlog.DropEvent


def add_to_attempt_line(**fields: Any) -> None:
    """Fields for the running activity attempt's canonical line: what the attempt
    produced (a charge id, the recorded status). Unlike an INFO event, no event name
    is added: the line's activity and outcome already say what happened. Outside an
    attempt (an activity called directly, without the worker's interceptor) nothing
    is written."""
    collected = _attempt_fields.get()
    if collected is not None:
        for name, value in fields.items():
            collected.setdefault(name, value)


class ActivityLoggingInterceptor(Interceptor):
    """Binds workflow id, run id, activity and attempt for every line an activity writes,
    and writes one ``activity.attempt`` line per attempt with its outcome and duration.

    Local activities (open_payment, charge_payment, record_outcome) pass through it as
    regular ones do (``activity.info().is_local`` tells them apart); the charge's
    attempts are separate local activities of one attempt each, so ``attempt`` is 1 and
    the workflow's current details carry its own attempt count."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityLogging(next)


class _ActivityLogging(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        started = time.perf_counter()
        collected: dict[str, Any] = {}
        token = _attempt_fields.set(collected)
        with structlog.contextvars.bound_contextvars(
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
            activity=info.activity_type,
            attempt=info.attempt,
        ):
            try:
                result = await self.next.execute_activity(input)
            except ApplicationError as err:
                benign = err.category == ApplicationErrorCategory.BENIGN
                _attempt_line(
                    logging.INFO if benign else logging.WARNING,
                    started,
                    collected,
                    outcome="failed",
                    error_type=err.type,
                    error=err.message,
                    retryable=not err.non_retryable,
                )
                raise
            except BaseException as err:
                if activity.is_cancelled():
                    _attempt_line(logging.INFO, started, collected, outcome="cancelled")
                else:
                    # Not translated at the activity's edge: a bug or an infrastructure
                    # failure that will retry; the traceback is worth its bytes.
                    _attempt_line(
                        logging.WARNING,
                        started,
                        collected,
                        outcome="failed",
                        error_type=type(err).__name__,
                        retryable=True,
                        exc_info=err,
                    )
                raise
            finally:
                _attempt_fields.reset(token)
            _attempt_line(logging.INFO, started, collected, outcome="completed")
            return result


def _attempt_line(level: int, started: float, collected: dict[str, Any], **fields: Any) -> None:
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    activity_log.log(level, _CANONICAL, **{**collected, **fields, "duration_ms": duration_ms})
