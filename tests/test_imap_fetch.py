"""FETCH rendering (imapd.fetch) and IMAP value formatting (imapd.responses) against a real
store: messages are delivered into a Store in a tmp data dir, fetched back with
Store.fetch() and rendered; the expected bytes are written out by hand in the form
Dovecot answers for the same message, with two known differences of the store's cache:
the transfer encoding is upper case ("7BIT", Dovecot echoes the header's "7bit"), and a
last line without a line break counts as a line (Dovecot counts LFs only, so it says 0
for a part "Hi Alice." that ends where the boundary's CRLF begins)."""

from __future__ import annotations

import pytest

from imapd import responses
from imapd.fetch import render, sets_seen
from imapd.syntax import FetchItem, Section
from storage import open_data_dir
from storage.store import Store

ALICE = "alice@example.test"


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


PLAIN = crlf("""\
From: "Doe, John" <john@example.org>
To: alice@example.test
Subject: plain
Date: Mon, 23 Nov 2026 10:00:00 +0000
Message-ID: <plain@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Hello,
world.
""")

ALTERNATIVE = crlf("""\
From: Bob <bob@example.org>
To: Alice <alice@example.test>
Subject: alternative
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt-1"

--alt-1
Content-Type: text/plain; charset=us-ascii

Hi Alice.
--alt-1
Content-Type: text/html; charset=us-ascii

<p>Hi Alice.</p>
--alt-1--
""")

MIXED = crlf("""\
From: Bob <bob@example.org>
To: Alice <alice@example.test>
Subject: report
MIME-Version: 1.0
Content-Type: multipart/mixed;
 boundary="==b1=="

This is a multi-part message in MIME format.

--==b1==
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: 8bit
Content-Language: en, de

The report is attached.

--==b1==
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename="report.pdf"
Content-Transfer-Encoding: base64
Content-ID: <pdf@example.org>
Content-Description: Quarterly report
Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==
Content-Location: http://example.org/report.pdf

JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K
--==b1==
Content-Type: image/png
Content-Disposition: inline

iVBORw0KGgo=
--==b1==--
""")

NESTED = crlf("""\
From: Bob <bob@example.org>
To: Alice <alice@example.test>
Subject: nested
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: multipart/alternative; boundary=alt

--alt
Content-Type: text/plain; charset=us-ascii

Hi there.

--alt
Content-Type: text/html; charset=us-ascii

<b>Hi</b> there.

--alt--

--outer
Content-Type: text/csv; name=data.csv
Content-Disposition: attachment; filename=data.csv

a,b
1,2

--outer--
""")

INNER = crlf("""\
From: Carol <carol@example.net>
To: Alice <alice@example.test>
Subject: inner
Date: Mon, 23 Nov 2026 08:00:00 -0500
Message-ID: <inner@example.net>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=utf-8

plain text
--inner
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>html</p>
--inner--
""")

FORWARD = crlf("""\
From: Alice <alice@example.test>
To: bob@example.org
Subject: fwd
Date: Tue, 24 Nov 2026 09:30:00 +0100
Message-ID: <outer@example.test>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain; charset=us-ascii

See attached.
--outer
Content-Type: message/rfc822
Content-Description: forwarded

""") + INNER + crlf("""
--outer--
""")

NO_BODY = b"From: daemon@example.org\r\nSubject: no body"

HEADERS = crlf("""\
From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.de>
Sender: Jörg <joerg@example.de>
To: Friends: anne@example.org, "Bob \\"B\\" Smith" <bob@example.org>;, carol@example.net
Cc: undisclosed-recipients:;
Subject: =?utf-8?b?R3LDvMOfZQ==?= and
 folded "quoted" \\back
Date: Wed, 25 Nov 2026 12:00:00 +0000
In-Reply-To: <parent@example.org>
Message-ID: <utf8@example.de>
X-Long: first
\tsecond
X-Root: root

Grüße
""")

JAN_5_2024_0100 = 1_704_416_400.0


@pytest.fixture
def store(data_dir):
    with Store(open_data_dir(data_dir, 1)) as s:
        yield s


