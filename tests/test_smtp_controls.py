"""Control characters in SMTP commands are refused 501 5.5.2 (RFC 5321 §4.1.1.1, §4.1.2):
the EHLO/HELO name and the MAIL FROM / RCPT TO paths become the Received: and
Return-Path: headers of the stored message, where a bare CR or an ESC is a header
injection. Checked on the session core (every C0 control but the LF that ends the line,
DEL, and for SMTPUTF8 the C1 controls and U+2028), and end to end against `postroom serve`
over a raw socket, reading the stored message back through the storage API.
"""

from __future__ import annotations

import re
import socket

import pytest

from conftest import add_accounts
from core_drivers import SMTPDriver
from mtad.session import SessionConfig
from storage import open_data_dir
from storage.store import Store

CONFIG = SessionConfig("mx.example.test", max_message_size=10_000, max_recipients=5, tls_available=False)
# Every C0 control but LF (which ends the line, so cannot sit inside one), and DEL. CR is
# among them: "EHLO a\rb\r\n" holds a bare CR.
CONTROLS = [bytes([c]) for c in range(0x20) if c != 0x0A] + [b"\x7f"]
# C1 controls, line and paragraph separators, and format characters (zero-width space,
# right-to-left override: found by an attack in an EHLO name).
UNICODE_CONTROLS = ["\x80", "\x85", "\x9b", "\x9f", "\u2028", "\u2029", "\u200b", "\u202e", "\ufeff"]
REFUSED = "501 5.5.2"
REFUSED_TEXT = "501 5.5.2 Syntax error: control character in command"


def dirty(control: bytes) -> dict[str, list[bytes]]:
    """Each command with `control` in its argument: inside, first, last (a CR last is a
    CR before the CRLF), and in the parts of a path that have their own syntax."""
    c = control
    return {
        "EHLO": [b"EHLO client" + c + b".example.org", b"EHLO " + c + b"client.example.org",
                 b"EHLO client.example.org" + c, b"EHLO [127.0.0." + c + b"1]"],
        "HELO": [b"HELO client" + c + b".example.org", b"HELO client.example.org" + c],
        "MAIL": [b"MAIL FROM:<sen" + c + b"der@example.org>", b"MAIL FROM:<sender@exa" + c + b"mple.org>",
                 b'MAIL FROM:<"sen' + c + b'der"@example.org>', b'MAIL FROM:<"sen\\' + c + b'der"@example.org>',
                 b"MAIL FROM:<sender@example.org> SIZE=10" + c, b"MAIL FROM:<sender@example.org>" + c],
        "RCPT": [b"RCPT TO:<ali" + c + b"ce@example.test>", b"RCPT TO:<alice@example.test" + c + b">",
                 b'RCPT TO:<"ali' + c + b'ce"@example.test>', b"RCPT TO:<alice@example.test>" + c],
    }


CLEAN = {"EHLO": b"EHLO client.example.org", "HELO": b"HELO client.example.org",
         "MAIL": b"MAIL FROM:<sender@example.org>", "RCPT": b"RCPT TO:<alice@example.test>"}
BEFORE = {"EHLO": [], "HELO": [], "MAIL": [CLEAN["EHLO"]], "RCPT": [CLEAN["EHLO"], CLEAN["MAIL"]]}


def replies(lines: list[bytes]) -> list[str]:
    """The final line of each reply to `lines`, fed to a session one by one."""
    driver = SMTPDriver(CONFIG)
    answers = []
    for line in lines:
        start = len(driver.wire)
        driver.feed([line + b"\r\n"])
        answers.append(driver.wire[start:].decode("utf-8", "replace").splitlines()[-1])
    assert not any(_has_control(str(field)) for event in driver.events for field in event[1:])
    return answers


def _has_control(text: str) -> bool:
    return bool(re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", text))


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: f"0x{c[0]:02x}")
@pytest.mark.parametrize("verb", ["EHLO", "HELO", "MAIL", "RCPT"])
def test_the_session_refuses_control_characters(verb, control):
    for line in dirty(control)[verb]:
        answers = replies(BEFORE[verb] + [line, CLEAN[verb]])
        assert answers[-2].startswith(REFUSED), (line, answers)
        assert answers[-1].startswith("250"), (line, answers)  # the session goes on as before


