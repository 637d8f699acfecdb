"""Every sans-IO protocol core is linear in its input (STYLE.md, "Linear in the input").

Each case feeds a pathological input of size N and of size 8N to one core (the SMTP
session, the IMAP framer, the IMAP tokenizer and command parser, the POP3 core) and fails
when the time grows more than LIMIT times: linear is ~8x, quadratic ~64x. The inputs are
what an attacker sends to make a careless parser rescan: brackets, quotes, parentheses,
literals, long atoms, many short pipelined commands, lines near and over the limits, and
data fed whole as well as one byte at a time.

Timing on a shared 2-core machine is noisy, so: what is measured is this process's CPU
time (what other processes take from it does not count); N is chosen so that one small
run takes about ten milliseconds; each size is timed a few times, in turns (a burst of
load slows both alike), and the minimum kept (noise only ever adds time); only ratios are
compared, never absolute times; the garbage collector is paused while a run is timed; and
a ratio just over the limit is measured again (twice at most) before the case fails. A
quadratic path stays ~64x however often it is measured.
"""

from __future__ import annotations

import base64
import gc
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from core_drivers import POP3_PASSWORD, SMTP_PASSWORD, IMAPDriver, POP3Driver, SMTPDriver, cut
from imapd.appending import AppendSinks
from imapd import threads, urls
from imapd.listing import matches
from imapd.sort import Summary
from imapd.parser import Frame, parse_command
from imapd.syntax import ParseError
from mtad.headers import HeaderBlock, from_addresses
from mtad.session import SessionConfig
from pop3d import core as pop3
from pop3d.framer import BodyEncoder
from storage import Envelope

FACTOR = 8
pytestmark = pytest.mark.serial  # ratios of CPU time, best taken with the machine to itself

LIMIT = 12.0
REPEATS = 3
ATTEMPTS = 3


@dataclass
class Case:
    """`make(n)` builds the input of size ~n (outside the timing); `run(input)` feeds it."""

    name: str
    make: Callable[[int], object]
    run: Callable[[object], object]
    n: int


def timed(run: Callable[[object], object], data: object) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        run(data)
        return time.process_time() - start
    finally:
        gc.enable()


def measure(case: Case, small: object, big: object) -> tuple[float, float]:
    """(the big input's time over the small one's, the small one's), each the fastest of
    REPEATS, taken in turns so that a burst of load slows both alike."""
    smalls, bigs = [], []
    for _ in range(REPEATS):
        smalls += [timed(case.run, small), timed(case.run, small)]
        bigs.append(timed(case.run, big))
    return min(bigs) / min(smalls), min(smalls)


def assert_linear(case: Case) -> None:
    small, big = case.make(case.n), case.make(FACTOR * case.n)
    # What exists now (pytest, every collected test module, the inputs) is left out of the
    # collections before each run: in the suite's heap each full one took tens of ms, nine a
    # case, more than the runs timed. Refcounts still free all of it; only cycles wait.
    gc.collect()
    gc.freeze()
    try:
        ratios = []
        for _ in range(ATTEMPTS):
            ratio, t_small = measure(case, small, big)
            ratios.append(ratio)
            if ratio <= LIMIT:
                return
            if ratio > 2 * LIMIT:
                break  # no noise does that: measuring again would only take long
    finally:
        gc.unfreeze()
    pytest.fail(f"{case.name}: {FACTOR}x the input took {min(ratios):.1f}x the time "
                f"(limit {LIMIT}x; small run {t_small * 1000:.1f} ms)")


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return cut(data, [1])


# -- SMTP: mtad.session ------------------------------------------------------------------------

SMTP_CONFIG = SessionConfig("mx.example.test", max_message_size=1 << 30, max_recipients=10, tls_available=True,
                            max_errors=1 << 30)
EHLO = b"EHLO client.example.org\r\n"
ENVELOPE = EHLO + b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test>\r\n"


