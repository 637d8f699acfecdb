"""UTF8=ACCEPT (RFC 6855): after ENABLE, mailbox names are UTF-8 both ways (a session that
did not enable it still sees modified UTF-7), a CHARSET label is refused, APPEND takes its
UTF8 (~{n}) data item. In process (tests/imap_script.py), and once over a socket with
imaplib, which turns UTF-8 mode on when the server enables it."""

from __future__ import annotations


import pytest

from imap_script import ScriptServer
from test_imapd import connect, server, user  # noqa: F401 - fixtures
from test_imapd import PASSWORD

__all__ = ["server", "user"]


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-utf8"))
    yield running
    running.close()


def test_names_are_utf8_once_enabled_and_modified_utf7_before(script):
    account = script.user()
    plain, utf8 = script.login(account), script.login(account)
    assert "UTF8=ACCEPT" in plain.transact("ok", "CAPABILITY").untagged[0].split()
    assert utf8.transact("ok", "ENABLE UTF8=ACCEPT").untagged == ["ENABLED UTF8=ACCEPT"]
    utf8.transact("ok", 'CREATE "Grüße/日本"'.encode())
    utf8.transact("ok", 'CREATE "a&b"')  # an ampersand is itself in UTF-8
    listed = utf8.transact("ok", 'LIST "" "*"').named("LIST")
    assert '(\\HasChildren) "/" "Grüße"' in listed and '(\\HasNoChildren) "/" "Grüße/日本"' in listed
    assert '(\\HasNoChildren) "/" a&b' in listed
    assert '(\\HasNoChildren) "/" Gr&APwA3w-e/&ZeVnLA-' in plain.transact("ok", 'LIST "" "*"').named("LIST")
    assert '(\\HasNoChildren) "/" a&-b' in plain.transact("ok", 'LIST "" "*"').named("LIST")
    assert utf8.transact("ok", 'STATUS "Grüße/日本" (MESSAGES)'.encode()).untagged == [
        'STATUS "Grüße/日本" (MESSAGES 0)']
    utf8.transact("ok", 'SELECT "Grüße"'.encode())
    plain.transact("ok", "SELECT Gr&APwA3w-e")
    assert utf8.transact("no", b'SELECT "\xff\xfe"').code == "CANNOT"  # not UTF-8: as bad modified UTF-7


def test_charset_is_refused_once_enabled(script):
    imap = script.login(script.user())
    imap.transact("ok", "SELECT INBOX")
    imap.transact("ok", "SEARCH CHARSET UTF-8 ALL")
    imap.transact("ok", "ENABLE UTF8=ACCEPT")
    assert imap.transact("bad", "SEARCH CHARSET UTF-8 ALL").text == "no CHARSET but UTF-8 once UTF8=ACCEPT is enabled"
    imap.transact("ok", "SEARCH SUBJECT \"café\"".encode())
    imap.transact("ok", "SORT (SUBJECT) UTF-8 ALL")  # SORT's charset is not optional: UTF-8 goes
    imap.transact("bad", "SORT (SUBJECT) US-ASCII ALL")
    imap.transact("ok", "THREAD REFERENCES UTF-8 ALL")
    imap.transact("bad", "THREAD ORDEREDSUBJECT US-ASCII ALL")


def test_append_utf8_data_item_only_once_enabled(script):
    imap = script.login(script.user())
    message = "Subject: café\r\nFrom: jörg@例え.jp\r\n\r\nhé\r\n".encode()
    item = b"UTF8 (~{%d+}\r\n" % len(message) + message + b")"
    assert imap.transact("bad", b"APPEND INBOX " + item).text.startswith("APPEND's UTF8 data item needs ENABLE")
    imap.transact("ok", "ENABLE UTF8=ACCEPT")
    assert imap.transact("ok", b"APPEND INBOX " + item).code.startswith("APPENDUID")
    imap.transact("ok", "SELECT INBOX")
    assert message in imap.transact("ok", "FETCH 1 BODY.PEEK[]").raw


def test_imaplib_in_utf8_mode(server, user):
    """imaplib switches to UTF-8 when ENABLE UTF8=ACCEPT succeeds; its quoted names go as
    UTF-8 and come back so."""
    client = connect(server)
    client.login(user, PASSWORD)
    typ, data = client.enable("UTF8=ACCEPT")
    assert typ == "OK" and client.utf8_enabled
    assert client.create('"Référence"')[0] == "OK"
    typ, listed = client.list()
    assert b'(\\HasNoChildren) "/" "R\xc3\xa9f\xc3\xa9rence"' in listed
    assert client.select('"Référence"')[0] == "OK"
    client.logout()
    other = connect(server)
    other.login(user, PASSWORD)
    assert b'(\\HasNoChildren) "/" R&AOk-f&AOk-rence' in other.list()[1]
    other.logout()