class Opener:
    """Store.open_message for one message, counting opens and the bytes read."""

    def __init__(self, store: Store, info):
        self.store, self.info = store, info
        self.opens = 0
        self.bytes_read = 0

    def __call__(self):
        self.opens += 1
        f = self.store.open_message(self.info)
        read = f.read

        def counting_read(n=-1):
            data = read(n)
            self.bytes_read += len(data)
            return data

        f.read = counting_read
        return f


def deliver(store: Store, raw: bytes, **kwargs):
    uid = store.deliver([ALICE], raw, internal_date=JAN_5_2024_0100, **kwargs)[0].uid
    (info,) = store.fetch(ALICE, "INBOX", [(uid, uid)])
    assert store.read_message(info) == raw
    return info


def fetch(store: Store, info, *items: FetchItem, **kwargs) -> bytes:
    return render(info, list(items), Opener(store, info), **kwargs)


def body(part: tuple[int, ...] = (), text: str = "", fields: tuple[str, ...] = (), *, peek: bool = True,
         partial: tuple[int, int] | None = None) -> FetchItem:
    return FetchItem("BODY[]", section=Section(part, text, fields), peek=peek, partial=partial)


def section(store: Store, info, *args, **kwargs) -> bytes:
    """Just the data of one section fetch, checked to be labelled and framed right."""
    item = body(*args, **kwargs)
    out = fetch(store, info, item)
    label = b"BODY[" + item.section.spec().encode() + b"]"
    if item.partial:
        label += b"<%d>" % item.partial[0]
    assert out.startswith(label + b" ")
    value = out[len(label) + 1:]
    if value == b'""':
        return b""
    head, _, data = value.partition(b"\r\n")
    assert head == b"{%d}" % len(data) and data
    return data


def after(raw: bytes, marker: bytes, start: int = 0) -> int:
    return raw.index(marker, start) + len(marker)


# -- the simple items ---------------------------------------------------------------------


def test_plain_message_items(store):
    info = deliver(store, PLAIN, flags=["\\Seen", "$Forwarded"])
    opener = Opener(store, info)
    items = [FetchItem(n) for n in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ", "ENVELOPE", "BODY",
                                    "BODYSTRUCTURE")]
    assert render(info, items, opener) == (
        b'UID 1 FLAGS (\\Seen $Forwarded) INTERNALDATE "05-Jan-2024 01:00:00 +0000" RFC822.SIZE 228 '
        b'MODSEQ (%d) ' % info.modseq
        + b'ENVELOPE ("Mon, 23 Nov 2026 10:00:00 +0000" "plain" (("Doe, John" NIL "john" "example.org")) '
          b'(("Doe, John" NIL "john" "example.org")) (("Doe, John" NIL "john" "example.org")) '
          b'((NIL NIL "alice" "example.test")) NIL NIL NIL "<plain@example.org>") '
          b'BODY ("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 16 2) '
          b'BODYSTRUCTURE ("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 16 2 NIL NIL NIL NIL)')
    assert info.modseq > 0 and len(PLAIN) == 228
    assert opener.opens == 0, "nothing here needs the message file"
    assert fetch(store, info, FetchItem("FLAGS"), recent=True) == b"FLAGS (\\Seen $Forwarded \\Recent)"
    with pytest.raises(ValueError):
        fetch(store, info, FetchItem("RFC822.PEEK"))


def test_sections_of_a_plain_message(store):
    info = deliver(store, PLAIN)
    header_end = after(PLAIN, b"\r\n\r\n")
    assert section(store, info) == PLAIN
    assert section(store, info, (), "HEADER") == PLAIN[:header_end]
    assert section(store, info, (), "TEXT") == b"Hello,\r\nworld.\r\n"
    assert section(store, info, (1,)) == b"Hello,\r\nworld.\r\n"  # a non-multipart message is its part 1
    assert section(store, info, (1,), "MIME") == PLAIN[:header_end]  # and its header is part 1's (Dovecot)
    for missing in [((2,), ""), ((1, 1), ""), ((1,), "HEADER"), ((1,), "TEXT"), ((0,), "")]:
        assert section(store, info, *missing) == b""
    assert fetch(store, info, body((2,))) == b'BODY[2] ""'
    assert fetch(store, info, FetchItem("RFC822.TEXT")) == b"RFC822.TEXT {16}\r\nHello,\r\nworld.\r\n"
    assert fetch(store, info, FetchItem("RFC822")) == b"RFC822 {228}\r\n" + PLAIN
    assert fetch(store, info, FetchItem("RFC822.HEADER")) == b"RFC822.HEADER {%d}\r\n" % header_end + PLAIN[
        :header_end]


