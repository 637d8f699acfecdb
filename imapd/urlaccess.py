"""What a URLAUTH-authorized URL (RFC 4467) names, when the fetching user may have it:
URLFETCH (imapd/urlauth.py) and CATENATE (imapd/catenate.py) both read through `lookup`.
Blocking (a store thread's). The checks, in order: the URL is well formed (imapd/urls.py),
not expired, its access identifier admits the user, the owner and the mailbox exist, the
token matches the mailbox's key of now, the UIDVALIDITY if given, the message. Any failure
is the same None: a client learns nothing of why, so nothing of other users' mailboxes.
"""

from __future__ import annotations

import datetime

from imapd import urls, utf7
from imapd.parser import parse_section
from imapd.syntax import ParseError, Section
from storage import StoreError


def lookup(store, accounts, user: str, text: str, now: datetime.datetime):
    """(MessageInfo, Section, partial) a URLAUTH URL names, when `user` may fetch it; None
    otherwise, whatever the reason (blocking: a store thread's)."""
    try:
        url = urls.parse(text)
    except urls.UrlError:
        return None
    if url.token is None or urls.expired(url, now) or not urls.may_fetch(url, user):
        return None
    account = owner(accounts, url)
    if account is None:
        return None
    try:
        name = mailbox_name(url.mailbox)
        section = parse_section(url.section.encode("utf-8")) if url.section else Section()
        mailbox_id, key = store.urlauth_key(account, name)
        if not urls.authorized(url, key) or (url.uidvalidity is not None and url.uidvalidity != mailbox_id):
            return None
        infos = store.fetch(account, name, [(url.uid, url.uid)]) if url.uid else []
    except (ParseError, StoreError, ValueError, utf7.UTF7Error):
        return None
    return (infos[0], section, url.partial) if infos else None


def owner(accounts, url: urls.AuthUrl) -> str | None:
    """The account the URL's user names (the store's name for it), None if none."""
    found = accounts.get_user(url.owner_address())
    return str(found.address) if found is not None else None


def mailbox_name(decoded: str) -> str:
    """The mailbox a URL names: percent-decoded already; modified UTF-7 or UTF-8 (RFC 5092 §6)."""
    if not decoded:
        raise ValueError("no mailbox")
    name = utf7.decode(decoded.encode("ascii")) if decoded.isascii() else decoded
    head, sep, tail = name.partition("/")
    return "INBOX" + sep + tail if head.upper() == "INBOX" else name
