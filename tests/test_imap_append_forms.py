"""APPEND's extensions, in process (tests/imap_script.py, a real store): MULTIAPPEND
(RFC 3502, all or nothing), CATENATE (RFC 4469, TEXT and URL parts, all or nothing),
BINARY (RFC 3516: FETCH BINARY[], BINARY.PEEK, BINARY.SIZE, UNKNOWN-CTE, literal8 APPEND
whose binary parts are stored as base64). The streaming over a socket is in
test_imap_append.py."""

from __future__ import annotations

import base64
import re

import pytest

from imap_script import ScriptServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-append-forms"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


@pytest.fixture
def imap(server, user):
    return server.login(user)


def literal(data: bytes, binary: bool = False) -> bytes:
    return (b"~" if binary else b"") + b"{%d+}\r\n" % len(data) + data


def literals(raw: bytes, label: bytes) -> list[bytes]:
    """The literal (or literal8) after each `label` in `raw`, in order."""
    out, pos = [], 0
    while (at := raw.find(label, pos)) >= 0:
        m = re.compile(rb"~?\{(\d+)\}\r\n").match(raw, at + len(label))
        if m is None:
            pos = at + 1
            continue
        size = int(m.group(1))
        out.append(raw[m.end():m.end() + size])
        pos = m.end() + size
    return out


def bodies(imap, mailbox: str = "INBOX") -> list[bytes]:
    imap.transact("ok", f"EXAMINE {mailbox}")
    return literals(imap.transact("ok", "FETCH 1:* BODY.PEEK[]").raw, b"BODY[] ")


def test_capabilities(imap):
    caps = imap.transact("ok", "CAPABILITY").untagged[0].split()
    assert {"MULTIAPPEND", "CATENATE", "BINARY"} <= set(caps)


# -- MULTIAPPEND ------------------------------------------------------------------------------

