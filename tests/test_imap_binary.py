"""The sans-IO pieces of BINARY (RFC 3516): undoing a content transfer encoding
(imapd/decoding.py) and turning a literal8's binary parts into base64 as they stream by
(imapd/binary_parts.py), fed in pieces of every size, and linear in the input."""

from __future__ import annotations

import base64
import random
import time

import pytest

from imapd.binary_parts import MAX_HEADER, BinaryConverter
from imapd.decoding import UnknownEncodingError, decode


def test_decode_identity_base64_and_quoted_printable():
    assert decode(b"a\r\n\0b", None) == decode(b"a\r\n\0b", "8BIT") == decode(b"a\r\n\0b", " binary ") == b"a\r\n\0b"
    assert decode(b"  aGVs    \r\n bG8g  \r\n   d29y  \t \r\n    bGQ= \r\n", "base64") == b"hello world"
    assert decode(b"aGVsbG8", "BASE64") == b"hello"  # the padding missing
    assert decode(b"aGVsbG8=\r\nd29ybGQ=", "base64") == b"hello"  # data ends at the first =
    assert decode(b"aGVsbG8gx", "base64") == b"hello "  # a lone last character is dropped
    assert decode(b"hello  \r\nbar=\r\n\r\nfoo\t= \r\n=62\r\nfoo = \t\r\nbar\r\n=ZZ_x", "quoted-printable") == \
        b"hello\r\nbar\r\nfoo\tb\r\nfoo bar\r\n=ZZ_x"
    with pytest.raises(UnknownEncodingError):
        decode(b"begin 644 x", "x-uuencode")


def convert(message: bytes, sizes=(1, 2, 3, 7, 64, 10_000)) -> bytes:
    """The converter's output, the same whatever the pieces it is fed."""
    outputs = set()
    for size in sizes:
        converter = BinaryConverter()
        out = b"".join(converter.feed(message[i:i + size]) for i in range(0, len(message), size)) + converter.end()
        outputs.add(out)
    rng = random.Random(5)
    converter, pos, out = BinaryConverter(), 0, []
    while pos < len(message):
        step = rng.randint(1, 10)
        out.append(converter.feed(message[pos:pos + step]))
        pos += step
    outputs.add(b"".join(out) + converter.end())
    assert len(outputs) == 1
    return outputs.pop()


OCTETS = bytes(range(256)) + b"\r\n--not-it\r\n\n\r"


def test_a_binary_part_becomes_base64_and_the_rest_stays():
    message = (b"Subject: x\r\nContent-Type: multipart/mixed;\r\n boundary=\"b b\"\r\n\r\npreamble\r\n"
               b"--b b\r\nContent-Type: text/plain\r\n\r\nplain \xff text\r\n"
               b"--b b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding:\r\n  Binary\r\n\r\n"
               + OCTETS + b"\r\n--b b  \r\nContent-Type: message/rfc822\r\n\r\n"
               b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\nContent-Transfer-Encoding: binary\r\n"
               b"\r\n\0inner\r\n--in--\r\n\r\n--b b--\r\nepilogue\r\n")
    out = convert(message)
    first = out.index(b"Content-Transfer-Encoding: base64\r\n\r\n") + 37
    end = out.index(b"\r\n--b b  \r\n")
    assert base64.b64decode(out[first:end]) == OCTETS
    assert all(len(line) <= 76 for line in out[first:end].split(b"\r\n"))
    second = out.index(b"Content-Transfer-Encoding: base64\r\n\r\n", end) + 37
    assert base64.b64decode(out[second:out.index(b"\r\n--in--")]) == b"\0inner"
    assert out[:first] == message[:message.index(b"Content-Transfer-Encoding:\r\n")] + \
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    assert out.endswith(b"\r\n--in--\r\n\r\n--b b--\r\nepilogue\r\n")
    assert b"  Binary" not in out


def test_messages_without_binary_parts_pass_unchanged():
    for message in (b"Subject: x\r\n\r\nbody \xff\0\r\n", b"Subject: no body", b"",
                    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
                    b"Content-Type: text/plain\n\nbare LFs\n", b"X: " + b"h" * (2 * MAX_HEADER) + b"\r\n\r\nbody"):
        assert convert(message, sizes=(1, 5, 100_000) if len(message) > 1000 else (1, 2, 3, 100)) == message


def test_a_whole_binary_message_and_long_binary_lines():
    body = b"\0" * (3 * MAX_HEADER) + b"\n--x\n" + bytes(range(256))
    out = convert(b"Content-Transfer-Encoding: binary\r\n\r\n" + body, sizes=(1000, 70_000))
    assert base64.b64decode(out.split(b"\r\n\r\n", 1)[1]) == body


def test_conversion_is_linear():
    def cost(n: int) -> float:
        message = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                   + b"\0\n" * n + b"\r\n--b--\r\n")
        start = time.perf_counter()
        converter = BinaryConverter()
        for i in range(0, len(message), 4096):
            converter.feed(message[i:i + 4096])
        converter.end()
        return time.perf_counter() - start
    small, big = cost(50_000), cost(400_000)
    assert big < 8 * small * 3, (small, big)


def test_quoted_printable_decoding_holds_no_more_than_a_few_copies_of_the_part():
    """A part of a million soft line breaks (`=` CRLF) decoded a line at a time held a
    small object per line: 30 times the part's size (a 20 MB part cost 480 MB and 7.6 s
    of a FETCH BINARY.SIZE). The decoded result is the same, made in a few passes."""
    import tracemalloc

    body = b"=\r\n" * 1_000_000 + b"<p>h=C3=A9</p>  \r\n" + b" " * 100_000 + b"x \t"
    tracemalloc.start()
    try:
        out = decode(body, "quoted-printable")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == b"<p>h\xc3\xa9</p>\r\n" + b" " * 100_000 + b"x"
    assert peak < 5 * len(body), peak / len(body)


def test_quoted_printable_line_ends_and_encoded_ends_stay_apart():
    # Bare CR and LF line ends come out CRLF; =0D and =0A are the octets they name.
    assert decode(b"a\rb\nc=0Ad=0D=\n e \r\n", "quoted-printable") == b"a\r\nb\r\nc\nd\r e\r\n"