def smtp(split: Callable[[bytes], list[bytes]], build: Callable[[int], bytes]) -> Callable[[int], list[bytes]]:
    return lambda n: split(build(n))


def run_smtp(pieces: list[bytes]) -> None:
    driver = SMTPDriver(SMTP_CONFIG)
    driver.feed(pieces)
    assert not driver.closed and sum(event[0] == "end" for event in driver.events) <= 1


def smtp_data(body: bytes) -> bytes:
    return ENVELOPE + b"DATA\r\n" + body + b"\r\n.\r\nNOOP\r\n"


SMTP_CASES = [
    Case("pipelined transactions", smtp(whole, lambda n: EHLO + (
        b"MAIL FROM:<a@b.example> SIZE=100\r\nRCPT TO:<c@example.test>\r\nRSET\r\n") * n), run_smtp, 600),
    Case("pipelined commands, 1-byte reads", smtp(bytewise, lambda n: b"NOOP\r\n" * n), run_smtp, 1500),
    Case("lines near the limit", smtp(whole, lambda n: (b"NOOP " + b"x" * 505 + b"\r\n") * n), run_smtp, 4000),
    Case("lines near the limit, 1-byte reads", smtp(bytewise, lambda n: (b"NOOP " + b"x" * 505 + b"\r\n") * n),
         run_smtp, 20),
    Case("lines over the limit", smtp(whole, lambda n: (b"NOOP " + b"x" * 600 + b"\r\n") * n), run_smtp, 5000),
    Case("one long line, 1-byte reads", smtp(bytewise, lambda n: b"NOOP " + b"x" * n + b"\r\nNOOP\r\n"),
         run_smtp, 7000),
    Case("quoted paths", smtp(whole, lambda n: EHLO + (
        b'MAIL FROM:<"\\"\\"\\\\\\"\\"' + b'\\"' * 100 + b'"@b.example>\r\nRSET\r\n') * n), run_smtp, 900),
    Case("DATA of dots and stray line ends", smtp(whole, lambda n: smtp_data(
        b"Subject: s\r\n\r\n" + b"..\r\n.x\r\n\r\n\n.\n\r.\r\n" * n)), run_smtp, 700),
    Case("DATA of dots, 1-byte reads", smtp(bytewise, lambda n: smtp_data(
        b"Subject: s\r\n\r\n" + b"..\r\n.x\r\n\r\n" * n)), run_smtp, 350),
    Case("DATA header of Received fields", smtp(whole, lambda n: smtp_data(b"Received: from x\r\n" * n)),
         run_smtp, 5000),
    Case("DATA one long line, 1-byte reads", smtp(bytewise, lambda n: smtp_data(b"y" * n)), run_smtp, 5000),
    Case("DATA one long line, 512-byte reads", smtp(lambda d: cut(d, [512]), lambda n: smtp_data(b"y" * n)),
         run_smtp, 1 << 20),
    Case("DATA of bare CRs", smtp(whole, lambda n: smtp_data(b"\r" * n)), run_smtp, 1 << 20),
    Case("DATA of bare CRs, 1-byte reads", smtp(bytewise, lambda n: smtp_data(b"\r" * n)), run_smtp, 7000),
    Case("BDAT in many small chunks", smtp(whole, lambda n: ENVELOPE + b"BDAT 3\r\nabc" * n + b"BDAT 0 LAST\r\n"),
         run_smtp, 1600),
    Case("BDAT header, 1-byte reads", smtp(bytewise, lambda n: ENVELOPE + b"BDAT %d LAST\r\n" % (12 * n)
                                           + b"Received: x\n" * n), run_smtp, 350),
]


# Submission: AUTH exchanges (mtad/sasl.py), the DSN parameters (mtad/paths.py), and the
# reading of a submitted message's header (mtad/headers.py).
SUBMISSION_CONFIG = SessionConfig("mail.example.test", max_message_size=1 << 30, max_recipients=1 << 30,
                                  tls_available=True, is_tls=True, max_errors=1 << 30, auth=True, dsn=True)
