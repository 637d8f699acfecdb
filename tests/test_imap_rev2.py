"""IMAP4rev2 (RFC 9051) alongside IMAP4rev1: both advertised, and `ENABLE IMAP4rev2`
switching a session to rev2's answers (RFC 9051 Appendix A, Appendix E). Through the
daemon's own session over a real store (tests/imap_script.py), and once with imaplib over
a socket to a running `postroom serve`.
"""

from __future__ import annotations

import imaplib
import re

import pytest

from conftest import (
    CHEAP_HASHER,
    CHEAP_PASSWORDS,
    LISTENERS,
    client_tls_context,
    free_port,
    render_config,
    start_daemon,
)
from imap_script import PASSWORD, ScriptServer
from storage import Accounts, open_data_dir
from storage.store import Store


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-rev2"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def rev2(server: ScriptServer, user: str):
    imap = server.login(user)
    reply = imap.transact("ok", "ENABLE IMAP4rev2")
    assert reply.untagged == ["ENABLED IMAP4rev2"]
    return imap


# -- advertising and enabling ------------------------------------------------------------------

def test_both_revisions_are_advertised_before_and_after_login(server, user):
    imap = server.connect()
    assert "IMAP4rev1" in imap.greeting.decode() and "IMAP4rev2" in imap.greeting.decode()
    caps = imap.transact("ok", "CAPABILITY").untagged[0].split()
    assert "IMAP4rev1" in caps and "IMAP4rev2" in caps
    imap.transact("ok", f'LOGIN "{user}" "{PASSWORD}"')
    caps = imap.transact("ok", "CAPABILITY").untagged[0].split()
    # RFC 9051 Appendix E: the extensions rev2 folded in are all there for rev1 clients too
    for cap in ("IMAP4rev1", "IMAP4rev2", "NAMESPACE", "UNSELECT", "UIDPLUS", "ESEARCH", "SEARCHRES", "ENABLE",
                "IDLE", "SASL-IR", "LIST-EXTENDED", "LIST-STATUS", "MOVE", "LITERAL+", "SPECIAL-USE", "STATUS=SIZE"):
        assert cap in caps, cap


def test_enable_names_only_what_it_enabled_and_capability_stays(server, user):
    imap = server.login(user)
    before = imap.transact("ok", "CAPABILITY").untagged
    reply = imap.transact("ok", "ENABLE X-UNKNOWN imap4rev2 CONDSTORE")
    assert reply.untagged == ["ENABLED IMAP4rev2 CONDSTORE"]
    assert imap.transact("ok", "ENABLE IMAP4rev2").untagged == ["ENABLED"]  # §6.3.1: only what it enabled
    assert imap.transact("ok", "CAPABILITY").untagged == before  # RFC 9051 §6.3.1


def test_a_rev1_session_keeps_its_answers(server, user):
    imap = server.login(user)
    reply = imap.transact("ok", "SELECT INBOX")
    assert reply.named("RECENT") == ["0"]
    assert not [line for line in reply.untagged if line.startswith("LIST ")]
    server.deliver(user)
    assert imap.transact("ok", "NOOP").named("RECENT") == ["1"]
    assert imap.transact("ok", "SEARCH ALL").untagged == ["SEARCH 1"]
    assert "\\Recent" in imap.transact("ok", "FETCH 1 FLAGS").untagged[0]


# -- SELECT and EXAMINE (RFC 9051 §6.3.2, §6.3.3) --------------------------------------------------

def test_select_answers_list_and_no_recent(server, user):
    server.deliver(user)
    imap = rev2(server, user)
    reply = imap.transact("ok", "SELECT INBOX")
    assert reply.named("EXISTS") == ["1"]
    assert reply.named("RECENT") == []
    assert reply.named("LIST") == ['(\\HasNoChildren \\Subscribed) "/" INBOX']
    assert reply.code == "READ-WRITE"
    assert imap.transact("ok", "FETCH 1 FLAGS").untagged == ["1 FETCH (FLAGS ())"]


def test_examine_lists_attributes_and_closes_the_previous_mailbox(server, user):
    imap = rev2(server, user)
    imap.transact("ok", "CREATE Projects/2026")
    imap.transact("ok", "SUBSCRIBE Projects")
    imap.transact("ok", "SELECT INBOX")
    reply = imap.transact("ok", "EXAMINE Projects")
    assert reply.untagged[0] == "OK [CLOSED] previous mailbox closed"
    assert reply.named("LIST") == ['(\\HasChildren \\Subscribed) "/" Projects']
    assert reply.code == "READ-ONLY"
    special = imap.transact("ok", "EXAMINE Sent").named("LIST")
    assert special == ['(\\HasNoChildren \\Sent \\Subscribed) "/" Sent']


def test_mail_arriving_while_selected_shows_no_recent(server, user):
    imap = rev2(server, user)
    imap.transact("ok", "SELECT INBOX")
    server.deliver(user)
    imap.send(b"i1 IDLE\r\n")
    seen = imap.wait_for(b"EXISTS")
    imap.send(b"DONE\r\n")
    seen += imap.wait_for(b"i1 OK")
    assert b"* 1 EXISTS" in seen and b"RECENT" not in seen
    assert imap.transact("ok", "FETCH 1 FLAGS").untagged == ["1 FETCH (FLAGS ())"]


