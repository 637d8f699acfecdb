"""MAIL and RCPT arguments (mtad/paths.py): RFC 5321 §4.1.2 paths and ESMTP parameters."""

from __future__ import annotations

import pytest

from mtad.paths import MAX_PATH, PathArgument, is_number, parse_path_argument

TAKEN = [
    ("FROM:<>", "FROM:", PathArgument("", {})),
    ("FROM:<a@b.example>", "FROM:", PathArgument("a@b.example", {})),
    ("from: <a@b.example>", "FROM:", PathArgument("a@b.example", {})),  # keyword case, a space
    ("TO:<c@example.test>", "TO:", PathArgument("c@example.test", {})),
    ("FROM:<a@b.example> SIZE=100 body=8BITMIME SMTPUTF8", "FROM:",
     PathArgument("a@b.example", {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None})),
    ('FROM:<"a>b"@b.example>', "FROM:", PathArgument('"a>b"@b.example', {})),  # ">" quoted
    ('FROM:<"a\\">b"@b.example>', "FROM:", PathArgument('"a\\">b"@b.example', {})),  # an escaped quote
    ("TO:<ålice@example.test>", "TO:", PathArgument("ålice@example.test", {})),
    ("FROM:<a@b.example> X-TAG=ü", "FROM:", PathArgument("a@b.example", {"X-TAG": "ü"})),  # RFC 6531 §3.3
    ("FROM:<" + "a" * (MAX_PATH - 12) + "@b.example>", "FROM:",
     PathArgument("a" * (MAX_PATH - 12) + "@b.example", {})),  # exactly MAX_PATH with the brackets
]

REFUSED = [
    ("FROM:a@b.example", "FROM:"),  # no brackets
    ("TO:<c@example.test>", "FROM:"),  # the other keyword
    ("FROM<a@b.example>", "FROM:"),
    ("FROM:<a@b.example", "FROM:"),  # not closed
    ("FROM:<a<b@b.example>", "FROM:"),  # "<" unquoted
    ("FROM:<@relay.example:a@b.example>", "FROM:"),  # a source route
    ("TO:<postmaster>", "TO:"),  # a bare local part
    ("TO:<c d@example.test>", "TO:"),  # whitespace
    ('FROM:<"a@b.example>', "FROM:"),  # an open quote hides the ">"
    ("FROM:<a@b.example> SIZE=", "FROM:"),  # an empty value
    ("FROM:<a@b.example> =1", "FROM:"),  # no keyword
    ("FROM:<a@b.example> -X", "FROM:"),  # a keyword starts with a letter or digit
    ("FROM:<a@b.example> A=b=c", "FROM:"),  # "=" in a value
    ("FROM:<a@b.example> RET=FULL RET=HDRS", "FROM:"),  # a parameter twice (RFC 3461 §4)
    ("FROM:<a@b.example> ENVID=a envid=b", "FROM:"),
    ("TO:<c@example.test> NOTIFY=NEVER NOTIFY=NEVER", "TO:"),
    ("TO:<c@example.test> ORCPT=rfc822;a@b ORCPT=rfc822;c@d", "TO:"),
    ("FROM:<" + "a" * (MAX_PATH - 11) + "@b.example>", "FROM:"),  # one octet over MAX_PATH
]


@pytest.mark.parametrize(("arg", "keyword", "expected"), TAKEN)
def test_taken(arg, keyword, expected):
    assert parse_path_argument(arg, keyword) == expected


@pytest.mark.parametrize(("arg", "keyword"), REFUSED)
def test_refused(arg, keyword):
    assert parse_path_argument(arg, keyword) is None


def test_numbers_are_ascii_digits():
    assert is_number("0") and is_number("10240")
    assert not is_number("") and not is_number("²") and not is_number("-1") and not is_number("1 ")

