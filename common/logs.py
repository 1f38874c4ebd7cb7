"""JSON-lines logging: one object per line, with the structured fields passed as `extra=`."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Any

from opentelemetry import trace

# Fields of the event being handled (entity, MSI, transaction, correlation), added to every
# log line emitted while handling it.
log_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_context", default=None)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def enum_name(enum: Any, value: int) -> str:
    """An enum value's proto name for a log field (logs carry names, never numbers); a value the
    enum does not know (a caller's bad input, logged before validation refuses it) as its
    number, since it has no name."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def bind(**fields: Any) -> None:
    """Adds fields to the current request's log context (creating it if needed)."""
    current = log_context.get()
    if current is None:
        log_context.set(dict(fields))
    else:
        current.update(fields)


_default_factory = logging.getLogRecordFactory()


class _ContextRecord(logging.LogRecord):
    """A record whose request-context fields are read through attribute access (any handler,
    caplog included, sees `record.correlation_id`) but kept out of its __dict__, so a call's
    `extra=` may name a context field (an event's entity_id in a batch's line) without logging's
    "overwrite" KeyError, and wins over it."""

    def __getattr__(self, name: str) -> Any:
        context = self.__dict__.get("_context") or {}
        if name in context:
            return context[name]
        raise AttributeError(name)


def _record_with_context(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _default_factory(*args, **kwargs)
    context = dict(log_context.get() or {})
    # The trace of the work being done (an RPC's server span), beside the correlation id, so a
    # log line leads to its trace and back.
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        context.setdefault("trace_id", format(span.trace_id, "032x"))
        context.setdefault("span_id", format(span.span_id, "016x"))
    if type(record) is logging.LogRecord:
        record.__class__ = _ContextRecord
    record._context = context
    return record


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The request context and trace fields a record was emitted under."""
    found: dict[str, Any] = getattr(record, "_context", {})
    return found


def install_context() -> None:
    """Makes every log record carry the current request's fields, whatever handler emits it
    (idempotent)."""
    if logging.getLogRecordFactory() is not _record_with_context:
        logging.setLogRecordFactory(_record_with_context)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(context_of(record))
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(service: str, level: str = "INFO") -> None:
    install_context()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
