"""URLAUTH-authorized IMAP URLs (RFC 4467 §3, RFC 5092 §6): parsed, and their token made
and checked. Sans-IO: no store, no session.

    imap://user[;AUTH=...]@host/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s]
        [/;PARTIAL=o[.l]][;EXPIRE=date-time];URLAUTH=access[:mechanism:token]

The part up to and including `;URLAUTH=access` is the rump URL (RFC 4467 §3); GENURLAUTH
appends `:INTERNAL:` and the token, the HMAC-SHA256 of the rump URL as sent, keyed with the
access key of the mailbox it names (storage/urlauth.py), in hex. So every octet of the rump,
its access identifier and expiry included, is covered: a URL changed in any way, or made
before a RESETKEY, fails the check.

access (RFC 4467 §3): `anonymous`, `authuser` (any user of this server), `user+name` (that
user only), `submit+name` (a submission server acting for that user: there is none here,
so an IMAP session never fetches one; GENURLAUTH still makes them).

One regular expression, anchored, with no nested repetition: parsing is linear in the
URL's length, which is bounded (MAX_URL) anyway.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import urllib.parse
from dataclasses import dataclass

MAX_URL = 4096  # octets of one URL: RFC 4467 sets none; a mailbox name and a section fit easily
MECHANISMS = ("INTERNAL",)  # RFC 4467 §7: the one every server offers

_URL = re.compile(
    r"(?P<rump>imap://(?P<user>[^@/;:?]+)(?:;auth=[^@/;?]+)?@(?P<host>[^/;?@]+)"
    r"/(?P<mailbox>[^;?]*?)(?:;uidvalidity=(?P<uidvalidity>[0-9]{1,10}))?/?"
    r";uid=(?P<uid>[0-9]{1,10})"
    r"(?:/;section=(?P<section>[^/;?]*))?"
    r"(?:/;partial=(?P<origin>[0-9]{1,10})(?:\.(?P<length>[0-9]{1,10}))?)?"
    r"(?:;expire=(?P<expire>[0-9A-Za-z:.+\-]{1,64}))?"
    r";urlauth=(?P<access>anonymous|authuser|(?:submit|user)\+[^:;/?@]+(?:@[^:;/?]+)?))"
    r"(?::(?P<mechanism>[A-Za-z0-9.\-]{1,32}):(?P<token>[0-9A-Fa-f]{32,128}))?\Z",
    re.IGNORECASE)


class UrlError(ValueError):
    """Not a URLAUTH URL this server takes."""


@dataclass(frozen=True)
class AuthUrl:
    url: str
    rump: str  # up to and including ";URLAUTH=access"
    user: str  # the owner, as written (percent-decoded)
    host: str
    mailbox: str  # percent-decoded; modified UTF-7 or UTF-8 (RFC 5092 §6)
    uidvalidity: int | None
    uid: int
    section: str  # percent-decoded, "" for the whole message
    partial: tuple[int, int] | None
    expire: datetime.datetime | None
    access: str  # "anonymous", "authuser", "user+name", "submit+name", the name decoded
    mechanism: str | None  # upper case
    token: str | None  # lower-case hex

    def owner_address(self) -> str:
        """The owner's address: the user as written when it has a domain, else user@host."""
        return self.user if "@" in self.user else f"{self.user}@{self.host}"


def parse(url: str) -> AuthUrl:
    """The URL's parts, or UrlError."""
    if len(url) > MAX_URL:
        raise UrlError("URL too long")
    m = _URL.match(url)
    if m is None:
        raise UrlError("not a URLAUTH URL")
    expire = None
    if m.group("expire"):
        try:
            expire = datetime.datetime.fromisoformat(m.group("expire").upper())
        except ValueError:
            raise UrlError("bad EXPIRE") from None
        if expire.tzinfo is None:
            raise UrlError("EXPIRE has no time zone")  # RFC 3339 date-time: it has one
    partial = None
    if m.group("origin") is not None:
        partial = (int(m.group("origin")), int(m.group("length")) if m.group("length") else 2**32)
    kind, _, name = m.group("access").partition("+")
    access = kind.lower() + ("+" + _unquote(name) if name else "")
    return AuthUrl(
        url=url, rump=m.group("rump"), user=_unquote(m.group("user")), host=_unquote(m.group("host")).lower(),
        mailbox=_unquote(m.group("mailbox")),
        uidvalidity=int(m.group("uidvalidity")) if m.group("uidvalidity") else None,
        uid=int(m.group("uid")), section=_unquote(m.group("section") or ""), partial=partial, expire=expire,
        access=access, mechanism=m.group("mechanism").upper() if m.group("mechanism") else None,
        token=m.group("token").lower() if m.group("token") else None)


def _unquote(text: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise UrlError("percent-encoding is not UTF-8") from None


def token(key: bytes, rump: str) -> str:
    """The INTERNAL mechanism's token for a rump URL (RFC 4467 §7)."""
    return hmac.new(key, rump.encode("utf-8"), hashlib.sha256).hexdigest()


def authorized(url: AuthUrl, key: bytes | None) -> bool:
    """Whether the URL carries the token `key` makes for its rump (constant time)."""
    if key is None or url.mechanism not in MECHANISMS or url.token is None:
        return False
    return hmac.compare_digest(token(key, url.rump), url.token)


def expired(url: AuthUrl, now: datetime.datetime) -> bool:
    return url.expire is not None and now >= url.expire


def may_fetch(url: AuthUrl, user: str) -> bool:
    """Whether the access identifier lets `user` (the session's account) fetch the URL
    (RFC 4467 §3). User names compare case-insensitively, as account names do."""
    if url.access in ("anonymous", "authuser"):
        return True  # URLFETCH needs a login: every session is an authorized user
    kind, _, name = url.access.partition("+")
    if kind == "user":
        return name.lower() == user.lower()
    return False  # submit+: only a submission server acting for the user, and there is none
