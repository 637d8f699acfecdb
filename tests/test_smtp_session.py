"""The sans-IO SMTP session (mtad/session.py), fed bytes whole and in 1-10 byte fragments.

A scripted adapter answers every question the session asks (accepting by default) and
records what it was asked, what was spooled and what was said on the wire.
"""

from __future__ import annotations

import random
import re

import pytest

from mtad import replies
from mtad.events import (
    NEED_DATA,
    Close,
    DataChunk,
    DataEnd,
    Hello,
    MailFrom,
    RcptTo,
    StartTLS,
)
from mtad.session import Session, SessionConfig

CONFIG = SessionConfig(hostname="mx.example.test", max_message_size=10_000, max_recipients=3, tls_available=True)


class Adapter:
    def __init__(self, config: SessionConfig = CONFIG, answers=None):
        self.session = Session(config)
        self.answers = answers or {}
        self.asked: list = []
        self.messages: list[bytes] = []
        self.spool = bytearray()
        self.wire = bytearray(self.session.data_to_send())
        self.closed = False
        self.tls_started = 0

    def feed(self, data: bytes, fragments: bool = False, seed: int = 0, max_fragment: int = 10) -> str:
        rng = random.Random(seed)
        pieces = []
        i = 0
        while i < len(data):
            n = rng.randint(1, max_fragment) if fragments else len(data)
            pieces.append(data[i:i + n])
            i += n
        start = len(self.wire)
        for piece in pieces:
            self.session.receive(piece)
            self._drain()
        return self.wire[start:].decode()

    def _drain(self) -> None:
        while True:
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, (Hello, MailFrom, RcptTo)):
                self.asked.append(event)
                self.session.answer(event, self.answers.get(type(event), _default(event))(event)
                                    if callable(self.answers.get(type(event))) else _default(event))
            elif isinstance(event, DataChunk):
                self.spool += event.data
            elif isinstance(event, DataEnd):
                self.asked.append(event)
                if event.refusal:
                    self.spool.clear()
                    self.session.answer(event, event.refusal)
                else:
                    self.messages.append(bytes(self.spool))
                    self.spool.clear()
                    self.session.answer(event, replies.Reply(250, "2.0.0", "OK queued as TEST"))
            elif isinstance(event, StartTLS):
                self.wire += self.session.data_to_send()
                self.tls_started += 1
                self.session.tls_established()
            elif isinstance(event, Close):
                self.closed = True
            else:
                raise AssertionError(f"unexpected {event!r}")
            self.wire += self.session.data_to_send()
        self.wire += self.session.data_to_send()


def _default(event):
    if isinstance(event, Hello):
        return replies.OK
    if isinstance(event, MailFrom):
        return replies.SENDER_OK
    return replies.RECIPIENT_OK


def codes(wire: str) -> list[str]:
    """The final line of each reply: "250 2.1.0", "354", ..."""
    out = []
    for line in wire.split("\r\n"):
        m = re.match(r"^(\d{3}) (\d\.\d{1,3}\.\d{1,3})?", line)
        if m:
            out.append(f"{m.group(1)} {m.group(2)}" if m.group(2) else m.group(1))
    return out


TRANSACTION = (b"EHLO client.example.org\r\nMAIL FROM:<bob@example.org> SIZE=100\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
               b"Subject: hi\r\nReceived: from a\r\nReceived: from b\r\n\r\n..leading dot\r\n.\r\n")


@pytest.mark.parametrize("fragments", [False, True])
def test_a_transaction(fragments):
    adapter = Adapter()
    assert adapter.wire.decode() == "220 mx.example.test ESMTP Postroom\r\n"
    wire = adapter.feed(TRANSACTION + b"QUIT\r\n", fragments=fragments, seed=7)
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert adapter.messages == [b"Subject: hi\r\nReceived: from a\r\nReceived: from b\r\n\r\n.leading dot\r\n"]
    end = adapter.asked[-1]
    assert isinstance(end, DataEnd) and end.received_headers == 2 and end.size == len(adapter.messages[0])
    assert adapter.closed