# -- structures ---------------------------------------------------------------------------


def test_multipart_alternative(store):
    info = deliver(store, ALTERNATIVE)
    assert fetch(store, info, FetchItem("BODYSTRUCTURE"), FetchItem("BODY")) == (
        b'BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 9 1 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7BIT" 16 1 NIL NIL NIL NIL) '
        b'"alternative" ("boundary" "alt-1") NIL NIL NIL) '
        b'BODY (("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 9 1)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7BIT" 16 1) "alternative")')
    assert section(store, info, (1,)) == b"Hi Alice."
    assert section(store, info, (2,)) == b"<p>Hi Alice.</p>"
    assert section(store, info, (2,), "MIME") == b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    assert section(store, info, (3,)) == b""
    assert section(store, info, (), "TEXT") == ALTERNATIVE[after(ALTERNATIVE, b"\r\n\r\n"):]


def test_multipart_mixed_with_attachments(store):
    info = deliver(store, MIXED)
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")) == (
        b'BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "8BIT" 25 1 NIL NIL ("en" "de") NIL)'
        b'("application" "pdf" ("name" "report.pdf") "<pdf@example.org>" "Quarterly report" "BASE64" 64 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("attachment" ("filename" "report.pdf")) NIL "http://example.org/report.pdf")'
        b'("image" "png" NIL NIL NIL "7BIT" 12 NIL ("inline" NIL) NIL NIL) '
        b'"mixed" ("boundary" "==b1==") NIL NIL NIL)')
    assert fetch(store, info, FetchItem("BODY")) == (
        b'BODY (("text" "plain" ("charset" "utf-8") NIL NIL "8BIT" 25 1)'
        b'("application" "pdf" ("name" "report.pdf") "<pdf@example.org>" "Quarterly report" "BASE64" 64)'
        b'("image" "png" NIL NIL NIL "7BIT" 12) "mixed")')
    assert section(store, info, (1,)) == b"The report is attached.\r\n"
    assert section(store, info, (2,)) == b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K"
    assert section(store, info, (3,)) == b"iVBORw0KGgo="
    pdf_header = MIXED[MIXED.index(b"Content-Type: application/pdf"):after(MIXED, b"report.pdf\r\n\r\n")]
    assert section(store, info, (2,), "MIME") == pdf_header and pdf_header.count(b"\r\n") == 8
    assert section(store, info, (), "HEADER.FIELDS", ("Content-Type",)) == (
        b'Content-Type: multipart/mixed;\r\n boundary="==b1=="\r\n\r\n')


def test_nested_multipart(store):
    info = deliver(store, NESTED)
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")) == (
        b'BODYSTRUCTURE ((("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 11 1 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7BIT" 18 1 NIL NIL NIL NIL) '
        b'"alternative" ("boundary" "alt") NIL NIL NIL)'
        b'("text" "csv" ("name" "data.csv" "charset" "us-ascii") NIL NIL "7BIT" 10 2 NIL '
        b'("attachment" ("filename" "data.csv")) NIL NIL) '
        b'"mixed" ("boundary" "outer") NIL NIL NIL)')
    assert fetch(store, info, FetchItem("BODY")) == (
        b'BODY ((("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 11 1)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7BIT" 18 1) "alternative")'
        b'("text" "csv" ("name" "data.csv" "charset" "us-ascii") NIL NIL "7BIT" 10 2) "mixed")')
    alternative = NESTED[after(NESTED, b"boundary=alt\r\n\r\n"):NESTED.index(b"\r\n--outer\r\nContent-Type: text/csv")]
    assert alternative.startswith(b"--alt\r\n") and alternative.endswith(b"--alt--\r\n")
    assert section(store, info, (1,)) == alternative
    assert section(store, info, (1,), "MIME") == b"Content-Type: multipart/alternative; boundary=alt\r\n\r\n"
    assert section(store, info, (1, 1)) == b"Hi there.\r\n"
    assert section(store, info, (1, 2)) == b"<b>Hi</b> there.\r\n"
    assert section(store, info, (1, 2), "MIME") == b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    assert section(store, info, (2,)) == b"a,b\r\n1,2\r\n"
    assert section(store, info, (1, 1, 1)) == b"Hi there.\r\n"  # a leaf is its own part 1 (Dovecot)
    for missing in [(1, 3), (3,), (1, 1, 2), (2, 1, 1), (1, 1, 1, 1)]:
        assert section(store, info, missing) == b""
    assert section(store, info, (1,), "TEXT") == b""  # TEXT needs a message/rfc822 part


