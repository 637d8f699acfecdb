"""The SMTP session's states and which commands each takes, as data (RFC 5321 §4.1.4, §3.3).

CONNECTED: greeted, no EHLO/HELO yet (again so after STARTTLS, RFC 3207 §4.2): a mail
transaction needs a greeting first. READY: greeted; MAIL, RCPT, DATA and BDAT check the
transaction's own order (sender before recipients, recipients before data) themselves, with
replies that say what is missing. DATA and BDAT: message bytes are being read; no command
line is read until the message (or the BDAT chunk) ends. AUTH: an AUTH exchange is under
way (RFC 4954 §4): each line is a SASL response, not a command. CLOSED: nothing more is read.

A verb not in VERBS is answered 500 5.5.1, a known verb its state does not take 503 5.5.1.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    CONNECTED = "connected"
    READY = "ready"
    DATA = "data"
    BDAT = "bdat"
    AUTH = "auth"
    CLOSED = "closed"


# Every command the session implements (RFC 5321 §4.1.1, RFC 3030 BDAT, RFC 3207 STARTTLS,
# RFC 4954 AUTH: after a greeting, as a mail transaction).
VERBS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "STARTTLS",
                   "AUTH"})

_ANY_TIME = frozenset({"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "STARTTLS"})

ALLOWED: dict[State, frozenset[str]] = {
    State.CONNECTED: _ANY_TIME,
    State.READY: VERBS,
    State.DATA: frozenset(),  # message bytes, not commands
    State.BDAT: frozenset(),
    State.AUTH: frozenset(),  # SASL responses, not commands
    State.CLOSED: frozenset(),
}

# The states in which the adapter applies the data timeout (RFC 5321 §4.5.3.2.5), not the
# command one.
RECEIVING = frozenset({State.DATA, State.BDAT})
