"""storage.mime.parse_headers: its fast split of plain header blocks reads every block as
email's HeaderParser (compat32) does, which it replaced on the delivery path."""

from __future__ import annotations

import scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.mime import _HEADER_PARSER, parse_headers

CASES = [
    "", "X:\r\n", "X:\n", ": an empty name\r\n", "Subject: hi\r\nFrom: a@b\r\n", "a: b\nc: d\n",
    "Subject:no space\r\nX:  \t spaces and a tab \r\n", "X: a:b:c\r\n", "Subject: trailing  \r\n",
    "Subject: é ü, raw UTF-8\r\n", "Subject: =?utf-8?q?h=C3=A9?=\r\nContent-Type: multipart/mixed; boundary=\"x y\"\r\n",
    "From a@b Mon Dec  2 10:00:00 2026\r\nSubject: an mbox From_ line\r\n",   # not plain: the feedparser's
    "a line without a colon\r\nSubject: y\r\n", "Subject: mixed\r\nTo: line ends\n", "Subject: a\rb\r\n",
    "Subject: a\x0bb\x0cc\u2028d\x85e\x1cf\r\nTo: x\r\n",  # not line ends to email, nor here
    "X-Long: " + "a" * 20000 + "\r\n",
    "Received: one\r\nreceived: two\r\nRECEIVED: three\r\nX: \udcff surrogate\r\n",
]


def same(text: str) -> None:
    fast, slow = parse_headers(text), _HEADER_PARSER.parsestr(text)
    assert fast.items() == slow.items(), text
    assert fast.get_payload() == slow.get_payload(), text
    assert fast.get_unixfrom() == slow.get_unixfrom(), text
    # Looked up by name (an index, in the fast split's message): the same as email's scans.
    names = {name.lower() for name, _ in slow.items()} | {"x", "subject", "missing"}
    for name in names:
        for asked in (name, name.upper(), name.title()):
            assert fast.get(asked) == slow.get(asked), (text, asked)
            assert fast.get_all(asked, "none") == slow.get_all(asked, "none"), (text, asked)
    assert fast.get_param("boundary") == slow.get_param("boundary"), text


def test_known_blocks_read_alike():
    for text in CASES:
        same(text)


_NAME = st.text(st.sampled_from("ABCXYZabcxyz-:0 \t\x7f"), min_size=0, max_size=6)
_VALUE = st.text(st.sampled_from("ab :\t\r\n\x0b\u2028é="), max_size=12)
_LINE = st.tuples(_NAME, st.sampled_from([":", ": ", ":\t", ""]), _VALUE, st.sampled_from(["\r\n", "\n", "\r", ""]))


@settings(max_examples=scale.count(300, 5000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINE, max_size=6))
def test_any_block_reads_alike(lines):
    same("".join(name + colon + value + end for name, colon, value, end in lines))


def test_a_changed_block_is_looked_up_as_email_does():
    """Fields changed after the split (none are on the delivery path) are found all the same."""
    fast = parse_headers("Content-Type: text/plain\r\nX: 1\r\n")
    fast["X"] = "2"
    del fast["content-type"]
    fast.set_param("charset", "utf-8")
    assert fast.get_all("x") == ["1", "2"]
    assert fast.get("content-type") == 'text/plain; charset="utf-8"'
