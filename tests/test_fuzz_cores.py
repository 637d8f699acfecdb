"""Property tests of the three sans-IO protocol cores (mtad.session, imapd's framer and
parser, pop3d.core), with hypothesis, and a plain regression test for each defect they
found.

Streams are built from each protocol's grammar (commands and their arguments), then
mutated as an attacker or a broken client would: bytes inserted, deleted and duplicated,
CR, LF, NUL, 8-bit bytes and line-ending tricks injected, literal sizes changed; then fed
whole and cut into random pieces. Whatever comes in:
- nothing escapes but the core's own protocol error (imapd's ParseError);
- the bytes a core keeps stay under its documented bound;
- every reply is well formed (SMTP `ddd` SP/- with an RFC 3463 code of the same class,
  IMAP tagged or untagged with a one-line 7-bit text, POP3 +OK/-ERR, multi-line
  responses whose dot-stuffing undoes to exactly the message);
- the same input whole and in pieces gives the same events and replies;
- nothing is smuggled: an SMTP message ends only at a real CRLF.CRLF (never at \\n.\\n
  and its kin, never a second transaction from a body), and an IMAP literal's bytes are
  never read as a command.

Each test has a fixed budget (SUITE: max_examples, deadline, derandomized, no example
database), so `make test` runs the same examples every time: a fifth of the budget there
(~10 s of CPU in all), the whole of it under `make test-long` (tests/scale.py);
bench/fuzz.py runs the same properties (the `check` and `strategies` of each test) with
as many examples or minutes as it is given.
"""

from __future__ import annotations

import base64
import datetime
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scale
from core_drivers import POP3_PASSWORD, IMAPDriver, POP3Driver, SMTPDriver, cut
from imapd import tokens
from imapd.framer import Close as IMAPClose
from imapd.framer import Continue, Frame, Framer, Reject, read_tag
from imapd.parser import parse_command
from imapd.syntax import ParseError
from mtad.readers import PARTIAL_LINE
from mtad.session import MAX_LINE as SMTP_MAX_LINE
from mtad.session import SessionConfig
from pop3d import core as pop3
from test_pop3_core import stuffed_reference

SUITE = settings(max_examples=200, deadline=datetime.timedelta(seconds=2), derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=False)