WRONG_PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0" + b"w" * 300) + b"\r\n"
GOOD_PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0" + SMTP_PASSWORD.encode()) + b"\r\n"


def run_submission(pieces: list[bytes]) -> None:
    driver = SMTPDriver(SUBMISSION_CONFIG)
    driver.feed(pieces)
    assert not driver.closed


SUBMISSION_CASES = [
    Case("failed AUTH PLAIN, pipelined", smtp(whole, lambda n: EHLO + WRONG_PLAIN * n), run_submission, 500),
    Case("AUTH LOGIN exchanges, 1-byte reads", smtp(bytewise, lambda n: EHLO + (
        b"AUTH LOGIN\r\n" + base64.b64encode(b"alice@example.test") + b"\r\nd3Jvbmc=\r\n") * n), run_submission, 60),
    Case("long SASL responses", smtp(whole, lambda n: EHLO + (
        b"AUTH PLAIN\r\n" + b"QUFB" * 3000 + b"\r\n") * n), run_submission, 100),
    Case("a SASL response over the limit, 1-byte reads", smtp(bytewise, lambda n: EHLO + b"AUTH PLAIN\r\n"
                                                             + b"A" * n + b"\r\nNOOP\r\n"), run_submission, 7000),
    Case("cancelled exchanges", smtp(whole, lambda n: EHLO + b"AUTH PLAIN\r\n*\r\n" * n), run_submission, 1500),
    Case("DSN parameters, pipelined", smtp(whole, lambda n: EHLO + GOOD_PLAIN + (
        b"MAIL FROM:<alice@example.test> RET=HDRS ENVID=" + b"+2B" * 33 + b"\r\n"
        + b"RCPT TO:<c@example.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;" + b"+2Bx" * 100 + b"\r\n"
        + b"RCPT TO:<c@example.test> NOTIFY=NEVER,NEVER ORCPT=rfc822;" + b"+2" * 200 + b"\r\nRSET\r\n") * n),
         run_submission, 150),
]


def run_from(value: str) -> None:
    from_addresses(value)


def run_header_block(pieces: list[bytes]) -> None:
    block = HeaderBlock()
    for piece in pieces:
        if block.feed(piece):
            break


SUBMISSION_CASES += [
    Case("From: of nested comments", lambda n: "(" * n + ")" * n + " a@b.example", run_from, 40000),
    Case("From: of quoted strings and escapes", lambda n: '"\\"x' * n + '" <a@b.example>', run_from, 20000),
    Case("From: of many mailboxes", lambda n: "a@b.example, " * n, run_from, 5000),
    Case("a header, 1-byte reads", lambda n: bytewise(b"X-H: v\r\n" * n + b"\r\nbody"), run_header_block, 8000),
    Case("a header of CRs and LFs", lambda n: cut(b"X: v" + b"\r\n \r\r\n \n" * n + b"\r\n\r\n", [7]), run_header_block,
         8000),
]


@pytest.mark.parametrize("case", SUBMISSION_CASES, ids=lambda case: case.name)
def test_submission_session_is_linear(case):
    assert_linear(case)


@pytest.mark.parametrize("case", SMTP_CASES, ids=lambda case: case.name)
def test_smtp_session_is_linear(case):
    assert_linear(case)


# -- IMAP: imapd.framer ------------------------------------------------------------------------

def framer(split: Callable[[bytes], list[bytes]], build: Callable[[int], bytes], **limits) -> Case:
    def run(pieces: list[bytes]) -> None:
        IMAPDriver(parse=False, **limits).feed(pieces)

    return lambda n: split(build(n)), run