def test_ehlo_advertises_the_extensions():
    wire = Adapter().feed(b"EHLO c.example.org\r\n")
    lines = wire.split("\r\n")
    assert lines[0] == "250-mx.example.test"
    assert set(line[4:] for line in lines[1:-1]) == {
        "PIPELINING", "SIZE 10000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "STARTTLS"}
    no_tls = Adapter(SessionConfig("mx", 10, 1, tls_available=False)).feed(b"EHLO c\r\n")
    assert "STARTTLS" not in no_tls
    assert Adapter().feed(b"HELO c.example.org\r\n") == "250 mx.example.test\r\n"


@pytest.mark.parametrize("seed", range(5))
def test_pipelined_commands_are_answered_in_order(seed):
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\n"
                        b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<y@example.test>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n",
                        fragments=True, seed=seed)
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert [type(e).__name__ for e in adapter.asked] == ["Hello", "MailFrom", "RcptTo", "RcptTo", "RcptTo", "DataEnd"]


def test_refused_recipients_and_no_valid_recipient():
    adapter = Adapter(answers={RcptTo: lambda e: replies.NO_SUCH_USER})
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n")
    assert codes(wire) == ["250", "250 2.1.0", "550 5.1.1", "554 5.5.1"]
    assert adapter.asked[1] == MailFrom("", {})


@pytest.mark.parametrize("smuggled", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\nMAIL FROM:<evil@x.example>\r\n",
])
@pytest.mark.parametrize("fragments", [False, True])
def test_only_crlf_dot_crlf_ends_data(smuggled, fragments):
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
                        b"Subject: s\r\n\r\nbody" + smuggled + b"RCPT TO:<smuggled@example.test>\r\nrest\r\n.\r\n"
                        b"NOOP\r\n", fragments=fragments, seed=3)
    # One message, refused as a whole for its bare line endings; no smuggled command ran.
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "354", "550 5.6.11", "250 2.0.0"]
    assert adapter.messages == []
    assert not any(isinstance(e, RcptTo) and "smuggled" in e.address for e in adapter.asked)
    assert [e.address for e in adapter.asked if isinstance(e, MailFrom)] == ["a@b.example"]


LINES = [b"Received: from a.example", b"RECEIVED: by b", b"Subject: s", b"X-Other: y", b"", b".", b"..", b".x",
         b"plain text", b"x" * 120, b"tab\there", b"8bit \xc3\xa9", b" folded"]
BARE = [b"bare\nlf", b"bare\rcr", b"ends in cr\r", b"\n", b"a\r\rb", b"\n.\n", b"\r.\r"]


@pytest.mark.parametrize("seed", range(300))
def test_data_matches_the_rfc_read_line_by_line(seed):
    """Random messages (dots, Received: headers, stray CR and LF) in random fragments give
    what RFC 5321 §4.5.2 says, computed the plain way: unstuffed lines, the Received:
    count of the header, a 550 for any CR or LF outside a CRLF; the session goes on."""
    rng = random.Random(seed)
    lines = [rng.choice(LINES) for _ in range(rng.randint(0, 60))]
    bare = rng.random() < 0.3
    if bare:
        lines.insert(rng.randint(0, len(lines)), rng.choice(BARE))
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    header = lines[:lines.index(b"")] if b"" in lines else lines
    received = sum(1 for line in header if line.lower().startswith(b"received:"))
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n" + stuffed
                        + b".\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nok\r\n.\r\n",
                        fragments=True, seed=seed, max_fragment=rng.choice([3, 10, 100, 5000]))
    first = "550 5.6.11" if bare else "250 2.0.0"
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "354", first, "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    message = b"".join(line + b"\r\n" for line in lines)
    assert adapter.messages == ([] if bare else [message]) + [b"ok\r\n"]
    ends = [e for e in adapter.asked if isinstance(e, DataEnd)]
    assert [e.size for e in ends] == [len(message), 4]
    if not bare:
        assert ends[0].received_headers == received


def test_oversized_message_is_refused_and_the_session_goes_on():
    adapter = Adapter()
    big = b"x" * 998 + b"\r\n"
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
                        + big * 20 + b".\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nok\r\n.\r\n")
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "250 2.1.0", "250 2.1.5", "354",
                           "250 2.0.0"]
    assert adapter.messages == [b"ok\r\n"]


def test_size_parameter_checks():
    wire = Adapter().feed(b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=20000\r\nMAIL FROM:<a@b.example> FOO=1\r\n"
                          b"MAIL FROM:<a@b.example> SIZE=abc\r\nMAIL FROM:<a@b.example> BODY=8BITMIME SIZE=10\r\n")
    assert codes(wire) == ["250", "552 5.3.4", "555 5.5.4", "501 5.5.4", "250 2.1.0"]


