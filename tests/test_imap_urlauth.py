"""URLAUTH (RFC 4467) and URLAUTH=BINARY (RFC 5524), in process (tests/imap_script.py):
GENURLAUTH, URLFETCH, RESETKEY, the access identifiers between two users, expiry, a token
that does not match, the binary forms, CATENATE with a URLAUTH-ed URL, and the limits."""

from __future__ import annotations

import re

import pytest

from imap_script import ScriptServer
from imapd import urls

MULTIPART = (
    "From: a@example.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29y\r\nbGQ=\r\n"
    "--b\r\nContent-Type: text/plain\r\n\r\nplain part\r\n--b--\r\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-urlauth"))
    yield running
    running.close()


def rump(user: str, uid: int = 1, access: str | None = None, mailbox: str = "INBOX", tail: str = "") -> str:
    local, domain = user.split("@")
    return f"imap://{local}@{domain}/{mailbox}/;uid={uid}{tail};urlauth={access or 'user+' + user}"


def gen(imap, url: str) -> str:
    reply = imap.transact("ok", f'GENURLAUTH "{url}" INTERNAL')
    (made,) = reply.named("GENURLAUTH")
    assert made.startswith(url + ":INTERNAL:")
    return made


def urlfetch(imap, url: str) -> str:
    (answer,) = imap.transact("ok", f"URLFETCH {url}").named("URLFETCH")
    assert answer.startswith(url + " ")
    return answer[len(url) + 1:]


def test_urlauth_is_advertised_after_login(server):
    user = server.user()
    assert "URLAUTH" not in server.connect().transact("ok", "CAPABILITY").untagged[0].split()
    caps = server.login(user).transact("ok", "CAPABILITY").untagged[0].split()
    assert {"URLAUTH", "URLAUTH=BINARY"} <= set(caps)


def test_genurlauth_urlfetch_and_resetkey(server):
    user = server.user()
    message = server.deliver(user, subject="one", body="the body")
    imap = server.login(user)
    url = gen(imap, rump(user))
    assert urlfetch(imap, url) == "{%d}\r\n%s" % (len(message), message.decode())
    section = gen(imap, rump(user, tail="/;section=TEXT/;partial=4.4"))
    assert urlfetch(imap, section) == "{4}\r\nbody"
    # The token covers the whole rump URL: any change to it, or another token, is NIL.
    assert urlfetch(imap, url.replace(";uid=1", ";uid=2")) == "NIL"
    assert urlfetch(imap, url[:-4] + ("0000" if not url.endswith("0000") else "1111")) == "NIL"
    assert urlfetch(imap, url.split(":INTERNAL:")[0]) == "NIL"  # a rump URL is not fetched
    imap.transact("ok", "RESETKEY INBOX")
    assert urlfetch(imap, url) == "NIL"
    again = gen(imap, rump(user))
    assert again != url and urlfetch(imap, again).startswith("{")
    assert urlfetch(imap, url) == "NIL"  # a new key never makes an old token good again


def test_resetkey_of_one_mailbox_leaves_the_others(server):
    user = server.user()
    server.deliver(user)
    server.deliver(user, mailbox="Archive")
    imap = server.login(user)
    inbox, archive = gen(imap, rump(user)), gen(imap, rump(user, mailbox="Archive"))
    imap.transact("ok", "RESETKEY Archive INTERNAL")
    assert urlfetch(imap, inbox).startswith("{") and urlfetch(imap, archive) == "NIL"
    archive = gen(imap, rump(user, mailbox="Archive"))
    imap.transact("ok", "RESETKEY")  # every mailbox
    assert urlfetch(imap, inbox) == "NIL" and urlfetch(imap, archive) == "NIL"
    assert imap.transact("no", "RESETKEY INBOX XSECRET").status == "NO"
    assert imap.transact("no", "RESETKEY Nonexistent").status == "NO"


def test_access_identifiers_between_two_users(server):
    alice, bob = server.user(), server.user()
    server.deliver(alice, body="for bob")
    a, b = server.login(alice), server.login(bob)
    for access, bob_may in (("authuser", True), ("anonymous", True), (f"user+{bob}", True),
                            (f"user+{alice}", False), (f"submit+{bob}", False)):
        url = gen(a, rump(alice, access=access))
        assert urlfetch(b, url).startswith("{") is bob_may, access
    # Bob cannot make URLs to Alice's mailbox, nor fetch one made with his own key.
    reply = b.transact("no", f'GENURLAUTH "{rump(alice, access="authuser")}" INTERNAL')
    assert reply.code.startswith("BADURL")
    server.deliver(bob)
    forged = gen(b, rump(bob, access="authuser")).replace(bob.split("@")[0] + "@", alice.split("@")[0] + "@", 1)
    assert urlfetch(b, forged) == "NIL"
    # A mailbox deleted and made again has a new key.
    a.transact("ok", "CREATE Shared")
    a.transact("ok", "APPEND Shared {5+}\r\nhello")
    shared = gen(a, rump(alice, access="authuser", mailbox="Shared"))
    assert urlfetch(b, shared) == "{5}\r\nhello"
    a.transact("ok", "DELETE Shared")
    a.transact("ok", "CREATE Shared")
    a.transact("ok", "APPEND Shared {5+}\r\nhello")
    assert urlfetch(b, shared) == "NIL"