BIG = dict(max_line=1 << 26, max_literal=lambda name: 1 << 26, max_command=1 << 26)
FRAMER_CASES = [
    Case("pipelined commands", *framer(whole, lambda n: b"a NOOP\r\n" * n), 3000),
    Case("pipelined commands, 1-byte reads", *framer(bytewise, lambda n: b"a NOOP\r\n" * n), 900),
    Case("a long line, 1-byte reads", *framer(bytewise, lambda n: b"a LOGIN " + b"x" * n + b"\r\n", **BIG), 9000),
    Case("lines near the limit", *framer(whole, lambda n: (b"a LOGIN " + b"x" * 65000 + b"\r\n") * n), 36),
    Case("a line over the limit, 1-byte reads", *framer(bytewise, lambda n: b"a LOGIN " + b"x" * n + b"\r\nb NOOP\r\n",
                                                        max_line=1000), 7500),
    Case("lines over the limit", *framer(whole, lambda n: (b"a LOGIN " + b"x{9+}" * 200 + b"\r\n") * n,
                                         max_line=500), 3000),
    Case("a literal, 1-byte reads", *framer(bytewise, lambda n: b"a APPEND x {%d+}\r\n" % n + b"m" * n + b"\r\n",
                                            **BIG), 10000),
    Case("many literals in one command", *framer(whole, lambda n: b"a X" + b" {1+}\r\nx" * n + b"\r\n", **BIG),
         3000),
    Case("many literals in one command, 1-byte reads",
         *framer(bytewise, lambda n: b"a X" + b" {1}\r\nx" * n + b"\r\n", **BIG), 1000),
    Case("braces", *framer(whole, lambda n: (b"a X " + b"{" * 1000 + b"}" * 1000 + b"\r\n") * n), 2000),
    Case("dropped literals", *framer(whole, lambda n: (b"a APPEND x {2000+}\r\n" + b"z" * 2000 + b"\r\n") * n,
                                     max_literal=lambda name: 10), 1200),
]


@pytest.mark.parametrize("case", FRAMER_CASES, ids=lambda case: case.name)
def test_imap_framer_is_linear(case):
    assert_linear(case)


# -- IMAP: imapd.tokens, imapd.parser, imapd.search_keys ---------------------------------------

def parse(parts: list[bytes]) -> None:
    try:
        parse_command(Frame(parts))
    except ParseError:
        pass


def line(build: Callable[[int], bytes]) -> Callable[[int], list[bytes]]:
    return lambda n: [build(n)]


