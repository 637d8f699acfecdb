"""The IMAP ENVELOPE of a message (RFC 3501 §7.4.2) as FETCH sends it, rendered from the
cached Envelope: once at delivery (and by `store rebuild`), kept in the message record
(records.MessageRecord.envelope_text), so that FETCH ENVELOPE copies bytes instead of
formatting ~14 strings a message (bench/imap.py: FETCH 1,000 ENVELOPEs). imapd renders
with the same function a record written before the field existed, and the envelope of
a message/rfc822 part in BODYSTRUCTURE.

It lives here, not in imapd, because the store writes it; the quoting rules are RFC
3501's: a value goes quoted when it is 7-bit, has no CR, LF or NUL and is at most
MAX_QUOTED octets, else as a literal; `"` and `\\` are escaped.
"""

from __future__ import annotations

import re

from storage.mime import Envelope, EnvelopeAddress

MAX_QUOTED = 1000  # as imapd.responses: longer strings go as literals
NIL = b"NIL"
MISSING_DOMAIN = "MISSING_DOMAIN"  # host NIL would mean a group (Dovecot's choice)
_QUOTED_BAD = re.compile(rb"[\r\n\0\x80-\xff]")
_NEEDS_ESCAPE = re.compile(rb'["\\]')


def envelope(env: Envelope) -> bytes:
    """RFC 3501 §7.4.2 ENVELOPE from the cached envelope (raw header values)."""
    try:
        return _envelope_quoted(env).encode("ascii")
    except _NeedsLiteral:
        pass
    fields = [_nstring(env.date), _nstring(env.subject)]
    fields += [_address_list(addresses) for addresses in (env.from_, env.sender, env.reply_to, env.to, env.cc, env.bcc)]
    fields += [_nstring(env.in_reply_to), _nstring(env.message_id)]
    return b"(" + b" ".join(fields) + b")"


def envelope_text(env: Envelope) -> str | None:
    """envelope() as the record keeps it (UTF-8 decoded: JSON has no bytes), None when it
    cannot be rendered (a lone surrogate from a broken header): FETCH renders it then."""
    try:
        return envelope(env).decode("utf-8")
    except UnicodeError:
        return None


# The common ENVELOPE, every value 7-bit, short enough to go quoted and with nothing to
# escape, is written as one str. Its values are checked together by one regex search over
# them joined by a separator that is itself plain; any other envelope takes the bytes path.
_PLAIN_QUOTED = re.compile(r'[^\x01-\x09\x0b\x0c\x0e-\x21\x23-\x5b\x5d-\x7f]')  # not 7-bit, CR LF NUL " \\


class _NeedsLiteral(Exception):
    pass


def _envelope_quoted(env: Envelope) -> str:
    values = [env.date, env.subject, env.in_reply_to, env.message_id]
    for addresses in (env.from_, env.sender, env.reply_to, env.to, env.cc, env.bcc):
        if addresses:
            for a in addresses:
                values += (a.name, a.adl, a.mailbox, a.host)
    present = [v for v in values if v is not None]
    if _PLAIN_QUOTED.search("\x01".join(present)) or any(len(v) > MAX_QUOTED for v in present):
        raise _NeedsLiteral
    return (f"({_q(env.date)} {_q(env.subject)} {_addresses(env.from_)} {_addresses(env.sender)} "
            f"{_addresses(env.reply_to)} {_addresses(env.to)} {_addresses(env.cc)} {_addresses(env.bcc)} "
            f"{_q(env.in_reply_to)} {_q(env.message_id)})")


def _q(value: str | None) -> str:
    return "NIL" if value is None else f'"{value}"'


def _addresses(items: tuple[EnvelopeAddress, ...] | None) -> str:
    if not items:
        return "NIL"
    return "(" + "".join(f"({_q(a.name)} {_q(a.adl)} {_q(a.mailbox)} {_q(MISSING_DOMAIN if a.host == '' else a.host)})"
                         for a in items) + ")"


def _address_list(addresses: tuple[EnvelopeAddress, ...] | None) -> bytes:
    if not addresses:
        return NIL
    return b"(" + b"".join(_address(a) for a in addresses) + b")"


def _address(address: EnvelopeAddress) -> bytes:
    host = MISSING_DOMAIN if address.host == "" else address.host
    return b"(" + b" ".join((_nstring(address.name), _nstring(address.adl), _nstring(address.mailbox),
                             _nstring(host))) + b")"


def _nstring(value: str | None) -> bytes:
    """imapd.responses.nstring for a str (RFC 3501 §4.3, §4.5)."""
    if value is None:
        return NIL
    data = value.encode("utf-8")
    if len(data) > MAX_QUOTED or _QUOTED_BAD.search(data):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + _NEEDS_ESCAPE.sub(rb"\\\g<0>", data) + b'"'
