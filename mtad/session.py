"""The SMTP server session as a sans-IO state machine (RFC 5321, 3030 CHUNKING, 3207
STARTTLS, 2920 PIPELINING, 6531 SMTPUTF8, 1870 SIZE, 2034 ENHANCEDSTATUSCODES, 4954 AUTH,
3461 DSN).

Bytes go in (`receive`), events come out (`next_event`, mtad/events.py), and replies go out
as bytes (`data_to_send`). The session owns syntax, sequence, limits and framing; every
decision about people and mail (who may send, who exists here, whether the message is
stored) is a question event (Hello, Auth, MailFrom, RcptTo, DataEnd) that the adapter answers with
`answer(event, reply)`. While a question is open the session reads no further input, so
pipelined commands are answered in order.

The pieces: mtad/states.py says which commands each state takes, mtad/paths.py reads the
MAIL and RCPT arguments (and the DSN parameters), mtad/readers.py reads DATA and BDAT,
mtad/sasl.py runs AUTH's SASL exchange; this module reads command lines, runs the commands
and keeps the transaction.

AUTH (RFC 4954), with SessionConfig.auth (submission): offered in EHLO only once the session
is TLS (or with `plaintext_auth`, a loopback test setting); before that AUTH is 538 5.7.11.
MAIL needs a successful AUTH first (530 5.7.0). AUTH after a successful one, or inside a
transaction, is 503 5.5.1. A failed AUTH counts against the error budget.

Framing that matters for security (the message's own in mtad/readers.py):
- After STARTTLS, whatever the client pipelined behind it is discarded (CVE-2011-0411) and
  the session starts over, as RFC 3207 §4.2 requires.
- A command line ends at LF (with the CR before it, if any). A control character left in
  it (C0 including a bare CR and NUL, DEL; in UTF-8 the C1 controls and U+2028/U+2029) is
  refused 501 5.5.2, whatever the command: the EHLO name and the paths go into headers.
- Command lines over MAX_LINE octets are refused 500 5.5.2 and skipped whole; after
  `max_errors` refused commands the session says 421 and closes.
- A message over `max_message_size` is read to its end, discarded, and refused 552 5.3.4;
  the session stays usable.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mtad import replies
from mtad.events import (
    NEED_DATA,
    PAUSED,
    Auth,
    Close,
    DataEnd,
    Hello,
    MailDSN,
    MailFrom,
    Question,
    RcptDSN,
    RcptTo,
    StartTLS,
)
from mtad.paths import is_number, parse_envid, parse_notify, parse_orcpt, parse_path_argument, parse_ret
from mtad.readers import BdatReader, DataReader, MessageCheck
from mtad.replies import Reply
from mtad.sasl import MECHANISMS, Challenge, Credentials, Exchange
from mtad.states import ALLOWED, RECEIVING, State

MAX_LINE = 512  # RFC 5321 §4.5.3.1.4, including CRLF
# A SASL response line (after a 334) may be longer than a command: RFC 4954 §4 has servers
# take at least 12288 octets.
MAX_SASL_LINE = 12288


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    max_message_size: int
    max_recipients: int
    tls_available: bool
    is_tls: bool = False  # implicit TLS (port 465) or after STARTTLS
    max_errors: int = 10
    smtputf8: bool = True
    chunking: bool = True
    # Submission (RFC 6409, 4954): AUTH offered once TLS is on, and required before MAIL.
    auth: bool = False
    plaintext_auth: bool = False  # offer AUTH without TLS too (loopback tests only)
    dsn: bool = False  # RFC 3461: RET, ENVID, NOTIFY, ORCPT taken and offered
    # RFC 2033 LMTP (the cluster's hand-off to a shard's owner): LHLO in place of EHLO and
    # HELO, which are unknown commands then; after DATA, one reply per accepted recipient,
    # in RCPT order; no CHUNKING (BDAT's per-recipient replies are not worth having here).
    lmtp: bool = False
    greeting_note: str = ""  # after the greeting's name: a cluster LMTP listener's nonce (wire/node_proof.py)


@dataclass
class _Transaction:
    """One mail transaction: from MAIL to the answer to its message (or RSET, EHLO)."""
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    smtputf8: bool = False
    message: MessageCheck | None = None  # from DATA or the first BDAT chunk taken
    bdat: bool = False  # its message comes in BDAT chunks: DATA may not follow


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # C0 controls (a bare CR and a NUL among them) and DEL
# Beyond ASCII: the C1 controls (U+0080-U+009F) and the line and paragraph separators,
# which str.splitlines() takes for line ends, as it does U+0085.
# And the invisible format characters (U+200B zero-width space, U+202E right-to-left
# override...): in a name or an address they only ever serve to mislead the reader.
_UNICODE_BREAKS = frozenset({"Cc", "Zl", "Zp", "Cf"})


class Session:
    def __init__(self, config: SessionConfig):
        self.config = config
        self._in = bytearray()
        self._scanned = 0  # no LF in _in[:_scanned] (a command line being read)
        self._out = bytearray()
        self._events: deque = deque()
        self._state = State.CONNECTED
        # The question (or StartTLS) the adapter has yet to deal with; no input is read
        # while one is open.
        self._open: Question | StartTLS | None = None
        self._helo: str | None = None
        self._extended = False
        self._tls = config.is_tls
        self._errors = 0
        self._txn = _Transaction()
        self._reader: DataReader | BdatReader | None = None  # in State.DATA and State.BDAT
        self._sasl: Exchange | None = None  # in State.AUTH
        self._user: str | None = None  # the authcid of a successful AUTH
        self._skip_line = False  # the rest of an over-long command line is being dropped
        note = f" {config.greeting_note}" if config.greeting_note else ""
        self._reply(Reply(220, "", f"{config.hostname} {'LMTP' if config.lmtp else 'ESMTP'} Postroom{note}"))

    # -- the adapter's side ---------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self._state is not State.CLOSED:
            self._in += data

    def buffered(self) -> int:
        """Bytes received and not yet consumed. Outside a message at most MAX_LINE wait
        (a partial command line) once next_event() says NEED_DATA; inside DATA at most
        PARTIAL_LINE; inside a BDAT chunk none. What arrives while the session is PAUSED
        waits here: the adapter stops reading then."""
        return len(self._in)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def receiving(self) -> bool:
        """Inside a message's data (DATA or BDAT chunks): its own timeout applies."""
        return self._state in RECEIVING

    @property
    def helo_name(self) -> str | None:
        return self._helo

    @property
    def authenticated(self) -> str | None:
        """The user name of the AUTH the adapter accepted, or None."""
        return self._user

    def next_event(self):
        """The next event (mtad/events.py), NEED_DATA, or PAUSED while a question is open."""
        while True:
            if self._events:
                return self._events.popleft()
            if self._open is not None:
                return PAUSED
            if self._state is State.CLOSED:
                return NEED_DATA
            if not self._step():
                return NEED_DATA

    def answer(self, event: Question, reply: Reply | tuple[Reply, ...]) -> None:
        """The adapter's decision on the open question `event` (Hello, Auth, MailFrom, RcptTo
        or DataEnd), which the session then says on the wire. In LMTP, DataEnd's answer may
        be one reply per accepted recipient, in RCPT order (one reply alone: for each)."""
        if self._open is None or event is not self._open or isinstance(event, StartTLS):
            raise RuntimeError(f"answer() to {event!r}, which is not the open question")
        self._open = None
        if isinstance(event, Hello):
            if reply.is_error:
                self._reply(reply)
                return
            self._helo = event.name
            self._extended = event.extended
            self._txn = _Transaction()
            self._state = State.READY
            if self._extended:
                self._out += Reply(250, "", f"{self.config.hostname}").lines(self._keywords())
            else:
                self._reply(Reply(250, "", f"{self.config.hostname}"))
        elif isinstance(event, Auth):
            if reply.is_error:
                self._refuse(reply)
            else:
                self._user = event.authcid
                self._reply(reply)
        elif isinstance(event, MailFrom):
            if not reply.is_error:
                self._txn.sender = event.address
                self._txn.smtputf8 = event.smtputf8
            self._reply(reply)
        elif isinstance(event, RcptTo):
            if not reply.is_error:
                self._txn.recipients.append(event.address)
            self._reply(reply)
        elif isinstance(event, DataEnd):
            if self.config.lmtp:
                each = reply if isinstance(reply, tuple) else (reply,) * len(self._txn.recipients)
                if len(each) != len(self._txn.recipients):
                    raise RuntimeError(f"{len(each)} replies for {len(self._txn.recipients)} recipients")
                for one in each:
                    self._reply(one)
            else:
                self._reply(reply)
            self._txn = _Transaction()
            self._state = State.READY

    def tls_established(self) -> None:
        """The transport is now TLS: forget everything said before (RFC 3207 §4.2)."""
        self._in.clear()  # whatever was pipelined behind STARTTLS is never executed
        self._scanned = 0
        self._open = None
        self._tls = True
        self._user = None
        self._helo = None
        self._extended = False
        self._txn = _Transaction()
        self._state = State.CONNECTED

    def close(self, reply: Reply) -> None:
        """Say `reply` (421 timeout, shutdown) and close. Nothing more is read."""
        self._reply(reply)
        self._state = State.CLOSED
        self._in.clear()
        self._events.append(Close())

    # -- the machine --------------------------------------------------------------------

    def _step(self) -> bool:
        """Consume some input; False when nothing more can be done with what is buffered."""
        if self._state is State.DATA or self._state is State.BDAT:
            return self._read_message()
        # RFC 4954 §4: an AUTH command's initial response may be as long as any SASL
        # response (a long password in PLAIN is over 512 octets).
        long_line = self._state is State.AUTH or (self.config.auth and self._in[:5].upper() == b"AUTH ")
        limit = MAX_SASL_LINE if long_line else MAX_LINE
        end = self._in.find(b"\n", self._scanned)
        if end < 0:
            if len(self._in) > limit:
                del self._in[:]  # keep skipping until the end of this line
                self._scanned = 0
                if not self._skip_line:
                    self._skip_line = True
                    self._line_too_long()
                return True
            self._scanned = len(self._in)  # a line fed byte by byte is scanned once
            return False
        line = bytes(self._in[:end + 1])
        del self._in[:end + 1]
        self._scanned = 0
        if self._skip_line:
            self._skip_line = False
            return True
        if len(line) > limit:
            self._line_too_long()
            return True
        # The line ends at its LF; a CR just before it is part of the line end, and any
        # other CR in it is a bare CR, refused with the other control characters.
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if self._state is State.AUTH:
            self._sasl_response(line)
        else:
            self._command(line)
        return True

    def _line_too_long(self) -> None:
        if self._state is State.AUTH:  # the exchange ends with it (RFC 4954 §6, RFC 3463 5.5.6)
            self._sasl, self._state = None, State.READY
            self._refuse(replies.SASL_LINE_TOO_LONG)
        else:
            self._refuse(replies.LINE_TOO_LONG)

    def _command(self, line: bytes) -> None:
        # RFC 5321 §4.1.1.1, §4.1.2: no control character belongs in a command: not in a
        # Domain or address literal, an atom, a quoted string (qtextSMTP, quoted-pairSMTP)
        # nor in parameters. Refused first, so none reaches the Received: and Return-Path:
        # headers built from the EHLO name and the paths (a bare CR became a header line).
        if _CONTROL.search(line):
            self._refuse(replies.CONTROL_CHARACTER)
            return
        verb, _, rest = line.partition(b" ")
        try:
            name = verb.decode("ascii").upper()
            arg = rest.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(replies.SYNTAX_ERROR)
            return
        if not arg.isascii() and any(unicodedata.category(c) in _UNICODE_BREAKS for c in arg):
            self._refuse(replies.CONTROL_CHARACTER)  # C1 controls, U+2028, U+2029 (SMTPUTF8, RFC 6531)
            return
        arg = arg.strip(" ")
        if self.config.lmtp:
            # RFC 2033 §4.1: LHLO is EHLO for LMTP; an LMTP server takes neither EHLO nor HELO.
            name = {"LHLO": "EHLO", "EHLO": "", "HELO": ""}.get(name, name)
        run = COMMANDS.get(name)
        if run is None:
            self._refuse(replies.UNKNOWN_COMMAND)
            return
        if name not in ALLOWED[self._state]:
            self._refuse(replies.BAD_SEQUENCE)
            return
        run(self, arg)

    def _reply(self, reply: Reply) -> None:
        self._out += reply.lines()

    def _refuse(self, reply: Reply) -> None:
        """A refused command: counts against the session's error budget."""
        self._errors += 1
        if self._errors >= self.config.max_errors:
            self.close(replies.TOO_MANY_ERRORS)
        else:
            self._reply(reply)

    def _ask(self, question: Question) -> None:
        self._open = question
        self._events.append(question)

    def _keywords(self) -> tuple[str, ...]:
        words = ["PIPELINING", f"SIZE {self.config.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.config.smtputf8:
            words.append("SMTPUTF8")
        if self.config.chunking and not self.config.lmtp:
            words.append("CHUNKING")
        if self.config.tls_available and not self._tls:
            words.append("STARTTLS")
        if self.config.dsn:
            words.append("DSN")
        if self.config.lmtp:
            words += ["XSENT", "XJUNK"]  # a cluster's hand-off: mtad/lmtp.py
        if self._auth_offered():
            words.append("AUTH " + " ".join(MECHANISMS))
        return tuple(words)

    def _auth_offered(self) -> bool:
        return self.config.auth and (self._tls or self.config.plaintext_auth)

    # -- commands ---------------------------------------------------------------------------

    def _ehlo(self, arg: str, extended: bool = True) -> None:
        if not arg or " " in arg:
            self._refuse(replies.SYNTAX_ERROR)
            return
        self._ask(Hello(arg, extended))

    def _helo_command(self, arg: str) -> None:
        self._ehlo(arg, extended=False)

    def _mail(self, arg: str) -> None:
        if self._txn.sender is not None:
            self._refuse(replies.SENDER_ALREADY_GIVEN)
            return
        parsed = parse_path_argument(arg, "FROM:")
        if parsed is None:
            self._refuse(replies.BAD_SENDER_SYNTAX)
            return
        if self.config.auth and self._user is None:
            self._refuse(replies.AUTH_REQUIRED)
            return
        address, params = parsed
        smtputf8 = "SMTPUTF8" in params
        known = {"SIZE", "BODY", "SMTPUTF8"}
        if self.config.dsn:
            known |= {"RET", "ENVID"}
        if self._auth_offered():
            known.add("AUTH")  # RFC 4954 §5: taken, and ignored (we trust no client's word on it)
        if self.config.lmtp:
            known |= {"XSENT", "XJUNK"}
        problem = _unknown_params(params, known)
        if problem:
            self._refuse(problem)
            return
        if smtputf8 and not self.config.smtputf8:
            self._refuse(replies.PARAM_NOT_IMPLEMENTED)
            return
        if not address.isascii() and not smtputf8:
            self._refuse(replies.UTF8_NOT_ALLOWED)
            return
        size = params.get("SIZE")
        if size is not None:
            if not is_number(size):
                self._refuse(replies.SYNTAX_ERROR)
                return
            if int(size) > self.config.max_message_size:
                self._refuse(replies.MESSAGE_TOO_BIG)
                return
        sent = params.get("XSENT")
        if sent is not None and not (is_number(sent) and len(sent) <= 12 and int(sent) <= self.config.max_message_size):
            self._refuse(replies.SYNTAX_ERROR)
            return
        if params.get("XJUNK") is not None:  # a flag, without a value
            self._refuse(replies.SYNTAX_ERROR)
            return
        body = params.get("BODY")
        # BINARYMIME (RFC 3030 §3) is not offered: its bare CRs and LFs are what smuggling and
        # header injection are made of.
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            self._refuse(replies.SYNTAX_ERROR)
            return
        ret = parse_ret(params["RET"]) if "RET" in params else None
        envid = parse_envid(params["ENVID"]) if "ENVID" in params else None
        if ("RET" in params and ret is None) or ("ENVID" in params and envid is None):
            self._refuse(replies.SYNTAX_ERROR)  # RFC 3461 §4.3, §4.4
            return
        self._ask(MailFrom(address, params, MailDSN(ret, envid)))

    def _rcpt(self, arg: str) -> None:
        if self._txn.sender is None:
            self._refuse(replies.NEED_MAIL_BEFORE_RCPT)
            return
        parsed = parse_path_argument(arg, "TO:")
        if parsed is None or not parsed.address:
            self._refuse(replies.BAD_RECIPIENT_SYNTAX)
            return
        address, params = parsed
        problem = _unknown_params(params, {"NOTIFY", "ORCPT"} if self.config.dsn else set())
        if problem:
            self._refuse(problem)
            return
        if not address.isascii() and not self._txn.smtputf8:
            self._refuse(replies.UTF8_NOT_ALLOWED)
            return
        notify = parse_notify(params["NOTIFY"]) if "NOTIFY" in params else ()
        orcpt = parse_orcpt(params["ORCPT"], self._txn.smtputf8) if "ORCPT" in params else None
        if notify is None or ("ORCPT" in params and orcpt is None):
            self._refuse(replies.SYNTAX_ERROR)  # RFC 3461 §4.1, §4.2
            return
        if len(self._txn.recipients) >= self.config.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)  # not the client's error: it retries the rest
            return
        self._ask(RcptTo(address, params, RcptDSN(notify, orcpt)))

    def _data(self, arg: str) -> None:
        if arg:
            self._refuse(replies.SYNTAX_ERROR)
            return
        if self._txn.bdat:
            self._refuse(replies.DATA_AFTER_BDAT)
            return
        if self._txn.sender is None:
            self._refuse(replies.NEED_MAIL_BEFORE_DATA)
            return
        if not self._txn.recipients:
            self._refuse(replies.NO_VALID_RECIPIENTS)
            return
        self._reply(replies.START_DATA)
        self._txn.message = MessageCheck(self.config.max_message_size)
        self._reader = DataReader(self._txn.message)
        self._state = State.DATA

    def _bdat(self, arg: str) -> None:
        parts = arg.split()
        if not self.config.chunking or self.config.lmtp or not 1 <= len(parts) <= 2 or not is_number(parts[0]) or \
                (len(parts) == 2 and parts[1].upper() != "LAST"):
            self._refuse(replies.SYNTAX_ERROR)
            return
        size, last = int(parts[0]), len(parts) == 2
        # RFC 3030 §3: the chunk is read whatever the answer will be.
        self._state = State.BDAT
        if self._txn.sender is None or not self._txn.recipients:
            refusal = replies.NEED_MAIL_BEFORE_BDAT if self._txn.sender is None else replies.NO_VALID_RECIPIENTS
            self._reader = BdatReader(None, size, last, refusal)
            return
        self._txn.bdat = True
        if self._txn.message is None:
            self._txn.message = MessageCheck(self.config.max_message_size)
        self._reader = BdatReader(self._txn.message, size, last, None)

    def _rset(self, arg: str) -> None:
        self._txn = _Transaction()
        if self._state is not State.CONNECTED:
            self._state = State.READY
        self._reply(replies.RESET_OK)

    def _noop(self, arg: str) -> None:
        self._reply(replies.NOOP_OK)

    def _quit(self, arg: str) -> None:
        self.close(replies.BYE)

    def _vrfy(self, arg: str) -> None:
        self._reply(replies.VRFY_CANNOT)  # RFC 5321 §3.5.3: no address harvesting here

    def _starttls(self, arg: str) -> None:
        if arg:
            self._refuse(replies.SYNTAX_ERROR)
        elif self._tls:
            self._refuse(replies.ALREADY_TLS)
        elif not self.config.tls_available:
            self._refuse(replies.TLS_NOT_AVAILABLE)
        elif self._txn.sender is not None:
            self._refuse(replies.STARTTLS_IN_TRANSACTION)
        else:
            self._reply(replies.READY_TLS)
            self._open = StartTLS()
            self._events.append(self._open)

    def _auth(self, arg: str) -> None:
        """AUTH mechanism [initial-response] (RFC 4954 §4)."""
        words = arg.split(" ")
        if not self.config.auth:
            self._refuse(replies.AUTH_NOT_ENABLED)
        elif not self._auth_offered():
            self._refuse(replies.ENCRYPTION_REQUIRED)
        elif self._txn.sender is not None:
            self._refuse(replies.AUTH_IN_TRANSACTION)
        elif self._user is not None:
            self._refuse(replies.ALREADY_AUTHENTICATED)
        elif not arg or len(words) > 2:
            self._refuse(replies.SYNTAX_ERROR)
        elif words[0].upper() not in MECHANISMS:
            self._refuse(replies.UNKNOWN_MECHANISM)
        else:
            self._sasl = Exchange(words[0].upper())
            self._sasl_step(self._sasl.start(words[1] if len(words) == 2 else None))

    def _sasl_response(self, line: bytes) -> None:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            text = "!"  # not base64, whatever it is: refused as such
        self._sasl_step(self._sasl.respond(text))

    def _sasl_step(self, step) -> None:
        if isinstance(step, Challenge):
            self._state = State.AUTH
            self._out += f"334 {step.text}\r\n".encode("ascii")
            return
        mechanism = self._sasl.mechanism
        self._sasl, self._state = None, State.READY
        if isinstance(step, Credentials):
            self._ask(Auth(mechanism, step.authcid, step.password, step.authzid))
        else:
            self._refuse(step.reply)

    # -- message data -------------------------------------------------------------------

    def _read_message(self) -> bool:
        """DATA or a BDAT chunk (mtad/readers.py); at its end, back to commands."""
        reader = self._reader
        progressed = reader.read(self._in, self._events)
        if not reader.done:
            return progressed
        self._reader = None
        self._state = State.READY
        if isinstance(reader, DataReader):
            self._ask_end_of_data(reader.message)
        elif reader.refusal is not None:
            self._refuse(reader.refusal)
        elif reader.last:
            self._ask_end_of_data(reader.message)
        else:
            self._reply(Reply(250, "2.0.0", f"{reader.message.size} octets received"))
        return True

    def _ask_end_of_data(self, message: MessageCheck) -> None:
        self._ask(DataEnd(message.size, message.received, message.refusal()))


def _unknown_params(params: dict[str, str | None], known: set[str]) -> Reply | None:
    return replies.PARAM_NOT_IMPLEMENTED if set(params) - known else None


# The commands, by verb; which of them each state takes is mtad/states.py's table.
COMMANDS: dict[str, Callable[[Session, str], None]] = {
    "EHLO": Session._ehlo, "HELO": Session._helo_command, "MAIL": Session._mail, "RCPT": Session._rcpt,
    "DATA": Session._data, "BDAT": Session._bdat, "RSET": Session._rset, "NOOP": Session._noop,
    "QUIT": Session._quit, "VRFY": Session._vrfy, "STARTTLS": Session._starttls, "AUTH": Session._auth,
}