PARSER_CASES = [
    Case("brackets in an atom", line(lambda n: b"a SELECT x" + b"[" * n), parse, 18000),
    Case("brackets after BODY", line(lambda n: b"a FETCH 1 BODY[" + b"[" * n + b"]"), parse, 45000),
    Case("bracketed items", line(lambda n: b"a FETCH 1 (" + b"BODY.PEEK[HEADER.FIELDS (A B)]<0.10> " * n + b")"),
         parse, 500),
    Case("section part numbers", line(lambda n: b"a FETCH 1 BODY[" + b"1." * n + b"TEXT]"), parse, 16000),
    Case("a long quoted string", line(lambda n: b'a LOGIN "' + b"x" * n + b'" y'), parse, 1 << 21),
    Case("an unterminated quoted string", line(lambda n: b'a LOGIN "' + b'\\"' * n), parse, 1 << 18),
    Case("many quoted strings", line(lambda n: b"a SEARCH" + b' TEXT "x"' * n), parse, 1400),
    Case("parentheses", line(lambda n: b"a FETCH 1 (" + b"FLAGS " * n + b")"), parse, 2800),
    Case("nested parentheses", line(lambda n: b"a SEARCH " + b"(" * 15 + b"ALL " * n + b")" * 15), parse, 4600),
    Case("many groups", line(lambda n: b"a SEARCH" + b" (ALL)" * n), parse, 1700),
    Case("literals", lambda n: [b"a SEARCH TEXT {1}"] + [b"x", b" TEXT {1}"] * n + [b"x", b""], parse, 1800),
    Case("a long atom", line(lambda n: b"a SELECT " + b"x" * n), parse, 45000),
    Case("long atoms in brackets", line(lambda n: b"a FETCH 1 BODY[" + b"x" * n + b"]"), parse, 90000),
    Case("search keys", line(lambda n: b"a SEARCH" + b" OR NOT SEEN UID 1:*" * n), parse, 850),
    Case("a sequence set", line(lambda n: b"a UID FETCH " + b"4294967295:4294967295," * n + b"3 FLAGS"), parse, 2000),
    Case("modified UTF-7", line(lambda n: b"a SELECT " + b"&AOk-x&-" * n), parse, 2000),
    Case("flags", line(lambda n: b"a STORE 1 +FLAGS (" + b"\\Seen $Junk " * n + b")"), parse, 2000),
    Case("annotation entries", line(lambda n: b"a GETMETADATA (DEPTH 1) INBOX (" + b"/private/a/b " * n + b")"),
         parse, 2000),
    Case("annotation values", line(lambda n: b"a SETMETADATA INBOX (" + b'/private/a "v" ' * n + b")"), parse, 1500),
    Case("notify mailboxes", line(lambda n: b"a NOTIFY SET STATUS (mailboxes (" + b"box " * n
                                  + b") (MessageNew MessageExpunge))"), parse, 2000),
    Case("notify events", line(lambda n: b"a NOTIFY SET (personal (" + b"MailboxName FlagChange " * n + b"))"),
         parse, 2000),
    Case("search return options", line(lambda n: b"a SEARCH RETURN (" + b"MIN MAX PARTIAL 1:2 " * n + b") ALL"),
         parse, 1500),
    Case("sort criteria", line(lambda n: b"a SORT (" + b"REVERSE SUBJECT " * n + b") UTF-8 ALL"), parse, 2500),
    Case("QRESYNC sequence match data", line(lambda n: b"a SELECT x (QRESYNC (1 2 1:9 (" + b"1:2," * n + b"3 "
                                             + b"5:6," * n + b"7)))"), parse, 1500),
    Case("PREVIEW modifiers", line(lambda n: b"a FETCH 1 (" + b"PREVIEW (LAZY) " * n + b")"), parse, 1500),
    Case("URLFETCH URLs", line(lambda n: b"a URLFETCH" + b" (imap://a@b/x/;uid=1;urlauth=anonymous BINARY)" * n),
         parse, 1500),
]


# -- URLAUTH URLs: imapd.urls (its regex unbounded here: parse() caps a URL at MAX_URL) ----

def run_url(text: str) -> None:
    urls._URL.match(text)


URL_CASES = [
    Case("a mailbox of slashes, no UID", lambda n: "imap://a@b/" + "x/" * n + ";urlauth=anonymous", run_url, 20000),
    Case("slashes and semicolons", lambda n: "imap://a@b/" + "/;uid=1" * n, run_url, 20000),
    Case("a long user", lambda n: "imap://" + "u" * n + "/x", run_url, 50000),
    Case("sections and partials", lambda n: "imap://a@b/x/;uid=1" + "/;section=1/;partial=1.2" * n, run_url, 20000),
    Case("a long access user", lambda n: "imap://a@b/x/;uid=1;urlauth=user+" + "u" * n + ":", run_url, 50000),
]


@pytest.mark.parametrize("case", URL_CASES, ids=lambda case: case.name)
def test_urlauth_urls_are_linear(case):
    assert_linear(case)


@pytest.mark.parametrize("case", PARSER_CASES, ids=lambda case: case.name)
def test_imap_parser_is_linear(case):
    assert_linear(case)


# -- IMAP: APPEND's literals as they begin (imapd.appending) --------------------------------------

def append_sinks(build: Callable[[int], list[bytes]]) -> Case:
    """Each literal of an APPEND asks AppendSinks for its sink, which parses the command's
    head: what came since the last literal, not the command from its start."""
    def run(pieces: list[bytes]) -> None:
        sinks = AppendSinks(_append_store(), lambda: "a@example.test", lambda: 1 << 20)
        parts = [pieces[0]]
        for line in pieces[1:]:
            sink = sinks.sink(parts, 1)
            sink.write(b"x")
            parts += [sink, line]
        sinks.close()

    return build, run