def fuzz(max_examples: int, **strategies):
    """A property test with the suite's budget: `max_examples` under `make test-long`, a
    fifth of it in `make test`; its `check` and `strategies` are kept for bench/fuzz.py to
    run longer."""
    def decorate(check):
        examples = scale.count(max(1, max_examples // 5), max_examples)
        test = settings(SUITE, max_examples=examples)(given(**strategies)(check))
        test.check, test.strategies = check, strategies
        return pytest.mark.long(test)
    return decorate


# -- mutation and fragmentation ------------------------------------------------------------------

INJECTED = [b"\r", b"\n", b"\r\n", b"\0", b"\x80", b"\xff", b"\xc3\xa9", b"\x1b", b"\x7f", b" ", b"\t",
            b"\r\n.\r\n", b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r.\r\n", b".\r\n", b"{5}\r\n", b"{0+}\r\n",
            b"{4294967296+}\r\n", b"{99}", b"(", b")", b"[", b"]", b'"', b"\\", b"*", b"%", b"&", b"-"]
_MARKER = re.compile(rb"\{([0-9]+)(\+?)\}")


@st.composite
def mutated(draw, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["insert", "delete", "duplicate", "inject", "inject", "literal"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "inject":
            data[pos:pos] = draw(st.sampled_from(INJECTED))
        else:
            markers = list(_MARKER.finditer(data))
            if markers:
                m = draw(st.sampled_from(markers))
                size = draw(st.sampled_from([0, 1, int(m.group(1)) + 1, max(0, int(m.group(1)) - 1), 70000,
                                             2 ** 31, 10 ** 19]))
                data[m.start(1):m.end(1)] = b"%d" % size
    return bytes(data)


def mutated_segments(segments: st.SearchStrategy) -> st.SearchStrategy:
    return segments.flatmap(lambda segs: st.tuples(*(mutated(seg) for seg in segs)).map(list))


SIZES = st.lists(st.integers(1, 40), min_size=1, max_size=30) | st.just([1])


def fed(driver, segments: list[bytes], sizes: list[int] | None):
    """The driver after `segments`, each whole (sizes None) or cut into pieces."""
    for segment in segments:
        driver.feed([segment] if sizes is None else cut(segment, sizes))
    return driver


# -- SMTP: grammar --------------------------------------------------------------------------------

LABEL = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=10)
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(".".join)
LOCAL = (st.text(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~.", min_size=1, max_size=12)
         | st.text(string.printable.strip() + " ", min_size=0, max_size=10).map(
             lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
         | st.text("jörgåliceé日本", min_size=1, max_size=6))
ADDRESS = st.builds("{}@{}".format, LOCAL, DOMAIN | st.just("example.test"))
PATH = ADDRESS.map("<{}>".format) | st.sampled_from(["<>", "<@relay.example:a@b.example>", "a@b.example", "<a b@c>"]) \
    | st.integers(200, 260).map(lambda n: "<" + "l" * (n - 15) + "@example.test>")  # near MAX_PATH
PARAMS = st.lists(st.sampled_from(["SIZE=100", "SIZE=99999999", "BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8",
                                   "BODY=BINARYMIME", "X-FOO=bar", "SIZE=", "SIZE=12a"]), max_size=3)
BODY_PIECES = [b"\r\n", b"line", b".", b"..", b".x", b"Received: from hop", b"RECEIVED:x", b"Subject: s", b"",
               b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r", b"\n", b"\r\n.\r\n", b"\x00\xff",
               b"MAIL FROM:<evil@evil.example>\r\n", b"RCPT TO:<evil@example.test>\r\n", b"DATA\r\n", b"QUIT\r\n"]
RAW_BODY = st.lists(st.sampled_from(BODY_PIECES) | st.binary(max_size=12), max_size=30).map(b"".join)


def stuffed(raw: bytes) -> tuple[bytes, bytes]:
    """(what a client sends after DATA, the message the server must see): the client's
    dot-stuffing (RFC 5321 §4.5.2), a CRLF if the message lacks one, then the end."""
    message = raw if raw.endswith(b"\r\n") or not raw else raw + b"\r\n"
    wire = (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.", b"\r\n..")
    return wire + b".\r\n", message


def smtp_line(*words: str) -> bytes:
    return (" ".join(w for w in words if w) + "\r\n").encode()


SMTP_COMMAND = st.one_of(
    st.builds(smtp_line, st.sampled_from(["EHLO", "HELO", "ehlo"]), DOMAIN | st.just("[127.0.0.1]")),
    st.builds(lambda path, params: smtp_line("MAIL FROM:" + path, *params), PATH, PARAMS),
    st.builds(lambda path: smtp_line("RCPT TO:" + path), PATH),
    RAW_BODY.map(lambda raw: b"DATA\r\n" + stuffed(raw)[0]),
    st.builds(lambda chunk, last: b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk,
              st.binary(max_size=40) | RAW_BODY, st.booleans()),
    st.sampled_from([b"RSET\r\n", b"NOOP\r\n", b"NOOP x\r\n", b"VRFY alice\r\n", b"QUIT\r\n", b"HELP\r\n",
                     b"DATA\r\n", b"BDAT 3\r\n", b"BDAT x LAST\r\n", b"\r\n", b"MAIL FROM:<a@b.example>\r\n",
                     b"RCPT TO:<alice@example.test>\r\n", b"X" * 600 + b"\r\n", b"NOOP " + b"x" * 505 + b"\r\n",
                     b"NOOP " + b"x" * 506 + b"\r\n"]),
)
SMTP_TRANSACTION = st.builds(
    lambda helo, mail, rcpts, data: helo + mail + b"".join(rcpts) + data,
    st.builds(smtp_line, st.just("EHLO"), DOMAIN),
    st.builds(lambda path, params: smtp_line("MAIL FROM:" + path, *params), ADDRESS.map("<{}>".format), PARAMS),
    st.lists(ADDRESS.map(lambda a: smtp_line(f"RCPT TO:<{a}>")), min_size=1, max_size=3),
    RAW_BODY.map(lambda raw: b"DATA\r\n" + stuffed(raw)[0])
    | st.lists(RAW_BODY, min_size=1, max_size=3).map(
        lambda chunks: b"".join(b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
                                for i, c in enumerate(chunks))),
)
SMTP_SEGMENT = st.lists(SMTP_TRANSACTION | SMTP_COMMAND, min_size=1, max_size=6).map(b"".join)
# A segment ends with STARTTLS, but the last.
SMTP_STREAM = st.lists(SMTP_SEGMENT, min_size=1, max_size=3).map(
    lambda segs: [seg + b"STARTTLS\r\n" for seg in segs[:-1]] + segs[-1:])
SMTP_CONFIG = st.builds(SessionConfig, hostname=st.just("mx.example.test"),
                        max_message_size=st.sampled_from([50, 10_000, 1 << 20]), max_recipients=st.sampled_from([1, 3]),
                        tls_available=st.booleans(), max_errors=st.sampled_from([3, 10, 10_000]),
                        smtputf8=st.booleans(), chunking=st.booleans())


def refuse_nobody(address: str) -> bool:
    return address.startswith("nobody")


def smtp_replies(wire: bytes, hostname: str) -> list[list[str]]:
    """The replies in `wire`, each its lines, checked: a 3-digit code, hyphens on all lines
    but the last, one code per reply, printable ASCII; an RFC 3463 code of the reply's
    class on every reply but the greeting, the EHLO/HELO answer and 354 (RFC 2034 §3)."""
    assert wire.endswith(b"\r\n")
    text = wire.decode("ascii")
    replies, current = [], []
    for line in text[:-2].split("\r\n"):
        assert re.fullmatch(r"[2345][0-5][0-9][ -][\x20-\x7e]*", line), line
        assert not current or line[:3] == current[0][:3], (current, line)
        current.append(line)
        if line[3] == " ":
            replies.append(current)
            current = []
    assert not current, current
    for i, reply in enumerate(replies):
        first = reply[0]
        greeting = i == 0 and first.startswith("220 ")
        hello = first[:3] == "250" and first[4:] == hostname
        if not (greeting or hello or first.startswith("354 ")):
            assert re.match(r"\d{3}[ -]([245])\.\d{1,3}\.\d{1,3} ", first) and first[4] == first[0], reply
    return replies


# -- SMTP: properties -----------------------------------------------------------------------------

@fuzz(700, segments=mutated_segments(SMTP_STREAM), sizes=SIZES, config=SMTP_CONFIG)
def test_smtp_session_takes_any_stream(segments, sizes, config):
    whole = fed(SMTPDriver(config, refuse_nobody), segments, None)
    pieces = fed(SMTPDriver(config, refuse_nobody), segments, sizes)
    for driver in (whole, pieces):
        smtp_replies(bytes(driver.wire), config.hostname)
        assert driver.peaks[False] <= SMTP_MAX_LINE and driver.peaks[True] <= PARTIAL_LINE, driver.peaks
    assert pieces.events == whole.events
    assert pieces.wire == whole.wire


SMUGGLER = st.lists(st.tuples(RAW_BODY, st.booleans()), min_size=1, max_size=4)


@fuzz(500, transactions=SMUGGLER, sizes=SIZES)
def test_smtp_data_ends_only_at_crlf_dot_crlf(transactions, sizes):
    """Messages whose bodies hold \\n.\\n and its kin and whole SMTP commands, sent by a
    client that dot-stuffs (DATA) or in one chunk (BDAT): each is exactly one message, what
    it held, refused when it holds a bare CR or LF; nothing in a body runs as a command."""
    config = SessionConfig("mx.example.test", max_message_size=1 << 20, max_recipients=5, tls_available=False)
    stream = b"EHLO client.example.org\r\n"
    expected = []
    for raw, bdat in transactions:
        wire, message = stuffed(raw)
        stream += b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test>\r\n"
        stream += b"BDAT %d LAST\r\n" % len(raw) + raw if bdat else b"DATA\r\n" + wire
        # BDAT too: a bare CR or LF is refused whichever way the message came.
        bare = bool(re.search(rb"\r(?!\n)|(?<!\r)\n", raw if bdat else message))
        expected.append((raw if bdat else message, bare))
    for split in (None, sizes):
        driver = fed(SMTPDriver(config), [stream + b"QUIT\r\n"], split)
        ends = [event for event in driver.events if event[0] == "end"]
        assert [(end[1], end[3] is not None) for end in ends] == [(len(m), bare) for m, bare in expected]
        assert driver.messages == [m for m, bare in expected if not bare]
        envelopes = [e[:2] for e in driver.events if e[0] in ("mail", "rcpt", "hello")]
        assert envelopes == [("hello", "client.example.org")] \
            + [("mail", "a@b.example"), ("rcpt", "c@example.test")] * len(expected)
        assert driver.closed and driver.events[-1] == ("close",)
        smtp_replies(bytes(driver.wire), config.hostname)


# -- IMAP: grammar --------------------------------------------------------------------------------

class Literal(bytes):
    """An argument sent as a literal; `plus` for {n+} (RFC 7888)."""

    plus = False


def literal(data: bytes, plus: bool) -> Literal:
    lit = Literal(data)
    lit.plus = plus
    return lit


def imap_wire(tag: bytes, *words) -> bytes:
    """`tag word word ...` CRLF, a Literal word as {n}/{n+} CRLF and its bytes."""
    out = tag
    for word in words:
        if isinstance(word, Literal):
            out += b" {%d%s}\r\n" % (len(word), b"+" if word.plus else b"") + word
        elif word:
            out += b" " + word
    return out + b"\r\n"


TAG_CHARS = bytes(sorted(set(range(0x21, 0x7F)) - set(b'(){%*"\\+')))
TAG = st.binary(min_size=1, max_size=5).map(lambda b: bytes(TAG_CHARS[x % len(TAG_CHARS)] for x in b))
ATOM = st.text(string.ascii_letters + string.digits + "._-$\\[]", min_size=1, max_size=10).map(str.encode)
QUOTED = st.binary(max_size=12).map(lambda b: b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
LITERAL = st.builds(literal, st.binary(max_size=20) | st.sampled_from(
    [b"a LOGOUT\r\n", b"b NOOP", b"x {5}\r\n", b"\r\n", b"DONE\r\n", b"c SELECT INBOX\r\n"]), st.booleans())
LONG = st.integers(20, 90).map(lambda n: b"L" * n)  # lines near and over the small limits below
ASTRING = ATOM | QUOTED | LITERAL | LONG
MAILBOX = st.sampled_from([b"INBOX", b"inbox/Sub", b"Sent", b"&AOk-t&AOk-", b"a&-b", b'"with space"', b"&Jjo-",
                           b"&AOk", b"x&-&AOk-"]) | ASTRING
NUMBER = st.sampled_from([b"1", b"2", b"*", b"4294967295", b"0", b"4294967296", b"01"])
SEQUENCE = st.lists(st.builds(lambda a, b, r: a + b":" + b if r else a, NUMBER, NUMBER, st.booleans()),
                    min_size=1, max_size=3).map(b",".join)
FLAG = st.sampled_from([b"\\Seen", b"\\seen", b"\\Deleted", b"\\Flagged", b"$Junk", b"\\Recent", b"\\X", b"kw"])
FLAGS = st.lists(FLAG, max_size=3).map(lambda f: b"(" + b" ".join(f) + b")")
SECTION = st.builds(lambda part, text: b".".join(p for p in (part, text) if p),
                    st.sampled_from([b"", b"1", b"1.2", b"0", b"1.1.1"]),
                    st.sampled_from([b"", b"HEADER", b"TEXT", b"MIME", b"HEADER.FIELDS (From To)",
                                     b"HEADER.FIELDS.NOT (Subject)", b"HEADER.FIELDS ()", b"BOGUS"]))
FETCH_ITEM = st.sampled_from([b"FLAGS", b"UID", b"ENVELOPE", b"BODYSTRUCTURE", b"RFC822.SIZE", b"INTERNALDATE",
                              b"BODY", b"MODSEQ", b"RFC822", b"BOGUS"]) | st.builds(
    lambda peek, section, partial: b"BODY" + peek + b"[" + section + b"]" + partial,
    st.sampled_from([b"", b".PEEK"]), SECTION, st.sampled_from([b"", b"<0.10>", b"<5>", b"<1.0>"]))
FETCH_ITEMS = FETCH_ITEM | st.lists(FETCH_ITEM, max_size=4).map(lambda i: b"(" + b" ".join(i) + b")") | \
    st.sampled_from([b"ALL", b"FAST", b"FULL"])
SEARCH_KEY = st.recursive(
    st.sampled_from([b"ALL", b"SEEN", b"UNSEEN", b"NEW", b"OLD", b"RECENT", b"DELETED", b"LARGER 10", b"BOGUS",
                     b"SINCE 1-Jan-2024", b'BEFORE "5-Feb-2020"', b"UID 1:*", b"1,2", b"MODSEQ 5",
                     b'MODSEQ "/flags/\\\\Seen" all 7', b"KEYWORD $Junk", b"HEADER X-A b"])
    | st.builds(lambda key, value: key + b" " + value, st.sampled_from([b"SUBJECT", b"FROM", b"TEXT", b"BODY"]),
                ATOM | QUOTED),
    lambda keys: st.builds(b"NOT ".__add__, keys) | st.builds(lambda a, b: b"OR " + a + b" " + b, keys, keys)
    | st.lists(keys, min_size=1, max_size=3).map(lambda k: b"(" + b" ".join(k) + b")"),
    max_leaves=8)


def imap_commands(tag: st.SearchStrategy) -> st.SearchStrategy:
    """Whole commands (one each), as wire bytes."""
    def command(names: bytes, *args):
        """`names` is one or several command names, separated by commas."""
        return st.builds(imap_wire, tag, st.sampled_from(names.split(b",")), *args)

    maybe = st.just(b"")
    return st.one_of(
        command(b"CAPABILITY,NOOP,LOGOUT,CHECK,IDLE,NAMESPACE,UNSELECT,EXPUNGE,BOGUS"),
        command(b"LOGIN", ASTRING, ASTRING),
        command(b"AUTHENTICATE", st.sampled_from([b"PLAIN", b"XOAUTH"]), maybe | st.just(b"=") | ATOM),
        command(b"SELECT,EXAMINE", MAILBOX,
                maybe | st.just(b"(CONDSTORE)")),
        command(b"CREATE", MAILBOX, maybe | st.just(b"(USE (\\Sent))")),
        command(b"RENAME", MAILBOX, MAILBOX),
        command(b"DELETE,SUBSCRIBE,GETQUOTAROOT", MAILBOX),
        command(b"LIST", maybe | st.just(b"(SUBSCRIBED)"), MAILBOX, MAILBOX | st.just(b"*") | st.just(b"(% INBOX)"),
                maybe | st.just(b"RETURN (CHILDREN STATUS (MESSAGES UIDNEXT))")),
        command(b"STATUS", MAILBOX, st.sampled_from([b"(MESSAGES)", b"(UIDNEXT UNSEEN SIZE)", b"()", b"(BOGUS)"])),
        command(b"APPEND", MAILBOX, maybe | FLAGS, maybe | st.just(b'"01-Jan-2024 10:00:00 +0100"'), LITERAL),
        command(b"FETCH,UID FETCH", SEQUENCE, FETCH_ITEMS, maybe | st.just(b"(CHANGEDSINCE 5)")),
        command(b"STORE,UID STORE", SEQUENCE, maybe | st.just(b"(UNCHANGEDSINCE 3)"),
                st.sampled_from([b"FLAGS", b"+FLAGS.SILENT", b"-FLAGS", b"BOGUS"]), FLAGS | FLAG),
        command(b"COPY,MOVE,UID COPY,UID MOVE", SEQUENCE, MAILBOX),
        command(b"UID EXPUNGE", SEQUENCE),
        command(b"SEARCH", maybe | st.builds(b"CHARSET ".__add__, st.sampled_from([b"UTF-8", b"US-ASCII", b"KOI8-R"])),
                st.lists(SEARCH_KEY, min_size=1, max_size=3).map(b" ".join)),
        command(b"SEARCH CHARSET", ASTRING, SEARCH_KEY),
        command(b"ENABLE", st.sampled_from([b"CONDSTORE", b"UTF8=ACCEPT", b""])),
        command(b"ID", st.sampled_from([b"NIL", b'("name" "x")', b'("a" NIL "b")', b"()"])),
        command(b"SETQUOTA", ASTRING, st.sampled_from([b"(STORAGE 100)", b"()", b"(STORAGE x)"])),
        st.sampled_from([b"DONE\r\n", b"dGVzdA==\r\n", b"\r\n", b"*\r\n", b"a\r\n", b"+ x\r\n"]),
    )


IMAP_STREAM = st.lists(imap_commands(TAG), min_size=1, max_size=6).map(b"".join)
IMAP_LIMITS = st.sampled_from([
    {"max_line": 65536, "max_literal": lambda name: 65536, "max_command": 262144},
    {"max_line": 80, "max_literal": lambda name: 16, "max_command": 120},
    {"max_line": 30, "max_literal": lambda name: 0 if name == "LOGIN" else 40, "max_command": 60},
])
_ATOM_TEXT = re.compile(r"[A-Z][A-Z0-9-]*")


def check_imap_refusal(tag: str | None, text: str, code: str | None, status: str) -> None:
    """What the session writes as `<tag or *> <status> [<code>] <text>` is one 7-bit line."""
    assert tag is None or read_tag(tag.encode()) == tag
    assert status in ("BAD", "NO")
    assert code is None or _ATOM_TEXT.fullmatch(code), code
    assert re.fullmatch(r"[\x20-\x7e]+", text), text


# -- IMAP: properties -----------------------------------------------------------------------------

@fuzz(1000, stream=IMAP_STREAM.flatmap(mutated), sizes=SIZES, limits=IMAP_LIMITS)
def test_imap_reading_takes_any_stream(stream, sizes, limits):
    whole = fed(IMAPDriver(**limits), [stream], None)
    pieces = fed(IMAPDriver(**limits), [stream], sizes)
    assert pieces.events == whole.events
    largest = max(limits["max_literal"](name) for name in ("", "LOGIN", "APPEND"))
    for driver in (whole, pieces):
        assert driver.peak_buffered <= limits["max_line"] + 1
        assert driver.peak_held <= limits["max_command"] + largest
        for event in driver.events:
            if event[0] in ("reject", "bad"):
                check_imap_refusal(*event[1:])
            elif event[0] == "close":
                assert re.fullmatch(r"[\x20-\x7e]+", event[1])


IMAP_COMMAND_PARTS = st.tuples(TAG, st.lists(st.tuples(st.binary(max_size=15), LITERAL), max_size=3),
                               st.binary(max_size=15))


def command_parts(tag: bytes, middle: list[tuple[bytes, Literal]], last: bytes) -> list[bytes]:
    """A command's parts, line, literal, line, ..., each line but the last ending in the
    marker of the literal after it; no CR or LF in a line, and no line ending in what a
    marker looks like unless it is one."""
    texts = [text for text, _ in middle] + [last]
    parts = []
    for i, text in enumerate(texts):
        line = text.replace(b"\r", b"").replace(b"\n", b"")
        line = (tag + b" X " if i == 0 else b"") + line + (b"." if line.endswith(b"}") else b"")
        if i < len(middle):
            lit = middle[i][1]
            parts += [line + b"{%d%s}" % (len(lit), b"+" if lit.plus else b""), bytes(lit)]
        else:
            parts.append(line)
    return parts


@fuzz(800, commands=st.lists(IMAP_COMMAND_PARTS, min_size=1, max_size=5), sizes=SIZES, limits=IMAP_LIMITS)
def test_imap_literals_are_never_read_as_commands(commands, sizes, limits):
    """A client that waits for the continuation before a {n} literal, as RFC 3501 §7.5
    says: each command gives exactly one Frame holding its lines and literals as sent, or
    one refusal; literal bytes (command lines among them) never start a command."""
    framer = Framer(**limits)

    def send(data: bytes) -> list:
        events = []
        for piece in cut(data, sizes):
            framer.feed(piece)
            while (event := framer.next()) is not None:
                events.append(event)
        return events

    for command in commands:
        parts = command_parts(*command)
        events = send(parts[0] + b"\r\n")
        for i in range(1, len(parts), 2):  # each literal, and the line after it
            if any(isinstance(e, (Reject, IMAPClose)) for e in events):
                break  # refused: a client waiting for "+" sends no more of it
            continues = sum(isinstance(e, Continue) for e in events)
            assert continues == (0 if parts[i - 1].endswith(b"+}") else 1), events
            events = [e for e in events if not isinstance(e, Continue)] + send(parts[i] + parts[i + 1] + b"\r\n")
        (outcome,) = [e for e in events if not isinstance(e, Continue)]
        if isinstance(outcome, Frame):
            assert outcome.parts == parts
        else:
            assert outcome.tag in (None, read_tag(parts[0]))
        if isinstance(outcome, IMAPClose):
            break


@fuzz(300, value=st.binary(max_size=30).map(lambda b: bytes(b"ab\\\" "[x % 5] for x in b)) | st.binary(max_size=30))
def test_imap_quoted_strings_unescape_to_what_was_quoted(value):
    """RFC 3501 §4.3 quoted strings, `\\\\` and `\\"` the only escapes, read back exactly."""
    quoted = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    if any(b in b"\r\n\0" for b in value):
        with pytest.raises(ParseError):
            tokens.tokenize([quoted])
    else:
        assert tokens.tokenize([quoted]) == [tokens.String(value)]


# -- POP3: grammar ---------------------------------------------------------------------------------

def pop3_auth(authzid: bytes, user: bytes, password: bytes, inline: bool) -> bytes:
    response = base64.b64encode(authzid + b"\0" + user + b"\0" + password)
    return b"AUTH PLAIN " + response + b"\r\n" if inline else b"AUTH PLAIN\r\n" + response + b"\r\n"


NUMBER_ARG = st.sampled_from([b"1", b"2", b"3", b"0", b"99", b"-1", b"x", b"12345678901", b"\xd9\xa3"])
PASSWORD = st.sampled_from([POP3_PASSWORD.encode(), b"wrong", b""])
POP3_COMMAND = st.one_of(
    st.builds(lambda user, pw: b"USER " + user + b"\r\nPASS " + pw + b"\r\n",
              st.sampled_from([b"alice@example.test", b"bob", b""]), PASSWORD),
    st.builds(pop3_auth, st.sampled_from([b"", b"alice", b"eve"]), st.just(b"alice"), PASSWORD, st.booleans()),
    st.builds(lambda verb, args: b" ".join([verb, *args]) + b"\r\n",
              st.sampled_from([b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"NOOP", b"RSET", b"CAPA",
                               b"list", b"AUTH", b"APOP", b"QUIT", b"XTND", b"PASS", b"USER"]),
              st.lists(NUMBER_ARG, max_size=3)),
    st.sampled_from([b"AUTH PLAIN\r\n*\r\n", b"AUTH PLAIN =\r\n", b"AUTH CRAM-MD5\r\n", b"\r\n", b"X" * 9000
                     + b"\r\nNOOP\r\n", b"RETR 1\r\nRETR 2\r\n", b"TOP 1 0\r\nTOP 2 1\r\n"]),
    st.integers(pop3.MAX_LINE - 8, pop3.MAX_LINE + 2).map(lambda n: b"NOOP" + b" " * (n - 6) + b"\r\n"),
)
POP3_SEGMENT = st.lists(POP3_COMMAND, min_size=1, max_size=8).map(b"".join)
POP3_STREAM = st.lists(POP3_SEGMENT, min_size=1, max_size=3).map(
    lambda segs: [seg + b"STLS\r\n" for seg in segs[:-1]] + segs[-1:])
MESSAGE_LINE = st.sampled_from([b".", b"..", b".x", b"", b"Subject: s", b"text", b"\r", b"x\ny"])
MESSAGES = st.lists(st.builds(lambda lines, end: b"\r\n".join(lines) + end,
                              st.lists(MESSAGE_LINE, max_size=12), st.sampled_from([b"\r\n", b"", b"\n"])),
                    min_size=0, max_size=3).map(lambda ms: {uid: m for uid, m in enumerate(ms, start=10)})
POP3_SETTINGS = st.builds(pop3.Settings, sid=st.just("SID"), implementation=st.just("Postroom test"),
                          tls_available=st.booleans(), tls_active=st.booleans(), plaintext_auth=st.booleans(),
                          login_delay=st.sampled_from([0, 30]), expire=st.sampled_from(["NEVER", "0"]))


def check_pop3_reply(reply: bytes) -> None:
    """+OK/-ERR and a one-line text; or "+ " (AUTH's continuation); a multi-line +OK ends
    in CRLF "." CRLF and no line inside it is "." alone."""
    first, _, rest = reply.partition(b"\r\n")
    assert re.fullmatch(rb"(\+OK|-ERR)( [^\x00-\x1f\x7f]*)?|\+ ", first), reply
    assert first.decode("utf-8")
    if rest:
        assert first.startswith(b"+OK") and rest.endswith(b".\r\n"), reply
        assert b"\r\n.\r\n" not in b"\r\n" + rest[:-3], reply


# -- POP3: properties ------------------------------------------------------------------------------

@fuzz(600, segments=mutated_segments(POP3_STREAM), sizes=SIZES, messages=MESSAGES, settings=POP3_SETTINGS)
def test_pop3_core_takes_any_stream(segments, sizes, messages, settings):
    whole = fed(POP3Driver(settings, messages, chunk=7), segments, None)
    pieces = fed(POP3Driver(settings, messages, chunk=7), segments, sizes)
    assert pieces.replies == whole.replies and pieces.events == whole.events
    for driver in (whole, pieces):
        assert driver.peak_buffered <= pop3.MAX_LINE
        for reply in driver.replies:
            check_pop3_reply(reply)
        for uid, lines, response in driver.retrieved:
            assert response.partition(b"\r\n")[2] == stuffed_reference(messages[uid], lines), (uid, lines, response)


# -- regression tests -------------------------------------------------------------------------

SMTP_PLAIN = SessionConfig("mx.example.test", max_message_size=10_000, max_recipients=5, tls_available=True)


def smtp_reply_lines(data: bytes, config: SessionConfig = SMTP_PLAIN) -> list[str]:
    driver = SMTPDriver(config)
    driver.feed([data])
    return driver.wire.decode().splitlines()


def parse_failure(line: bytes) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_command(Frame([line]))
    return info.value


@pytest.mark.parametrize("command", ["BDAT ²", "BDAT 1²", "MAIL FROM:<a@b.example> SIZE=²"])
def test_smtp_numbers_are_ascii_digits(command):
    """str.isdigit() takes "²", which int() refuses: a ValueError out of the session."""
    lines = smtp_reply_lines(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test>\r\nRSET\r\n"
                             + command.encode() + b"\r\nNOOP\r\n")
    assert lines[-2:] == ["501 5.5.4 Syntax error in parameters or arguments", "250 2.0.0 OK"]


def test_imap_part_numbers_longer_than_int_allows():
    """int() of over 4300 digits raises ValueError (and is slow below that)."""
    error = parse_failure(b"a FETCH 1 BODY[" + b"1" * 5000 + b"]")
    assert str(error) == "invalid part number" and error.tag == "a"


def test_imap_search_nesting_counts_parentheses():
    """Parentheses restarted the NOT/OR depth count, so 16 groups of 256 NOTs overflowed
    Python's stack (RecursionError) instead of answering LIMIT."""
    error = parse_failure(b"a SEARCH " + (b"NOT " * 256 + b"(") * 15 + b"ALL" + b")" * 15)
    assert error.code == "LIMIT" and error.tag == "a"
    assert parse_command(Frame([b"a SEARCH " + (b"NOT " * 16 + b"(") * 15 + b"ALL" + b")" * 15]))


@pytest.mark.parametrize("parts", [[b'a SEARCH CHARSET "\x01" ALL'],
                                   [b"a SEARCH CHARSET {9}", b"A\r\nb NO x", b" ALL"],
                                   [b'a SEARCH CHARSET "' + b"x" * 100 + b'" ALL'],
                                   [b'a SEARCH CHARSET "\xc3\xa9" ALL']])
def test_imap_unsupported_charset_is_named_only_when_printable(parts):
    """A charset given as a quoted string or literal was echoed into the NO response:
    controls, 8-bit bytes, CR LF (a second response line, written by the client)."""
    with pytest.raises(ParseError) as info:
        parse_command(Frame(parts))
    assert (str(info.value), info.value.code, info.value.status) == ("unsupported charset", "BADCHARSET", "NO")


def test_imap_framer_lets_go_of_a_command_it_drops():
    """A command over max_command was held whole, its last line too, while the {n+}
    literal after that line was read and thrown away: more than the documented bound."""
    framer = Framer(max_line=80, max_literal=lambda name: 16, max_command=120)
    framer.feed(b"a APPEND " + b"x" * 60 + b" {16+}\r\n" + b"y" * 16 + b"z" * 70 + b" {5+}\r\n" + b"12")
    assert framer.next() is None
    assert framer.held() <= 120 + 16
    framer.feed(b"345\r\nb NOOP\r\n")
    assert framer.next() == Reject("a", "command too long", status="BAD")
    assert framer.next() == Frame([b"b NOOP"])