def test_genurlauth_refusals(server):
    user = server.user()
    server.deliver(user)
    imap = server.login(user)
    url = gen(imap, rump(user))
    assert imap.transact("no", f'GENURLAUTH "{url}" INTERNAL').code.startswith("BADURL")  # has a token
    assert imap.transact("no", f'GENURLAUTH "{rump(user)}" XSECRET').code.startswith("BADURL")
    assert imap.transact("no", f'GENURLAUTH "{rump(user, mailbox="Nope")}" INTERNAL').code.startswith("BADURL")
    assert imap.transact("no", 'GENURLAUTH "imap://x/INBOX/;uid=1" INTERNAL').code.startswith("BADURL")


def test_expire(server):
    user = server.user()
    server.deliver(user)
    imap = server.login(user)
    past = gen(imap, rump(user, tail=";expire=2001-01-01T00:00:00Z"))
    future = gen(imap, rump(user, tail=";expire=2999-01-01T00:00:00+02:00"))
    assert urlfetch(imap, past) == "NIL"
    assert urlfetch(imap, future).startswith("{")


def test_urlfetch_binary_bodypartstructure_and_body(server):
    user = server.user()
    imap = server.login(user)
    data = MULTIPART.encode()
    imap.transact("ok", b"APPEND INBOX {%d+}\r\n" % len(data) + data)
    leaf = gen(imap, rump(user, tail="/;section=1"))
    whole = gen(imap, rump(user))
    (answer,) = imap.transact("ok", f"URLFETCH ({leaf} BODYPARTSTRUCTURE BINARY)").named("URLFETCH")
    assert answer == (f'{leaf} (BODYPARTSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "BASE64" 11 0 '
                      'NIL NIL NIL NIL) BINARY {11}\r\nhello world)')
    (answer,) = imap.transact("ok", f"URLFETCH ({leaf} BODY)").named("URLFETCH")
    assert answer == f"{leaf} (BODY {{18}}\r\naGVsbG8gd29y\r\nbGQ=)"
    # BINARY of the whole message: its base64 leaf decoded and marked binary, the rest as is.
    (answer,) = imap.transact("ok", f"URLFETCH ({whole} BINARY)").named("URLFETCH")
    expected = MULTIPART.replace("Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29y\r\nbGQ=",
                                 "Content-Transfer-Encoding: binary\r\n\r\nhello world")
    assert answer == f"{whole} (BINARY {{{len(expected)}}}\r\n{expected})"
    # Several URLs, one response; a bad one is NIL in its place.
    reply = imap.transact("ok", f"URLFETCH {leaf} imap://nobody@example.test/INBOX/;uid=1;urlauth=anonymous")
    assert reply.named("URLFETCH") == [
        f"{leaf} {{18}}\r\naGVsbG8gd29y\r\nbGQ= imap://nobody@example.test/INBOX/;uid=1;urlauth=anonymous NIL"]


def test_catenate_takes_an_authorized_url_of_another_user(server):
    alice, bob = server.user(), server.user()
    server.deliver(alice, body="quoted text")
    a, b = server.login(alice), server.login(bob)
    url = gen(a, rump(alice, access=f"user+{bob}", tail="/;section=TEXT"))
    b.transact("ok", f'APPEND INBOX CATENATE (TEXT {{9+}}\r\nquoting:  URL "{url}")')
    b.transact("ok", "SELECT INBOX")
    reply = b.transact("ok", "FETCH 1 BODY.PEEK[]")
    assert "quoting: quoted text" in reply.untagged[0]
    # Another user's URL without the right token, or not meant for bob, is BADURL.
    bad = b.transact("no", f'APPEND INBOX CATENATE (URL "{url[:-1]}{"0" if url[-1] != "0" else "1"}")')
    assert bad.code.startswith("BADURL")
    carol_only = gen(a, rump(alice, access="user+carol@example.test"))
    assert b.transact("no", f'APPEND INBOX CATENATE (URL "{carol_only}")').code.startswith("BADURL")
    assert len(b.transact("ok", "SEARCH ALL").named("SEARCH")) == 1
    assert re.fullmatch(r"\d+", b.transact("ok", "SEARCH ALL").named("SEARCH")[0])


def test_limits(server):
    user = server.user()
    imap = server.login(user)
    many = " ".join(["imap://a@b/INBOX/;uid=1;urlauth=anonymous"] * 101)
    assert imap.transact("bad", f"URLFETCH {many}").code == "LIMIT"
    long = "imap://a@b/" + "x" * urls.MAX_URL + "/;uid=1;urlauth=anonymous"
    assert imap.transact("bad", f'URLFETCH "{long}"').code == "LIMIT"
    assert imap.transact("bad", "URLFETCH (imap://a@b/INBOX/;uid=1;urlauth=anonymous BODYX)").status == "BAD"
    with pytest.raises(urls.UrlError):
        urls.parse("imap://a@b/INBOX/;uid=1;expire=2001-01-01T00:00:00;urlauth=anonymous")  # no zone


def test_a_refused_url_is_shown_safely_in_badurl(server):
    imap = server.login(server.user())
    reply = imap.transact("no", 'GENURLAUTH "imap://a@b/x]y/;uid=1;urlauth=anonymous" INTERNAL')
    assert reply.code == "BADURL imap://a@b/x%5Dy/;uid=1;urlauth=anonymous"