@pytest.mark.parametrize("control", UNICODE_CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_smtputf8_paths_take_utf8_but_no_controls(control):
    c = control.encode()
    answers = replies([CLEAN["EHLO"], "MAIL FROM:<jö".encode() + c + b"rg@example.org> SMTPUTF8",
                       "MAIL FROM:<jörg@example.org> SMTPUTF8".encode(),
                       "RCPT TO:<åli".encode() + c + b"ce@example.test>",
                       "RCPT TO:<ålice@example.test>".encode(), "EHLO clíent".encode() + c + b".example.org"])
    assert answers[1:] == [REFUSED_TEXT, "250 2.1.0 Sender OK", REFUSED_TEXT, "250 2.1.5 Recipient OK", REFUSED_TEXT]


def test_only_the_crlf_ending_a_line_is_taken_off():
    """A CR before the CRLF, or a line ended by a lone LF with a CR before it, is bare."""
    assert replies([b"EHLO client.example.org\r", b"NOOP\r\r", b"NOOP"]) == [REFUSED_TEXT] * 2 + ["250 2.0.0 OK"]
    driver = SMTPDriver(CONFIG)
    driver.feed([b"EHLO a.example\n", b"HELO b.example\r\n"])  # a lone LF still ends a line
    assert driver.events == [("hello", "a.example", True), ("hello", "b.example", False)]


# -- end to end -------------------------------------------------------------------------------

@pytest.fixture
def mx(daemon, data_dir):
    add_accounts(daemon.config_path, "pw for alice", ["alice@example.test"])
    daemon.store = Store(open_data_dir(data_dir, 4))
    yield daemon
    daemon.store.close()


class Client:
    """A raw SMTP client: one command at a time, each reply read whole."""

    def __init__(self, daemon):
        address = daemon.listen("smtp.listen")
        self.sock = socket.create_connection((address.host, address.port), timeout=15)
        self.buffer = b""
        assert self.reply().startswith("220 ")

    def reply(self) -> str:
        """The last line of the next reply."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if re.match(rb"\d{3} ", line):
                    self.buffer = b"\r\n".join(lines[i + 1:])
                    return line.decode("utf-8", "replace")
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; read {self.buffer!r}"
            self.buffer += chunk

    def command(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send_message(self, helo: bytes, sender: bytes, subject: bytes) -> None:
        assert self.command(b"EHLO " + helo).startswith("250 ")
        assert self.command(b"MAIL FROM:<" + sender + b">" + (b" SMTPUTF8" if not sender.isascii() else b"")) \
            .startswith("250 ")
        assert self.command(b"RCPT TO:<alice@example.test>").startswith("250 ")
        assert self.command(b"DATA").startswith("354")
        assert self.command(b"Subject: " + subject + b"\r\n\r\nbody\r\n.").startswith("250 ")

    def close(self) -> None:
        self.command(b"QUIT")
        self.sock.close()


def stored_headers(mx) -> list[bytes]:
    store = mx.store
    messages = [store.read_message(m) for m in store.fetch("alice@example.test", "INBOX", [(1, 2**32 - 1)])]
    return [message.partition(b"\r\n\r\n")[0] for message in messages]


def assert_clean(header: bytes) -> None:
    """Lines end in CRLF and fold with CRLF TAB; no other control anywhere (nor in UTF-8)."""
    unfolded = header.replace(b"\r\n\t", b" ").decode("utf-8")
    assert not any(_has_control(line) for line in unfolded.split("\r\n")), header


def test_control_characters_never_reach_the_stored_headers(mx):
    sent = {}  # subject -> the EHLO name's first label, the sender's local part
    for i, control in enumerate(CONTROLS):
        client = Client(mx)
        for verb in ("EHLO", "HELO"):
            assert client.command(dirty(control)[verb][0]).startswith(REFUSED), (verb, control)
        assert client.command(b"EHLO same%d.example.org" % i).startswith("250 ")
        assert client.command(dirty(control)["MAIL"][0]).startswith(REFUSED), control
        assert client.command(b"MAIL FROM:<same%d@example.org>" % i).startswith("250 ")
        assert client.command(dirty(control)["RCPT"][0]).startswith(REFUSED), control
        assert client.command(b"RSET").startswith("250 ")
        # The same session, after its refused commands, then a new one: both clean.
        client.send_message(b"same%d.example.org" % i, b"same%d@example.org" % i, b"same %d" % i)
        client.close()
        client = Client(mx)
        client.send_message(b"new%d.example.org" % i, b"new%d@example.org" % i, b"new %d" % i)
        client.close()
        sent.update({b"same %d" % i: b"same%d" % i, b"new %d" % i: b"new%d" % i})
    headers = stored_headers(mx)
    assert sorted(re.search(rb"\r\nSubject: (.*)", h).group(1) for h in headers) == sorted(sent)
    for header in headers:
        name = sent[re.search(rb"\r\nSubject: (.*)", header).group(1)]
        assert_clean(header)
        assert header.startswith(b"Return-Path: <" + name + b"@example.org>\r\nReceived: from " + name
                                 + b".example.org ([127.0.0.1])\r\n\tby ")


def test_smtputf8_control_characters_never_reach_the_stored_headers(mx):
    for control in UNICODE_CONTROLS:
        c = control.encode()
        client = Client(mx)
        assert client.command("EHLO clíent".encode() + c + b".example.org").startswith(REFUSED)
        assert client.command("EHLO clíent.example.org".encode()).startswith("250 ")
        assert client.command("MAIL FROM:<jö".encode() + c + b"rg@example.org> SMTPUTF8").startswith(REFUSED)
        assert client.command("MAIL FROM:<jörg@example.org> SMTPUTF8".encode()).startswith("250 ")
        assert client.command("RCPT TO:<ali".encode() + c + b"ce@example.test>").startswith(REFUSED)
        client.close()
    client = Client(mx)
    client.send_message("clíent.example.org".encode(), "jörg@example.org".encode(), b"utf8")
    client.close()
    (header,) = stored_headers(mx)
    assert_clean(header)
    assert header.startswith("Return-Path: <jörg@example.org>\r\nReceived: from clíent.example.org ".encode())
