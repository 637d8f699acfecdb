"""The listeners Postroom has, which daemon runs each, and what the terminal is told of them.

A table, read by `postroom serve` (to know which daemon processes to start and to print
what listens where) and by each daemon process (to know what to start). Importing it
loads no daemon: the supervisor stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from conf import Config
from conf.values import ListenAddress
from postroom import __version__

LISTENING = "listening"


class ServeError(Exception):
    """A daemon could not start (a port in use, say); str() is one line for the sysadmin."""


@dataclass(frozen=True)
class Service:
    name: str
    label: str
    daemon: str  # the process that runs it: mtad, imapd or pop3d
    listeners: Callable[[Config], tuple[ListenAddress, ...]]
    implicit_tls: bool
    built: bool  # False while the daemon does not have it yet
    issue: int | None  # where its work is tracked while it is not built


SERVICES: tuple[Service, ...] = (
    Service("smtp", "SMTP (MX)", "mtad", lambda c: c.smtp.listen, False, True, 4),
    Service("submission", "submission (STARTTLS)", "mtad", lambda c: c.submission.listen, False, True, 13),
    Service("submissions", "submissions (TLS)", "mtad", lambda c: c.submission.listen_tls, True, True, 13),
    Service("imap", "IMAP (STARTTLS)", "imapd", lambda c: c.imap.listen, False, True, 5),
    Service("imaps", "IMAPS", "imapd", lambda c: c.imap.listen_tls, True, True, 5),
    Service("pop3", "POP3 (STLS)", "pop3d", lambda c: c.pop3.listen, False, True, 6),
    Service("pop3s", "POP3S", "pop3d", lambda c: c.pop3.listen_tls, True, True, 6),
)

DAEMONS = ("mtad", "imapd", "pop3d")


def status(service: Service, config: Config) -> str:
    """LISTENING for a service its daemon starts, else why not."""
    if not service.listeners(config):
        return "off (no listen address)"
    if service.implicit_tls and not config.tls.enabled:
        return "off (needs [tls] cert and key)"
    if not service.built:
        return f"not yet available (issue {service.issue})" if service.issue else "not yet available"
    return LISTENING


def of_daemon(daemon: str | None) -> tuple[Service, ...]:
    """The services of one daemon, or every service for None."""
    return tuple(s for s in SERVICES if daemon is None or s.daemon == daemon)


def daemons_to_start(config: Config) -> list[str]:
    """The daemons with at least one service to start, in start order."""
    return [d for d in DAEMONS if any(status(s, config) == LISTENING for s in of_daemon(d))]


def table(config: Config, services: tuple[Service, ...], log) -> str:
    """What listens where, as one block for the person at the terminal; each line is
    logged too (for the journal): listeners at info, the rest at debug."""
    lines = [f"Postroom {__version__} on {config.server.hostname}, data in {config.server.data_dir}"]
    for service in services:
        where = ", ".join(map(str, service.listeners(config))) or "-"
        state = status(service, config)
        lines.append(f"  {service.label:<24} {where:<28} {state}")
        (log.info if state == LISTENING else log.debug)("service", service=service.name, listen=where, status=state)
    if not any(status(s, config) == LISTENING for s in services):
        lines.append("No daemon is available yet: Postroom waits for a signal (Ctrl-C stops it).")
    return "\n".join(lines)