def test_message_rfc822_with_its_own_multipart(store):
    info = deliver(store, FORWARD)
    envelope = (b'("Mon, 23 Nov 2026 08:00:00 -0500" "inner" (("Carol" NIL "carol" "example.net")) '
                b'(("Carol" NIL "carol" "example.net")) (("Carol" NIL "carol" "example.net")) '
                b'(("Alice" NIL "alice" "example.test")) NIL NIL NIL "<inner@example.net>")')
    assert len(INNER) == 411 and INNER.count(b"\r\n") == 18
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")) == (
        b'BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 13 1 NIL NIL NIL NIL)'
        b'("message" "rfc822" NIL NIL "forwarded" "7BIT" 411 ' + envelope + b' '
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 10 1 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "utf-8") NIL NIL "QUOTED-PRINTABLE" 11 1 NIL NIL NIL NIL) '
        b'"alternative" ("boundary" "inner") NIL NIL NIL) 18 NIL NIL NIL NIL) '
        b'"mixed" ("boundary" "outer") NIL NIL NIL)')
    assert fetch(store, info, FetchItem("BODY")) == (
        b'BODY (("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 13 1)'
        b'("message" "rfc822" NIL NIL "forwarded" "7BIT" 411 ' + envelope + b' '
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 10 1)'
        b'("text" "html" ("charset" "utf-8") NIL NIL "QUOTED-PRINTABLE" 11 1) "alternative") 18) "mixed")')
    inner_header_end = after(INNER, b"\r\n\r\n")
    assert section(store, info, (1,)) == b"See attached."
    assert section(store, info, (2,)) == INNER
    assert section(store, info, (2,), "MIME") == (
        b"Content-Type: message/rfc822\r\nContent-Description: forwarded\r\n\r\n")
    assert section(store, info, (2,), "HEADER") == INNER[:inner_header_end]
    assert section(store, info, (2,), "TEXT") == INNER[inner_header_end:]
    assert section(store, info, (2,), "HEADER.FIELDS", ("Subject", "Date")) == (
        b"Subject: inner\r\nDate: Mon, 23 Nov 2026 08:00:00 -0500\r\n\r\n")
    assert section(store, info, (2, 1)) == b"plain text"
    assert section(store, info, (2, 2)) == b"<p>html</p>"
    assert section(store, info, (2, 2), "MIME") == (
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n")
    assert section(store, info, (2, 1, 1)) == b"plain text"
    for missing in [((2, 3), ""), ((2, 1), "HEADER"), ((2, 1, 2), ""), ((1,), "HEADER"), ((3,), "TEXT")]:
        assert section(store, info, *missing) == b""


def test_rfc822_part_enclosing_a_single_part_message(store):
    raw = crlf("""\
Subject: outer
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: message/rfc822

Subject: inner

only text
--b--
""")
    info = deliver(store, raw)
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")) == (
        b'BODYSTRUCTURE (("message" "rfc822" NIL NIL NIL "7BIT" 27 (NIL "inner" NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 9 1 NIL NIL NIL NIL) 3 NIL NIL NIL NIL) '
        b'"mixed" ("boundary" "b") NIL NIL NIL)')
    assert section(store, info, (1,)) == b"Subject: inner\r\n\r\nonly text"
    assert section(store, info, (1, 1)) == b"only text"  # the enclosed message is its part 1
    assert section(store, info, (1,), "TEXT") == b"only text"
    assert section(store, info, (1, 2)) == b""