def test_multiappend_stores_every_message_in_order_with_its_own_flags(imap):
    reply = imap.transact("ok", b"APPEND INBOX (\\Seen) " + literal(b"Subject: one\r\n\r\n1\r\n")
                          + b' (\\Flagged) "01-Jan-2020 00:00:00 +0000" ' + literal(b"Subject: two\r\n\r\n2\r\n"))
    assert re.fullmatch(r"APPENDUID \d+ 1,2", reply.code)
    assert bodies(imap) == [b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n"]
    flags = imap.transact("ok", "FETCH 1:2 (FLAGS INTERNALDATE)").untagged
    assert "\\Seen" in flags[0] and "\\Flagged" in flags[1] and '"01-Jan-2020 00:00:00 +0000"' in flags[1]


def test_multiappend_is_all_or_nothing(imap):
    """A message that cannot be stored (over APPENDLIMIT, a bad URL, an empty one) leaves
    none of the command's messages, those before it included."""
    limit = int(re.search(r"APPENDLIMIT=(\d+)", imap.transact("ok", "CAPABILITY").untagged[0]).group(1))
    first = literal(b"Subject: a\r\n\r\na\r\n")
    grows = b"Subject: big\n\n" + b"\n" * (limit // 2)  # under the limit until its LFs are CRLF
    reply = imap.transact("no", b"APPEND INBOX " + first + b" " + literal(grows))
    assert reply.code == "TOOBIG"
    assert imap.transact("bad", b"APPEND INBOX " + first + b" {0+}\r\n").text == "empty message"
    assert imap.transact("bad", b"APPEND INBOX CATENATE (TEXT {0+}\r\n)").text == "empty message"
    reply = imap.transact("no", b"APPEND INBOX " + first + b' CATENATE (URL "/INBOX/;uid=99")')
    assert reply.code == "BADURL /INBOX/;uid=99"
    assert imap.transact("ok", "STATUS INBOX (MESSAGES)").untagged == ["STATUS INBOX (MESSAGES 0)"]
    assert imap.transact("no", b"APPEND Nowhere " + first + b" " + first).code == "TRYCREATE"


def test_a_refused_commit_withdraws_the_messages_committed_before_it(server, user, imap):
    """All or nothing also when the store refuses a later message only at its commit (a
    message quota reached by the ones before it): those are removed again."""
    server.accounts.set_quota(user, message_quota=2)
    try:
        server.deliver(user, "already there")
        message = literal(b"Subject: a\r\n\r\na\r\n")
        reply = imap.transact("no", b"APPEND INBOX " + message + b" " + message)
        assert reply.code == "OVERQUOTA"
        imap.transact("ok", "SELECT INBOX")
        assert imap.transact("ok", "FETCH 1:* (UID ENVELOPE)").untagged[-1].count("FETCH") == 1
        assert imap.transact("ok", "STATUS INBOX (MESSAGES)").untagged[-1] == "STATUS INBOX (MESSAGES 1)"
    finally:
        server.accounts.set_quota(user, message_quota=0)


# -- CATENATE ----------------------------------------------------------------------------------

def test_catenate_joins_text_and_urls_to_sections_in_order(imap):
    source = (b"From: a@example.test\r\nSubject: src\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
              b"--b\r\nContent-Type: text/plain\r\n\r\npart one\r\n--b\r\n\r\npart two\r\n--b--\r\n")
    uidvalidity = re.search(r"APPENDUID (\d+)", imap.transact("ok", b"APPEND INBOX " + literal(source)).code).group(1)
    imap.transact("ok", "CREATE Out")
    reply = imap.transact("ok", b'APPEND Out (\\Seen) CATENATE (URL "/INBOX/;uid=1/;section=HEADER" TEXT '
                          + literal(b"intro\r\n")
                          + f' URL "/INBOX;UIDVALIDITY={uidvalidity}/;UID=1/;SECTION=2"'.encode()
                          + b" TEXT " + literal(b"-\r\n") + b' URL "imap://localhost/INBOX/;uid=1/;section=1.MIME"'
                          + b' URL "/INBOX/;uid=1/;partial=0.4")')
    assert re.fullmatch(r"APPENDUID \d+ 1", reply.code)
    header = source[:source.index(b"\r\n\r\n") + 4]
    assert bodies(imap, "Out") == [header + b"intro\r\npart two-\r\nContent-Type: text/plain\r\n\r\nFrom"]
    assert "\\Seen" in imap.transact("ok", "FETCH 1 FLAGS").untagged[0]


def test_catenate_refuses_urls_that_name_nothing_here_and_keeps_nothing(server, imap):
    imap.transact("ok", b"APPEND INBOX " + literal(b"Subject: s\r\n\r\nbody\r\n"))
    for url in ("/INBOX;UIDVALIDITY=1/;UID=1", "/INBOX/;UID=2", "/Nowhere/;UID=1", "/INBOX/;UID=1/;SECTION=FOO",
                "imap://someone@else.example/INBOX/;UID=1", "/INBOX/;UID=1/;URLAUTH=anonymous", "INBOX/;UID=1"):
        reply = imap.transact("no", b"APPEND INBOX CATENATE (TEXT " + literal(b"x\r\n") + f' URL "{url}")'.encode())
        assert reply.code == f"BADURL {url}"
    other = server.user()
    server.deliver(other, "theirs")
    reply = imap.transact("no", f'APPEND INBOX CATENATE (URL "imap://{other}@localhost/INBOX/;UID=1")')
    assert reply.code.startswith("BADURL ")
    assert imap.transact("ok", "STATUS INBOX (MESSAGES)").untagged == ["STATUS INBOX (MESSAGES 1)"]
    reply = imap.transact("no", b'APPEND Nowhere CATENATE (URL "/INBOX;UIDVALIDITY=1/;UID=1")')
    assert reply.code == "TRYCREATE"  # the target is said first


def test_catenate_over_appendlimit_is_toobig(imap):
    limit = int(re.search(r"APPENDLIMIT=(\d+)", imap.transact("ok", "CAPABILITY").untagged[0]).group(1))
    half = b"x" * (limit // 2 + 10)
    imap.transact("ok", b"APPEND INBOX " + literal(b"Subject: s\r\n\r\n" + half))
    reply = imap.transact("no", b'APPEND INBOX CATENATE (URL "/INBOX/;UID=1" TEXT ' + literal(half) + b")")
    assert reply.code == "TOOBIG"
    reply = imap.transact("no", b'APPEND INBOX CATENATE (TEXT ' + literal(half) + b' URL "/INBOX/;UID=1")')
    assert reply.code == "TOOBIG"


# -- BINARY ------------------------------------------------------------------------------------

MIXED = (b"From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
         b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b"\0\x01binary\xff") +
         b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 =\r\nsoft  \r\nend\r\n"
         b"--b\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n--b--\r\n")


def test_fetch_binary_decodes_each_part(imap):
    message = MIXED.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    imap.transact("ok", b"APPEND INBOX " + literal(message))
    imap.transact("ok", "SELECT INBOX")
    reply = imap.transact("ok", "FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1] BINARY.PEEK[2] BINARY.SIZE[2] "
                                "BINARY.PEEK[2]<3.4> BINARY.SIZE[])")
    assert b"BINARY[1] ~{9}\r\n\0\x01binary\xff" in reply.raw  # a NUL: literal8
    assert b"BINARY.SIZE[1] 9" in reply.raw
    assert b"BINARY[2] {15}\r\ncaf\xc3\xa9 soft\r\nend " in reply.raw  # soft break, spaces, =XX
    assert b"BINARY.SIZE[2] 15" in reply.raw
    assert b"BINARY[2]<3> {4}\r\n\xc3\xa9 s" in reply.raw
    assert b"BINARY.SIZE[] %d" % len(message) in reply.raw
    assert "\\Seen" not in imap.transact("ok", "FETCH 1 FLAGS").untagged[0]
    reply = imap.transact("no", "FETCH 1 BINARY.PEEK[3]")
    assert reply.code == "UNKNOWN-CTE"
    imap.transact("ok", "FETCH 1 BINARY[1]")
    assert "\\Seen" in imap.transact("ok", "FETCH 1 FLAGS").untagged[0]  # BINARY[] sets it, as BODY[]


def test_a_literal8_appends_binary_parts_as_base64(imap):
    """RFC 3516 §4.4: the octets of a `binary` part come back from BINARY[], and BODY[]
    carries base64 (a NUL, bare LFs, 8-bit octets) rather than the raw octets."""
    octets = bytes(range(256)) + b"\n\r\n\n"
    message = (b"Subject: bin\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
               + octets + b"\r\n--x\r\nContent-Type: text/plain\r\n\r\nplain\r\n--x--\r\n")
    imap.transact("ok", b"APPEND INBOX " + literal(message, binary=True))
    imap.transact("ok", "SELECT INBOX")
    reply = imap.transact("ok", "FETCH 1 (BINARY.PEEK[1] BODY.PEEK[1] BODY.PEEK[1.MIME] BINARY.PEEK[2])")
    assert literals(reply.raw, b"BINARY[1] ") == [octets]
    assert base64.b64decode(literals(reply.raw, b"BODY[1] ")[0]) == octets
    assert b"Content-Transfer-Encoding: base64" in literals(reply.raw, b"BODY[1.MIME] ")[0]
    assert literals(reply.raw, b"BINARY[2] ") == [b"plain"]


def test_multiappend_of_every_form_mixed(imap):
    """Each literal's head is parsed from the previous literal on (imapd/appending.py): a
    CATENATE list left open, closed, and followed by other forms keeps every part in place."""
    imap.transact("ok", b"APPEND INBOX " + literal(b"Subject: src\r\n\r\nsource body\r\n"))
    reply = imap.transact("ok", b"APPEND INBOX (\\Seen) " + literal(b"Subject: 1\r\n\r\none\r\n")
                          + b" CATENATE (TEXT " + literal(b"Subject: 2\r\n\r\n") + b' URL "/INBOX/;UID=1/;SECTION=TEXT"'
                          + b" TEXT " + literal(b"two\r\n") + b")"
                          + b' (\\Flagged) CATENATE (URL "/INBOX/;UID=1")'
                          + b" " + literal(b"Subject: 4\r\n\r\nfour\r\n")
                          + b" CATENATE (URL \"/INBOX/;UID=1/;SECTION=HEADER\" TEXT " + literal(b"five\r\n") + b")")
    assert re.fullmatch(r"APPENDUID \d+ 2,3,4,5,6", reply.code)
    assert bodies(imap)[1:] == [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\nsource body\r\ntwo\r\n",
                                b"Subject: src\r\n\r\nsource body\r\n", b"Subject: 4\r\n\r\nfour\r\n",
                                b"Subject: src\r\n\r\nfive\r\n"]
    flags = imap.transact("ok", "FETCH 2:4 FLAGS").untagged
    assert "\\Seen" in flags[0] and "\\Seen" not in flags[1] and "\\Flagged" in flags[2]


def test_a_multiappend_over_the_message_limit_keeps_nothing(imap):
    """Past MAX_APPEND_MESSAGES no delivery is opened for the messages still arriving, and
    the command is refused whole (LIMIT); 100 messages, the last a CATENATE of several TEXT
    parts, still go."""
    message = literal(b"Subject: m\r\n\r\nm\r\n")
    reply = imap.transact("bad", b"APPEND INBOX" + (b" " + message) * 150)
    assert reply.code == "LIMIT"
    assert imap.transact("ok", "STATUS INBOX (MESSAGES)").untagged == ["STATUS INBOX (MESSAGES 0)"]
    last = b" CATENATE (TEXT " + literal(b"Subject: last\r\n\r\n") + b" TEXT " + literal(b"end\r\n") + b")"
    reply = imap.transact("ok", b"APPEND INBOX" + (b" " + message) * 99 + last)
    assert reply.code.endswith(",100")
    assert bodies(imap)[-1] == b"Subject: last\r\n\r\nend\r\n"
