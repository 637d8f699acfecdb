"""Binary MIME parts of an APPENDed message turned into base64 as the bytes stream by
(RFC 3516 §4.4, RFC 2045 §6.2). Sans-IO:

    converter = BinaryConverter()
    out = converter.feed(piece)   # any number of times: the converted bytes so far
    out = converter.end()         # the rest

A client that sends APPEND's message as a literal8 (`~{n}`) may send parts whose
Content-Transfer-Encoding is `binary`: octets that IMAP's BODY[...] cannot carry (NUL, lines
of any length). The store keeps what every reader can take: each such part gets
`Content-Transfer-Encoding: base64` and its body encoded, in lines of 76 characters; FETCH
BINARY[...] decodes it again (imapd/decoding.py), so the client reads back its octets. Every
other part goes through untouched. Dovecot's istream-binary-converter does the same.

How: the message is read line by line, its MIME structure followed with a stack of the
boundaries open: a header (at most MAX_HEADER octets, then the rest passes untouched) is
read whole and decides its part's fate; a multipart pushes its boundary; a message/rfc822
part's body is a header again; a delimiter line `--boundary` of any open multipart ends the
part (its CRLF before the delimiter belongs to the delimiter, RFC 2046 §5.1.1, so the line
end held last is only given out once the next line shows it was not one). A body line
longer than MAX_HEADER octets is passed on in pieces: it cannot start a delimiter.
Memory held: about MAX_HEADER, the nesting bounded by MAX_DEPTH (deeper, parts pass
untouched).
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import email.utils
import re

MAX_HEADER = 64 * 1024
MAX_DEPTH = 32
_B64_LINE = 57  # octets per 76-character base64 line
_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
_CTE_FIELD = re.compile(rb"content-transfer-encoding[ \t]*:", re.IGNORECASE)

_HEADER, _BODY, _BASE64, _PASS = range(4)


class BinaryConverter:
    def __init__(self) -> None:
        self._mode = _HEADER
        self._boundaries: list[bytes] = []  # delimiters (b"--" + boundary) open, outermost first
        self._enclosing_digest = False
        self._line = bytearray()  # the line being read (no LF yet)
        self._at_line_start = True  # _line starts a line (else a long line's pieces went on)
        self._header = bytearray()
        self._held_end = b""  # a body's last line end, which may belong to a delimiter
        self._b64 = bytearray()  # binary octets not yet encoded (fewer than _B64_LINE)
        self._b64_lines = 0  # base64 lines given out for this part

    def feed(self, piece: bytes) -> bytes:
        if self._mode == _PASS:
            return piece
        out: list[bytes] = []
        start = 0
        while True:
            end = piece.find(b"\n", start)
            if end < 0:
                self._line += piece[start:]
                if len(self._line) > MAX_HEADER:
                    self._long_line(out)
                return b"".join(out)
            self._line += piece[start:end + 1]
            start = end + 1
            line = bytes(self._line)
            self._line.clear()
            self._take_line(line, out)
            self._at_line_start = True
            if self._mode == _PASS:
                out.append(piece[start:])
                return b"".join(out)

    def end(self) -> bytes:
        out: list[bytes] = []
        if self._line:
            line = bytes(self._line)
            self._line.clear()
            self._take_line(line, out)
        if self._mode == _HEADER:
            out.append(bytes(self._header))  # a header with no body
            self._header.clear()
        elif self._mode == _BASE64:
            self._b64 += self._held_end
            self._held_end = b""
            self._flush_b64(out, final=True)
        out.append(self._held_end)
        self._held_end = b""
        return b"".join(out)

    # -- lines --------------------------------------------------------------------------------

    def _take_line(self, line: bytes, out: list[bytes]) -> None:
        if self._at_line_start and line.startswith(b"--") and self._delimiter(line, out):
            return
        if self._mode == _HEADER:
            self._header += line
            if line in (b"\r\n", b"\n"):
                self._header_done(out)
            elif len(self._header) > MAX_HEADER:
                self._give_up(out)
            return
        content, end = _split_end(line)
        if self._mode == _BASE64:
            self._b64 += self._held_end + content
            self._flush_b64(out, final=False)
        else:
            out.append(self._held_end + content)
        self._held_end = end

    def _long_line(self, out: list[bytes]) -> None:
        """A line over MAX_HEADER with no LF yet: not a delimiter, so its octets go on."""
        if self._mode == _HEADER:
            self._header += self._line
            self._line.clear()
            self._give_up(out)
            return
        data = bytes(self._line)
        self._line.clear()
        if self._mode == _BASE64:
            self._b64 += self._held_end + data
            self._flush_b64(out, final=False)
        else:
            out.append(self._held_end + data)
        self._held_end = b""
        self._at_line_start = False

    def _delimiter(self, line: bytes, out: list[bytes]) -> bool:
        """Whether `line` is a delimiter of an open multipart; if so it is given out and the
        structure moves on."""
        text = line.rstrip(b"\r\n").rstrip(b" \t")  # RFC 2046 §5.1.1: transport padding
        for depth in range(len(self._boundaries) - 1, -1, -1):
            delimiter = self._boundaries[depth]
            if not text.startswith(delimiter):
                continue
            rest = text[len(delimiter):]
            if rest not in (b"", b"--"):
                continue
            self._end_part(out)
            out.append(line)
            if rest == b"--":
                del self._boundaries[depth:]  # its epilogue: body lines of the outer part
                self._mode = _BODY
            else:
                del self._boundaries[depth + 1:]
                self._mode = _HEADER
            return True
        return False

    def _end_part(self, out: list[bytes]) -> None:
        if self._mode == _BASE64:
            self._flush_b64(out, final=True)
        elif self._mode == _HEADER:
            out.append(bytes(self._header))
            self._header.clear()
        out.append(self._held_end)
        self._held_end = b""

    # -- a part's header decides -------------------------------------------------------------

    def _header_done(self, out: list[bytes]) -> None:
        header = bytes(self._header)
        self._header.clear()
        fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            _UNFOLD.sub(b"", header))
        content_type = fields.get_content_type()
        encoding = (fields.get("content-transfer-encoding") or "").strip().lower()
        boundary = fields.get_param("boundary") if content_type.startswith("multipart/") else None
        if isinstance(boundary, tuple):  # an RFC 2231 value
            boundary = email.utils.collapse_rfc2231_value(boundary)
        if boundary and len(self._boundaries) < MAX_DEPTH:
            out.append(header)
            self._boundaries.append(b"--" + boundary.encode("latin-1", "replace"))
            self._mode = _BODY  # the preamble, then the first delimiter
        elif content_type in ("message/rfc822", "message/global") and encoding != "binary":
            out.append(header)
            self._mode = _HEADER
        elif encoding == "binary":
            out.append(_with_base64(header))
            self._mode = _BASE64
            self._b64_lines = 0
        else:
            out.append(header)
            self._mode = _BODY

    def _give_up(self, out: list[bytes]) -> None:
        """A header too big to judge: the rest of the message goes through as it is."""
        out.append(bytes(self._header) + bytes(self._line))
        self._header.clear()
        self._line.clear()
        self._mode = _PASS

    def _flush_b64(self, out: list[bytes], final: bool) -> None:
        whole = len(self._b64) - len(self._b64) % _B64_LINE
        lines = [binascii.b2a_base64(self._b64[i:i + _B64_LINE], newline=False)
                 for i in range(0, whole, _B64_LINE)]
        if final and whole < len(self._b64):
            lines.append(binascii.b2a_base64(self._b64[whole:], newline=False))
            whole = len(self._b64)
        del self._b64[:whole]
        for line in lines:
            # Lines are separated, not ended, by CRLF: the line end after the last one is
            # the one the delimiter owns.
            out.append((b"\r\n" if self._b64_lines else b"") + line)
            self._b64_lines += 1
        if final:
            self._b64_lines = 0


def _split_end(line: bytes) -> tuple[bytes, bytes]:
    if line.endswith(b"\r\n"):
        return line[:-2], b"\r\n"
    if line.endswith(b"\n"):
        return line[:-1], b"\n"
    return line, b""


def _with_base64(header: bytes) -> bytes:
    """The header with its Content-Transfer-Encoding field (continuation lines too) made
    `base64`."""
    lines = header.splitlines(keepends=True)
    out: list[bytes] = []
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = bool(_CTE_FIELD.match(line))
        out.append(b"Content-Transfer-Encoding: base64\r\n" if skipping else line)
    return b"".join(out)
