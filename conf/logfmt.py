"""One log line per event, in logfmt: `ts=… level=info event=user.added user=alice@example.org`.

Components log through an EventLogger, which carries context fields (the session id `sid`,
the queue id `qid`, the authenticated `user`) so every line of a session can be grepped by
one id. Values are quoted only when they need it. Keys that name secrets are redacted
whatever a caller passes, as a last line of defence: logs never hold a password.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import sys
import time
from typing import Any, TextIO

REDACTED_KEYS = frozenset({"password", "pass", "passwd", "secret", "token", "auth_data"})
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def session_id() -> str:
    """A short random id for one session, shown in its log lines and error replies."""
    return secrets.token_hex(5).upper()


class EventLogger:
    """A named logger with bound context fields; `bind` returns a new one with more."""

    def __init__(self, name: str, **context: Any):
        self._logger = logging.getLogger(name)
        self._context = context

    def bind(self, **context: Any) -> EventLogger:
        child = EventLogger.__new__(EventLogger)
        child._logger, child._context = self._logger, {**self._context, **context}
        return child

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=exc_info)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info, extra={"fields": {**self._context, **fields}})


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        pairs: list[tuple[str, Any]] = [
            ("ts", _timestamp(record.created)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("pid", record.process),
            ("event", record.getMessage()),
        ]
        pairs.extend(getattr(record, "fields", {}).items())
        line = format_pairs(pairs)
        if record.exc_info:
            # The traceback stays on one line so that one event is still one line.
            trace = self.formatException(record.exc_info)
            line += " traceback=" + _quote(trace)
        return line


def format_pairs(pairs: list[tuple[str, Any]]) -> str:
    """`key=value key2="value 2"`: the logfmt of one event, secrets redacted."""
    return " ".join(f"{key}={_value(key, value)}" for key, value in pairs)


def timestamp(created: float) -> str:
    return _timestamp(created)


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    # What a LogRecord gathers that no line of ours shows: the caller's frame (a stack walk),
    # the thread's and the multiprocessing process's names. The logging HOWTO's own
    # "Optimization" switches; at info level mtad logs five lines a message.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def _timestamp(created: float) -> str:
    return _second(int(created)) + f".{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    """The timestamp to the second: made once a second, not once a line (strftime and
    gmtime are a tenth of a line's cost)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# A value logfmt takes as it is: printable ASCII with no space, quote, "=" or backslash (most
# of them: ids, addresses, numbers, reply codes). Anything else goes the slow way.
_PLAIN = re.compile(r'[!#-<>-\[\]-~]+')


def _value(key: str, value: Any) -> str:
    if key.lower() in REDACTED_KEYS:
        return "[redacted]"
    kind = type(value)
    if kind is str:
        text = value
    elif kind is int:
        text = str(value)
    elif value is None:
        return '""'
    elif kind is bool:
        return "true" if value else "false"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = ",".join(map(str, value))
    else:
        text = str(value)
    return text if _PLAIN.fullmatch(text) else _quote(text)


def _quote(text: str) -> str:
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'