_STORE: list = []


def _append_store():
    if not _STORE:
        import atexit
        import shutil
        import tempfile

        from storage import open_data_dir
        from storage.store import Store

        root = tempfile.mkdtemp(prefix="linear-append-")
        atexit.register(shutil.rmtree, root, True)  # the module's store lives until the run ends
        store = Store(open_data_dir(Path(root) / "var", 1))
        store.ensure_account("a@example.test")
        _STORE.append(store)
    return _STORE[0]


FLAGS = b"(" + b" ".join(b"$k%d" % i for i in range(200)) + b")"
APPEND_CASES = [
    Case("MULTIAPPEND messages with long flag lists",
         *append_sinks(lambda n: [b"a APPEND INBOX " + FLAGS + b" {1}"] + [b" " + FLAGS + b" {1}"] * n), 11),
    Case("CATENATE TEXT parts after long URLs",
         *append_sinks(lambda n: [b"a APPEND INBOX CATENATE (TEXT {1}"]
                       + [b' URL "/INBOX/;UID=1/;SECTION=' + b"1." * 1000 + b'1" TEXT {1}'] * n), 11),
]


@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda case: case.name)
def test_imap_append_heads_are_linear(case):
    assert_linear(case)


# -- IMAP SORT and THREAD: imapd.sort, imapd.threads ------------------------------------------

def thread_chain(n: int) -> list[Summary]:
    """n messages, each a reply to the one before, References listing every ancestor (as
    mailing lists write them), one subject gathered with the rest."""
    ids = [f"m{i}@x" for i in range(n)]
    return [Summary(uid=i + 1, internal_date=float(i), size=1, sent=None,
                    envelope=Envelope(subject_text="Re: x", message_id=f"<{ids[i]}>"), references=tuple(ids[:i]))
            for i in range(n)]


def thread_summary(uid: int, message_id: str, references: list[str]) -> Summary:
    return Summary(uid=uid, internal_date=float(uid), size=1, sent=None,
                   envelope=Envelope(subject_text="x", message_id=f"<{message_id}>"), references=tuple(references))


def thread_dummy_chain(n: int) -> list[Summary]:
    """Each message names 100 new References after the last one before it: one chain of
    dummies 99 n deep, with a message hung at every 99th (each used to walk up all of it)."""
    return [thread_summary(j + 1, f"c{j}", [f"d{99 * j + i}" for i in range(100)]) for j in range(n)]