def test_message_without_a_blank_line(store):
    info = deliver(store, NO_BODY)
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")) == (
        b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 0 0 NIL NIL NIL NIL)')
    assert section(store, info, (), "HEADER") == NO_BODY  # no blank line to add (§6.4.5)
    assert section(store, info, (), "TEXT") == b""
    assert section(store, info, (1,)) == b""
    assert section(store, info, (), "HEADER.FIELDS", ("From",)) == b"From: daemon@example.org\r\n"
    assert section(store, info, (), "HEADER.FIELDS.NOT", ("From",)) == b"Subject: no body"
    assert fetch(store, info, FetchItem("RFC822.TEXT")) == b'RFC822.TEXT ""'


# -- ENVELOPE and header fields -----------------------------------------------------------


def test_envelope_keeps_raw_values_and_groups(store):
    info = deliver(store, HEADERS)
    joerg = b'(("=?utf-8?q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.de"))'
    assert fetch(store, info, FetchItem("ENVELOPE")) == (
        b'ENVELOPE ("Wed, 25 Nov 2026 12:00:00 +0000" '
        b'"=?utf-8?b?R3LDvMOfZQ==?= and folded \\"quoted\\" \\\\back" '
        + joerg + b' (({5}\r\nJ\xc3\xb6rg NIL "joerg" "example.de")) ' + joerg + b' '
        b'((NIL NIL "Friends" NIL)(NIL NIL "anne" "example.org")("Bob \\"B\\" Smith" NIL "bob" "example.org")'
        b'(NIL NIL NIL NIL)(NIL NIL "carol" "example.net")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL '
        b'"<parent@example.org>" "<utf8@example.de>")')
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")) == (
        b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 9 1 NIL NIL NIL NIL)')
    assert section(store, info, (), "TEXT") == "Grüße\r\n".encode()


def test_a_record_msgspec_cannot_read_is_fetched_whole(store):
    # A broken UTF-7 encoded word decodes to a lone surrogate, which the record keeps as a
    # JSON escape (storage/records.py): Store.fetch, which leaves the structure undecoded
    # until asked, falls back to reading the whole record, and both items still render.
    raw = crlf("From: a@example.org\nSubject: =?utf-7?q?+2D0-?=\nMIME-Version: 1.0\n"
               "Content-Type: text/plain; name=\"=?utf-7?q?+2D0-?=\"\n\nbody\n")
    info = deliver(store, raw)
    assert fetch(store, info, FetchItem("ENVELOPE")) == (
        b'ENVELOPE (NIL "=?utf-7?q?+2D0-?=" ((NIL NIL "a" "example.org")) ((NIL NIL "a" "example.org")) '
        b'((NIL NIL "a" "example.org")) NIL NIL NIL NIL NIL)')
    assert fetch(store, info, FetchItem("BODYSTRUCTURE")).startswith(b'BODYSTRUCTURE ("text" "plain" (')
    (again,) = store.fetch(ALICE, "INBOX", [(info.uid, info.uid)])
    assert again == info and again.structure.subtype == "plain"


def test_envelope_kept_rendered_in_the_record_and_an_older_record_without_it(store):
    # The ENVELOPE is rendered at delivery and kept in the message record ("et"): FETCH
    # copies it. A record written before that field has none: FETCH renders the same bytes
    # from the cached envelope, and `store rebuild` writes the field.
    import msgspec

    from storage.check import rebuild
    from storage.shard import uid_key

    info = deliver(store, HEADERS)
    expected = fetch(store, info, FetchItem("ENVELOPE"))
    assert info.envelope_text is not None and b"ENVELOPE " + info.envelope_text.encode() == expected
    shard = store.shard(ALICE)

    def drop_field(txn, batch):
        key = uid_key(info.mailbox_id, info.uid)
        record = msgspec.json.decode(txn.get(key, db=shard.db["msgs"]))
        del record["et"]
        txn.put(key, msgspec.json.encode(record), db=shard.db["msgs"])

    shard.write(drop_field)
    (old,) = store.fetch(ALICE, "INBOX", [(info.uid, info.uid)])
    assert old.envelope_text is None
    assert fetch(store, old, FetchItem("ENVELOPE")) == expected
    assert old.envelope == info.envelope
    rebuild(store, ALICE)
    (rebuilt,) = store.fetch(ALICE, "INBOX", [(info.uid, info.uid)])
    assert b"ENVELOPE " + rebuilt.envelope_text.encode() == expected