def test_rev2_session_leaves_recent_to_a_rev1_session(server, user):
    first = server.login(user)
    first.transact("ok", "SELECT INBOX")  # the mailbox's \Recent claims begin (imapd/recent.py)
    first.transact("ok", "UNSELECT")
    server.deliver(user)
    imap = rev2(server, user)
    imap.transact("ok", "SELECT INBOX")
    other = server.login(user)
    assert other.transact("ok", "SELECT INBOX").named("RECENT") == ["1"]


# -- SEARCH answers ESEARCH (RFC 9051 §6.4.4, §7.3.4) ---------------------------------------------

def test_search_answers_esearch(server, user):
    for i in range(4):
        server.deliver(user, subject=f"m{i}")
    imap = rev2(server, user)
    imap.transact("ok", "SELECT INBOX")
    imap.transact("ok", "STORE 3 +FLAGS (\\Seen)")
    reply = imap.transact("ok", "SEARCH UNSEEN")
    assert re.fullmatch(r'ESEARCH \(TAG "x\d+"\) ALL 1:2,4', reply.untagged[0]), reply.untagged
    assert len(reply.untagged) == 1
    uids = imap.transact("ok", "UID FETCH 1:* UID").untagged
    first = int(re.search(r"UID (\d+)", uids[0]).group(1))
    reply = imap.transact("ok", "UID SEARCH ALL")
    assert re.fullmatch(rf'ESEARCH \(TAG "x\d+"\) UID ALL {first}:{first + 3}', reply.untagged[0]), reply.untagged
    reply = imap.transact("ok", "SEARCH SUBJECT nothing-like-this")
    assert re.fullmatch(r'ESEARCH \(TAG "x\d+"\)', reply.untagged[0]), reply.untagged  # no ALL for none
    reply = imap.transact("ok", "SEARCH RETURN (COUNT) ALL")
    assert re.fullmatch(r'ESEARCH \(TAG "x\d+"\) COUNT 4', reply.untagged[0]), reply.untagged


def test_status_deleted(server, user):
    for _ in range(3):
        server.deliver(user)
    imap = rev2(server, user)
    imap.transact("ok", "SELECT INBOX")
    imap.transact("ok", "STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    imap.transact("ok", "UNSELECT")
    status = imap.transact("ok", "STATUS INBOX (MESSAGES DELETED)").untagged
    assert status == ["STATUS INBOX (MESSAGES 3 DELETED 2)"]


def test_list_of_a_subscribed_mailbox_that_is_gone_says_nonexistent(server, user):
    imap = rev2(server, user)
    imap.transact("ok", "CREATE Old")
    imap.transact("ok", "SUBSCRIBE Old")
    imap.transact("ok", "DELETE Old")
    assert imap.transact("ok", 'LIST (SUBSCRIBED) "" Old').named("LIST") == ['(\\NonExistent \\Subscribed) "/" Old']


# -- a real client over a socket -----------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("imapd-rev2")
    data_dir = root / "var"
    sections: dict[str, dict[str, object]] = {
        "server": {"hostname": "mail.example.test", "data_dir": str(data_dir)},
        "tls": {"cert": str(data_dir / "tls/cert.pem"), "key": str(data_dir / "tls/key.pem"), "self_signed": True},
        "storage": {"shards": 2},
        "accounts": dict(CHEAP_PASSWORDS),
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = [f"127.0.0.1:{free_port()}"]
    config_path = root / "postroom.toml"
    config_path.write_text(render_config(sections))
    running = start_daemon(config_path, root)
    accounts = Accounts(data_dir / "accounts.lmdb", hasher=CHEAP_HASHER)
    store = Store(open_data_dir(data_dir, 2))
    try:
        accounts.add_domain("example.test")
        accounts.add_user("rev2@example.test", PASSWORD)
        store.ensure_account("rev2@example.test")
        for i in range(3):
            store.append("rev2@example.test", "INBOX", f"Subject: m{i}\r\n\r\nHello.\r\n".encode())
        yield running
    finally:
        store.close()
        accounts.close()
        assert running.stop() == 0, running.stderr()
    assert "Traceback" not in running.stderr(), running.stderr()


def test_imaplib_enables_rev2_and_reads_its_answers(daemon):
    address = daemon.listen("imap.listen_tls")
    client = imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config), timeout=30)
    try:
        assert "IMAP4REV2" in client.capabilities and "IMAP4REV1" in client.capabilities
        client.login("rev2@example.test", PASSWORD)
        assert client._simple_command("ENABLE", "IMAP4rev2")[0] == "OK"
        assert client.untagged_responses.pop("ENABLED") == [b"IMAP4rev2"]
        typ, data = client.select("INBOX")
        assert (typ, data) == ("OK", [b"3"])
        assert client.untagged_responses.get("LIST") == [b'(\\HasNoChildren \\Subscribed) "/" INBOX']
        assert "RECENT" not in client.untagged_responses
        typ, _ = client.search(None, "ALL")
        assert typ == "OK"
        esearch = client.untagged_responses.pop("ESEARCH")
        assert re.fullmatch(rb'\(TAG "\w+"\) ALL 1:3', esearch[0]), esearch
        assert "SEARCH" not in client.untagged_responses
        typ, data = client.fetch("1", "(FLAGS)")
        assert data == [b"1 (FLAGS ())"]
    finally:
        client.logout()
