"""SMTP replies with RFC 3463 enhanced status codes, named once and used everywhere.

A Reply is what a session answers: the session core (mtad/session.py) writes every one,
the adapter (mtad/inbound.py) chooses those that answer the core's questions. Texts never
contain exception messages or paths.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # "" only for the greeting and replies that precede EHLO semantics
    text: str

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def lines(self, extra: tuple[str, ...] = ()) -> bytes:
        """The wire form; `extra` lines make it multi-line (EHLO keywords)."""
        texts = [self.text, *extra]
        out = []
        for i, text in enumerate(texts):
            separator = "-" if i < len(texts) - 1 else " "
            prefix = f"{self.enhanced} " if self.enhanced and i == 0 and not extra else ""
            out.append(f"{self.code}{separator}{prefix}{text}\r\n")
        return "".join(out).encode("utf-8")


# RFC 5321 §4.2.2 codes, with RFC 3463 / RFC 5248 enhanced codes.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
CONTROL_CHARACTER = Reply(501, "5.5.2", "Syntax error: control character in command")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
SENDER_ALREADY_GIVEN = Reply(503, "5.5.1", "Sender already given")
NEED_MAIL_BEFORE_RCPT = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_MAIL_BEFORE_DATA = Reply(503, "5.5.1", "Need MAIL before DATA")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA after BDAT")
NEED_MAIL_BEFORE_BDAT = Reply(503, "5.5.1", "Need MAIL and RCPT before BDAT")
STARTTLS_IN_TRANSACTION = Reply(503, "5.5.1", "STARTTLS not allowed during a mail transaction")
PARAM_NOT_IMPLEMENTED = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
ALREADY_TLS = Reply(503, "5.5.1", "Already in TLS")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
# A message whose checks had not ended when a stop's grace ran out: not stored.
CHECKS_STOPPED = Reply(451, "4.3.2", "Service shutting down, message not accepted; try again later")

BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
OVER_QUOTA = Reply(452, "4.2.2", "Mailbox full")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header exceeds fixed limit")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
MAIL_LOOP = Reply(554, "5.4.6", "Mail loop detected: too many Received headers")
BARE_LF = Reply(550, "5.6.11", "Bare LF or CR in message: use CRLF line endings")
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")
# A cluster's: the mailbox's node did not take its copy (mtad/lmtp_client.py), or its shard is
# between owners (a node failing over, for at most the lease's TTL and a few seconds).
HAND_OFF_FAILED = Reply(451, "4.4.0", "The mailbox's node did not answer, try again later")
NO_OWNER_NOW = Reply(451, "4.4.0", "The mailbox is moving between nodes, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
UTF8_NOT_ALLOWED = Reply(553, "5.6.7", "Non-ASCII address without SMTPUTF8")

# AUTH (RFC 4954 §4, §6) and submission (RFC 6409).
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Authentication not enabled")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
SASL_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: address not owned by the authenticated user")
NO_FROM = Reply(550, "5.6.0", "Message has no valid From: header")