def test_header_fields_are_the_stored_lines(store):
    info = deliver(store, HEADERS)
    assert fetch(store, info, body((), "HEADER.FIELDS", ("SUBJECT", "x-LONG"))) == (
        b"BODY[HEADER.FIELDS (SUBJECT x-LONG)] {89}\r\n"
        b'Subject: =?utf-8?b?R3LDvMOfZQ==?= and\r\n folded "quoted" \\back\r\nX-Long: first\r\n\tsecond\r\n\r\n')
    assert section(store, info, (), "HEADER.FIELDS.NOT", ("From", "Sender", "To", "Cc", "Subject", "Date",
                                                          "In-Reply-To", "Message-ID", "x-long")) == (
        b"X-Root: root\r\n\r\n")
    assert section(store, info, (), "HEADER.FIELDS", ("Sender", "X-Missing")) == (
        "Sender: Jörg <joerg@example.de>\r\n\r\n".encode())
    assert section(store, info, (), "HEADER.FIELDS", ("X-Missing",)) == b"\r\n"
    # Field names that are no atoms are echoed as strings, so the response parses.
    assert fetch(store, info, body((), "HEADER.FIELDS", ("X-Odd(", "nil"))) == (
        b'BODY[HEADER.FIELDS ("X-Odd(" "nil")] {2}\r\n\r\n')


def test_repeated_fields_and_odd_spacing(store):
    raw = crlf("""\
Received: from a
\tby b
Subject : spaced
received: from c
X-Received: not this one

body
""")
    info = deliver(store, raw)
    assert section(store, info, (), "HEADER.FIELDS", ("Received", "subject")) == (
        b"Received: from a\r\n\tby b\r\nSubject : spaced\r\nreceived: from c\r\n\r\n")


# -- partials -----------------------------------------------------------------------------


@pytest.mark.parametrize("origin,count", [(0, 10), (10, 100), (0, 100_000), (300, 5), (770, 100), (0, 0)])
def test_partials_are_slices_of_the_raw_message(store, origin, count):
    info = deliver(store, FORWARD)
    assert section(store, info, partial=(origin, count)) == FORWARD[origin:origin + count]
    text_start = after(FORWARD, b"\r\n\r\n")
    assert section(store, info, (), "TEXT", partial=(origin, count)) == FORWARD[text_start:][origin:origin + count]
    inner = FORWARD.index(INNER)
    assert section(store, info, (2,), partial=(origin, count)) == INNER[origin:origin + count]
    assert FORWARD[inner:inner + len(INNER)] == INNER
    fields = b"Subject: inner\r\nDate: Mon, 23 Nov 2026 08:00:00 -0500\r\n\r\n"
    assert section(store, info, (2,), "HEADER.FIELDS", ("Subject", "Date"), partial=(origin, count)) == (
        fields[origin:origin + count])


def test_partial_labels(store):
    info = deliver(store, PLAIN)
    assert fetch(store, info, body(partial=(0, 4))) == b"BODY[]<0> {4}\r\nFrom"
    assert fetch(store, info, body(partial=(0, 2048))) == b"BODY[]<0> {228}\r\n" + PLAIN  # §6.4.5's note
    assert fetch(store, info, body((1,), partial=(8, 6))) == b"BODY[1]<8> {6}\r\nworld."
    assert fetch(store, info, body(partial=(5000, 10))) == b'BODY[]<5000> ""'
    assert fetch(store, info, body((), "HEADER.FIELDS", ("To",), partial=(4, 5))) == (
        b"BODY[HEADER.FIELDS (To)]<4> {5}\r\nalice")


# -- the file -----------------------------------------------------------------------------