def test_long_lines_unknown_commands_and_sequence_errors():
    adapter = Adapter()
    wire = adapter.feed(b"X" * 600 + b"\r\nFOO bar\r\nMAIL FROM:<a@b.example>\r\nEHLO c\r\nRCPT TO:<x@example.test>\r\n"
                        b"DATA\r\nNOOP\r\n")
    assert codes(wire) == ["500 5.5.2", "500 5.5.1", "503 5.5.1", "250", "503 5.5.1", "503 5.5.1", "250 2.0.0"]
    # A line far longer than the buffer, arriving in pieces, is still one error.
    adapter = Adapter()
    wire = adapter.feed(b"NOOP " + b"y" * 5000 + b"\r\nNOOP\r\n", fragments=True)
    assert codes(wire) == ["500 5.5.2", "250 2.0.0"]


def test_ten_errors_close_the_session():
    adapter = Adapter()
    wire = adapter.feed(b"BOGUS\r\n" * 12)
    assert codes(wire) == ["500 5.5.1"] * 9 + ["421 4.7.0"]
    assert adapter.closed and adapter.session.closed


def test_too_many_recipients():
    wire = Adapter().feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + b"RCPT TO:<x@example.test>\r\n" * 4)
    assert codes(wire) == ["250", "250 2.1.0"] + ["250 2.1.5"] * 3 + ["452 4.5.3"]


@pytest.mark.parametrize("path", [
    b"<@relay.example:user@remote.example>", b"<user@remote.example", b"user@remote.example", b"<>",
    b"<user>", b"<a b@example.test>", b"<" + b"a" * 300 + b"@example.test>",
])
def test_bad_recipient_paths(path):
    wire = Adapter().feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:" + path + b"\r\n")
    assert codes(wire)[-1] == "501 5.1.3"


def test_utf8_addresses_need_smtputf8():
    adapter = Adapter()
    wire = adapter.feed("EHLO c\r\nMAIL FROM:<jörg@example.org>\r\nMAIL FROM:<jörg@example.org> SMTPUTF8\r\n"
                        "RCPT TO:<ålice@example.test>\r\n".encode())
    assert codes(wire) == ["250", "553 5.6.7", "250 2.1.0", "250 2.1.5"]
    assert adapter.asked[-1] == RcptTo("ålice@example.test", {})


@pytest.mark.parametrize("fragments", [False, True])
def test_starttls_discards_pipelined_commands(fragments):
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n", fragments=fragments)
    assert adapter.tls_started == 1
    assert not any(isinstance(e, MailFrom) for e in adapter.asked)
    # After the upgrade the client must greet again, and STARTTLS is no longer offered.
    wire = adapter.feed(b"MAIL FROM:<a@b.example>\r\nEHLO c\r\nSTARTTLS\r\n")
    assert codes(wire) == ["503 5.5.1", "250", "503 5.5.1"]
    assert "STARTTLS" not in wire


def test_bdat_chunks():
    adapter = Adapter()
    body1, body2 = b"Subject: x\r\n\r\nline\r\n.\r\n", b"binary \x00\xff\r\n"
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\n"
                        + f"BDAT {len(body1)}\r\n".encode() + body1 + f"BDAT {len(body2)} LAST\r\n".encode() + body2
                        + b"DATA\r\n", fragments=True, seed=11)
    assert codes(wire)[:5] == ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    assert adapter.messages == [body1 + body2]  # no dot-unstuffing, no end marker in BDAT
    assert codes(wire)[-1] == "503 5.5.1"  # DATA needs a new MAIL


@pytest.mark.parametrize("seed", range(20))
def test_bdat_counts_received_fields_across_chunks(seed):
    """The mail-loop count holds for BDAT too, however the header is cut into chunks."""
    rng = random.Random(seed)
    header = b"".join(rng.choice([b"Received: from hop\r\n", b"received:x\r\n", b"X-Received: no\r\n",
                                  b"Subject: s\r\n", b"\tfolded Received: no\r\n"]) for _ in range(rng.randint(0, 150)))
    expected = header.lower().count(b"\nreceived:") + header.lower().startswith(b"received:")
    message = header + b"\r\nReceived: in the body, not counted\r\n"
    cuts = sorted(rng.sample(range(1, len(message)), min(5, len(message) - 1)))
    chunks = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)], strict=True)]
    commands = b"".join(f"BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''}\r\n".encode() + c
                        for i, c in enumerate(chunks))
    adapter = Adapter(SessionConfig("mx", 100_000, 5, tls_available=False))
    adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\n" + commands,
                 fragments=True, seed=seed, max_fragment=rng.choice([10, 500]))
    (end,) = [e for e in adapter.asked if isinstance(e, DataEnd)]
    assert end.received_headers == expected and end.size == len(message)


