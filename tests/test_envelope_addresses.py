"""The plain-mailbox shortcut of storage/mime.py reads every value as the general address
parser does: a header it takes must give the same ENVELOPE, a header it does not take
must fall through. (IMAP clients see the results through FETCH ENVELOPE, in
test_imap_conform.py and the compliance suite.)"""

import random

import pytest

from storage import mime

# Shapes near the shortcut's edges: the characters that end or change an address.
_CHARS = "abcAZ09.-_+=!#$%&'*/?^`{|}~ \t\"\\()<>@,;:[]é=?"


def _piece(rng: random.Random, longest: int) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, longest)))


def _values(rng: random.Random):
    shapes = [
        lambda: f"{_piece(rng, 6)}@{_piece(rng, 6)}",
        lambda: f"<{_piece(rng, 6)}@{_piece(rng, 6)}>",
        lambda: f'"{_piece(rng, 10)}" <{_piece(rng, 5)}@{_piece(rng, 6)}>',
        lambda: f"{_piece(rng, 10)} <{_piece(rng, 5)}@{_piece(rng, 6)}>",
        lambda: rng.choice(["", " ", "\t"]) + f'"{_piece(rng, 8)}"' + rng.choice(["", " ", "  "]) + "<a.b@c.d>",
        lambda: (rng.choice(["John", "John Smith", "J0hn Q Public", "a  b"]) + " <"
                 + rng.choice(["x", "x.y", "x+tag", "x..y", ".x", "x.", "o'neil"]) + "@"
                 + rng.choice(["d", "d.e", "d-e.f", "d..e", "-d", "d-"]) + ">"),
    ]
    while True:
        yield rng.choice(shapes)()


def test_the_shortcut_reads_as_the_general_parser():
    rng = random.Random(17)
    values = _values(rng)
    taken = 0
    for _ in range(20000):
        value = next(values)
        if mime._SIMPLE_MAILBOX.fullmatch(value):
            taken += 1
        assert mime._addresses(value) == mime._listed_addresses(value), value
    assert taken > 2000  # the comparison covered the shortcut, not only the fall-through


@pytest.mark.parametrize("value, expected", [
    ("o'neil@x.org", (None, "o'neil", "x.org")),
    ('"" <a@b>', (None, "a", "b")),
    ('"  spaced  " <a@b>', ("  spaced  ", "a", "b")),
    ('"Müller, Hans" <h@b.example>', ("Müller, Hans", "h", "b.example")),
    ("Jo Smith <a@b>", ("Jo Smith", "a", "b")),
    (" <a@b> ", (None, "a", "b")),
])
def test_plain_mailboxes(value, expected):
    assert mime._SIMPLE_MAILBOX.fullmatch(value)
    (address,) = mime._addresses(value)
    assert (address.name, address.mailbox, address.host) == expected
    assert address.adl is None


@pytest.mark.parametrize("value", [
    "a@b, c@d", "undisclosed-recipients:;", "a@b (Real Name)", "<@route:a@b>", '"a\\"b" <a@b>',
    "Jo  Smith <a@b>", "=?utf-8?q?J=C3=B6?= <a@b>",
])
def test_everything_else_goes_to_the_general_parser(value):
    assert not mime._SIMPLE_MAILBOX.fullmatch(value)
    assert mime._addresses(value) == mime._listed_addresses(value)