def test_the_file_is_opened_once_and_read_by_range(store):
    big_text = b"".join(b"line %07d of a big attachment\r\n" % i for i in range(100_000))
    raw = crlf("""\
Subject: big
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

short
--b
Content-Type: text/plain

""") + big_text + b"\r\n--b--\r\n"
    assert len(raw) > 3_000_000
    info = deliver(store, raw)
    opener = Opener(store, info)
    items = [FetchItem("UID"), body((), "HEADER"), body((1,)), body((2,), "MIME"),
             body((), "HEADER.FIELDS", ("Subject",))]
    out = render(info, items, opener)
    assert opener.opens == 1
    assert opener.bytes_read < 300, "only the header and the small parts are read"
    assert out.startswith(b"UID 1 BODY[HEADER] {")
    assert out.endswith(b'BODY[2.MIME] {28}\r\nContent-Type: text/plain\r\n\r\n '
                        b'BODY[HEADER.FIELDS (Subject)] {16}\r\nSubject: big\r\n\r\n')
    opener = Opener(store, info)
    out = render(info, [body((2,))], opener)
    assert out == b"BODY[2] {%d}\r\n" % len(big_text) + big_text
    assert opener.opens == 1 and opener.bytes_read == len(big_text)


def test_sets_seen():
    assert sets_seen([body(peek=False)])
    assert sets_seen([FetchItem("UID"), FetchItem("RFC822")])
    assert sets_seen([FetchItem("RFC822.TEXT")])
    assert not sets_seen([body(peek=True), FetchItem("RFC822.HEADER"), FetchItem("BODY"), FetchItem("FLAGS"),
                          FetchItem("BODYSTRUCTURE"), FetchItem("RFC822.SIZE")])


# -- responses ----------------------------------------------------------------------------


def test_strings_choose_atom_quoted_or_literal():
    assert responses.astring("INBOX") == b"INBOX"
    assert responses.astring("a]b") == b"a]b"
    assert responses.astring("") == b'""'
    assert responses.astring("nil") == b'"nil"'
    assert responses.astring("two words") == b'"two words"'
    assert responses.astring('say "hi" \\o/') == b'"say \\"hi\\" \\\\o/"'
    assert responses.astring("a(b") == b'"a(b"' and responses.astring("a{3}") == b'"a{3}"'
    assert responses.string("plain") == b'"plain"'
    assert responses.string("Grüße") == b"{7}\r\nGr\xc3\xbc\xc3\x9fe"
    assert responses.string(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert responses.string(b"nul\x00") == b"{4}\r\nnul\x00"
    assert responses.string("x" * 1000) == b'"' + b"x" * 1000 + b'"'
    assert responses.string("x" * 1001) == b"{1001}\r\n" + b"x" * 1001
    assert responses.nstring(None) == b"NIL" and responses.nstring("") == b'""'
    assert responses.literal(b"") == b"{0}\r\n"
    with pytest.raises(ValueError):
        responses.quoted("line\r\nbreak")


def test_lists_flags_and_dates():
    assert responses.plist([b"a", b'"b"', b"NIL"]) == b'(a "b" NIL)'
    assert responses.plist([]) == b"()"
    assert responses.flag_list(["\\Seen", "\\Answered", "$Label1"]) == b"(\\Seen \\Answered $Label1)"
    assert responses.flag_list([]) == b"()"
    assert responses.date_time(JAN_5_2024_0100) == b'"05-Jan-2024 01:00:00 +0000"'
    assert responses.date_time(1_700_000_000.75) == b'"14-Nov-2023 22:13:20 +0000"'
    assert responses.date_time(0) == b'"01-Jan-1970 00:00:00 +0000"'
    assert responses.date_time(-86_400 * 365) == b'"01-Jan-1969 00:00:00 +0000"'
    assert responses.date_time(2.0**60) == b'"31-Dec-9999 23:59:59 +0000"'
    assert responses.number(42) == b"42"


def test_mailbox_names_in_modified_utf7():
    assert responses.mailbox("INBOX") == b"INBOX"
    assert responses.mailbox("Sent Items") == b'"Sent Items"'
    assert responses.mailbox("~peter/mail/台北/日本語") == b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"  # RFC 3501 §5.1.3
    assert responses.mailbox("R&D") == b"R&-D"
    assert responses.mailbox("Entwürfe") == b"Entw&APw-rfe"
    assert responses.mailbox("😀") == b"&2D3eAA-"