@pytest.mark.parametrize("seed", range(30))
def test_bdat_refuses_bare_line_ends_as_data_does(seed):
    """BDAT takes the message as it is, so a bare CR or LF is refused 550 5.6.11 as in DATA
    (found by an attack: `Subject: x\rBcc: injected` was stored through BDAT), wherever the
    chunks cut it; a CRLF cut between two chunks is a CRLF."""
    rng = random.Random(seed)
    bare = rng.random() < 0.6
    lines = [b"Subject: s\r\n", b"To: x@example.test\r\n", b"\r\n"] + [b"body line %d\r\n" % i for i in range(20)]
    message = b"".join(lines)
    if bare:
        at = rng.randrange(len(message) + 1)
        message = message[:at] + rng.choice(BARE) + message[at:]
    cuts = sorted(rng.sample(range(1, len(message)), rng.randint(1, 8)))
    chunks = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)], strict=True)]
    commands = b"".join(f"BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''}\r\n".encode() + c
                        for i, c in enumerate(chunks))
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\n" + commands + b"NOOP\r\n",
                        fragments=True, seed=seed)
    last = codes(wire)[-2]
    assert last == ("550 5.6.11" if bare else "250 2.0.0"), (message, cuts)
    assert adapter.messages == ([] if bare else [message])
    assert codes(wire)[-1] == "250 2.0.0"  # the session goes on


@pytest.mark.parametrize("bdat", [False, True])
def test_a_header_section_over_the_limit_is_refused(bdat):
    """Header lines cost ~20x body lines (here and in the store's parser): a header section
    over MAX_HEADER is read to its end and refused 552 5.3.4; one at the limit is taken."""
    from mtad.readers import MAX_HEADER

    def header(size: int) -> bytes:
        field = b"X-A: b\r\n"
        return field * (size // len(field)) + b"X" * (size % len(field) - 2) + b"\r\n" if size % len(field) \
            else field * (size // len(field))

    config = SessionConfig("mx", 64 << 20, 5, tls_available=False)
    for size, answer in ((MAX_HEADER, "250 2.0.0"), (MAX_HEADER + 9, "552 5.3.4")):
        message = header(size) + b"\r\nbody\r\n"
        adapter = Adapter(config)
        envelope = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\n"
        sent = b"BDAT %d LAST\r\n" % len(message) + message if bdat else b"DATA\r\n" + message + b".\r\n"
        wire = adapter.feed(envelope + sent + b"NOOP\r\n")
        assert codes(wire)[-2:] == [answer, "250 2.0.0"], size
        if answer == "552 5.3.4":
            assert "header exceeds" in wire and adapter.messages == []
        else:
            assert adapter.messages == [message]


def test_binarymime_is_not_taken():
    """BODY=BINARYMIME is not offered (its bare line ends are what smuggling is made of)."""
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n"
                        b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n")
    assert codes(wire) == ["250", "501 5.5.4", "250 2.1.0"]
    assert "BINARYMIME" not in wire


def test_bdat_without_recipients_is_read_and_refused():
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nBDAT 5 LAST\r\nHELLONOOP\r\n")
    assert codes(wire) == ["250", "503 5.5.1", "250 2.0.0"]
    assert adapter.messages == []


def test_bdat_over_the_size_limit():
    adapter = Adapter()
    wire = adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nBDAT 6000\r\n" + b"a" * 6000
                        + b"BDAT 6000 LAST\r\n" + b"b" * 6000 + b"NOOP\r\n")
    assert codes(wire)[-2:] == ["552 5.3.4", "250 2.0.0"]
    assert adapter.messages == []


def test_a_very_long_data_line_is_spooled_in_pieces():
    adapter = Adapter()
    line = b"z" * 50_000
    config = SessionConfig("mx", 100_000, 5, tls_available=False)
    adapter = Adapter(config)
    adapter.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n" + line + b"\r\n.\r\n")
    assert adapter.messages == [line + b"\r\n"]