def thread_linked_roots(n: int) -> list[Summary]:
    """A crafted mailbox (attack15): a deep chain of dummies, then many dummies that are
    each some message's parent, then messages whose References hang those under the
    chain's end, 99 at a time: each link's loop check walked the whole chain."""
    chain = thread_dummy_chain(n // 3)
    roots = [thread_summary(len(chain) + i + 1, f"y{i}", [f"x{i}"]) for i in range(n - n // 3 - n // 100)]
    out, leaf, taken = chain + roots, f"c{len(chain) - 1}", 0
    while len(out) < n:
        references = [leaf] + [f"x{taken + t}" for t in range(99)]
        out.append(thread_summary(len(out) + 1, f"f{len(out)}", references))
        leaf, taken = references[-1], taken + 99
    return out


def thread_references(messages: list[Summary]) -> str:
    return threads.render(threads.references(messages), lambda m: m.uid)


THREAD_CASES = [
    Case("a References chain", thread_chain, thread_references, 300),
    Case("messages under one deep chain of dummies", thread_dummy_chain, thread_references, 60),
    Case("linked roots hung under a deep chain", thread_linked_roots, thread_references, 200),
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda case: case.name)
def test_imap_sort_and_thread_are_linear(case):
    assert_linear(case)


# -- POP3: pop3d.core --------------------------------------------------------------------------

POP3_SETTINGS = pop3.Settings(sid="S", implementation="Postroom test", tls_available=True, tls_active=True,
                              plaintext_auth=True)
LOGIN = b"USER alice@example.test\r\nPASS " + POP3_PASSWORD.encode() + b"\r\n"
MESSAGES = {1: b"Subject: s\r\n\r\n.dot\r\nline\r\n", 2: b"x" * 100}


def pop3_case(split: Callable[[bytes], list[bytes]], build: Callable[[int], bytes]):
    def run(pieces: list[bytes]) -> None:
        driver = POP3Driver(POP3_SETTINGS, MESSAGES)
        driver.feed(pieces)
        assert not driver.closed

    return lambda n: split(build(n)), run


def encode(spec: tuple[bytes, int | None, int]) -> None:
    """BodyEncoder over a message in `chunk`-byte pieces (TOP when `lines` is set)."""
    raw, lines, chunk = spec
    encoder = BodyEncoder(lines)
    for pos in range(0, len(raw), chunk):
        encoder.feed(raw[pos:pos + chunk])


DOTTED = b"Subject: s\r\n\r\n" + b".\r\n..x\r\n\r\n"
POP3_CASES = [
    Case("pipelined commands", *pop3_case(whole, lambda n: LOGIN + b"STAT\r\nLIST 1\r\nUIDL\r\nRSET\r\n" * n), 600),
    Case("pipelined commands, 1-byte reads", *pop3_case(bytewise, lambda n: b"CAPA\r\n" * n), 1000),
    Case("lines near the limit", *pop3_case(whole, lambda n: LOGIN + (b"NOOP" + b" " * 8180 + b"\r\n") * n), 20),
    Case("lines near the limit, 1-byte reads", *pop3_case(bytewise, lambda n: LOGIN + (b"NOOP" + b" " * 8180
                                                                                       + b"\r\n") * n), 2),
    Case("a line over the limit, 1-byte reads", *pop3_case(bytewise, lambda n: b"NOOP " + b"x" * n + b"\r\nCAPA\r\n"),
         16000),
    Case("RETR of dotted lines", lambda n: (DOTTED * n, None, 65536), encode, 200000),
    Case("TOP of dotted lines, 1-byte chunks", lambda n: (DOTTED * n, 1 << 30, 1), encode, 400),
    Case("TOP of dotted lines, 3-byte chunks", lambda n: (DOTTED * n, 1 << 30, 3), encode, 1600),
]


@pytest.mark.parametrize("case", POP3_CASES, ids=lambda case: case.name)
def test_pop3_core_is_linear(case):
    assert_linear(case)


# -- IMAP LIST patterns: imapd.listing --------------------------------------------------------

def run_list(data: tuple[str, list[str]]) -> None:
    pattern, names = data
    assert not any(matches(pattern, name) for name in names)


LIST_NAMES = 50  # mailboxes of one account, each `n` characters long
LIST_CASES = [
    # A regex of `.*` backtracks: k wildcards cost ~n^k / k! per name (five against 200
    # characters took 72 s, and the event loop of every IMAP user with it). Two suffice
    # to tell linear from not, and fail in seconds rather than hours.
    Case("two wildcards against long names", lambda n: ("*a*a*b", ["a" * n] * LIST_NAMES), run_list, 300),
    Case("%-wildcards against long names", lambda n: ("%a%a%b", ["a" * n] * LIST_NAMES), run_list, 300),
]


@pytest.mark.parametrize("case", LIST_CASES, ids=lambda case: case.name)
def test_imap_list_patterns_are_linear(case):
    assert_linear(case)


@pytest.mark.parametrize("body", [b"x" * 65000, b'\\"' * 32000, b'ab\\"' * 16000])
@pytest.mark.parametrize("closed", [True, False])
def test_a_quoted_string_costs_no_memory_per_character(body, closed):
    """Memory grows with the input too: the quoted-string regex kept backtracking state
    for every character, 10 MB for one 64 KB string (a line the framer allows)."""
    line = b'a LOGIN "' + body + (b'" y' if closed else b"")
    tracemalloc.start()
    try:
        parse([line])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(line)  # the value, unescaped: a copy or two
