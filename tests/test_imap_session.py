"""IMAP semantics, in process: scripted lines through the daemon's own session over a real
store (tests/imap_script.py), a few milliseconds a command. What needs the wire, TLS or a
real client library stays in test_imapd.py.

One store serves the module; each test works in an account of its own.
"""

from __future__ import annotations

import base64
import re

import pytest

from imap_script import PASSWORD, ScriptServer
from imapd import session as imap_session


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-session"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def literal(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


# -- the state table ----------------------------------------------------------------------------


def test_the_state_table():
    states = imap_session.STATES
    anywhere = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
    assert set(states[imap_session.NOT_AUTHENTICATED]) == anywhere | {"STARTTLS", "LOGIN", "AUTHENTICATE"}
    assert set(states[imap_session.SELECTED]) > set(states[imap_session.AUTHENTICATED]) > anywhere
    assert not {"LOGIN", "AUTHENTICATE", "STARTTLS"} & set(states[imap_session.AUTHENTICATED])
    assert set(states[imap_session.SELECTED]) - set(states[imap_session.AUTHENTICATED]) == {
        "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "UID EXPUNGE", "SEARCH", "UID SEARCH", "FETCH", "UID FETCH",
        "STORE", "UID STORE", "COPY", "UID COPY", "MOVE", "UID MOVE", "SORT", "UID SORT", "THREAD", "UID THREAD",
        "CANCELUPDATE"}
    assert states[imap_session.LOGOUT] == {}


def test_commands_in_the_wrong_state(server, user):
    imap = server.connect()
    assert imap.transact("bad", "SELECT INBOX").text == "SELECT is not allowed before login"
    assert imap.transact("bad", "FETCH 1 FLAGS").text == "FETCH is not allowed before login"
    imap.transact("ok", "NOOP")
    imap.transact("ok", f'LOGIN "{user}" "{PASSWORD}"')
    assert imap.transact("bad", "FETCH 1 FLAGS").text == "FETCH is not allowed without a selected mailbox"
    assert imap.transact("bad", f'LOGIN "{user}" "{PASSWORD}"').text.startswith("LOGIN is not allowed")
    imap.transact("ok", "LOGOUT")
    assert imap.conn.closed


def test_login_answers_its_capabilities_and_authenticate_plain(server, user):
    imap = server.connect()
    reply = imap.transact("ok", f'LOGIN "{user}" "{PASSWORD}"')
    assert reply.code.startswith("CAPABILITY IMAP4rev1 ") and "APPENDLIMIT=10485760" in reply.code
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    assert server.connect().transact("ok", f"AUTHENTICATE PLAIN {token}").text == "logged in"
    imap = server.connect()
    imap.send(b"A1 AUTHENTICATE PLAIN\r\n")
    assert imap.read() == b"+ \r\n"
    imap.send(token.encode() + b"\r\n")
    assert imap.wait_for(b"A1 ").startswith(b"A1 OK [CAPABILITY")
    assert imap.transact("bad", f"AUTHENTICATE PLAIN {token}").text.startswith("AUTHENTICATE is not allowed")
    other = base64.b64encode(f"someone\0{user}\0{PASSWORD}".encode()).decode()
    assert server.connect().transact("no", f"AUTHENTICATE PLAIN {other}").code == "AUTHORIZATIONFAILED"
    assert server.connect().transact("no", "AUTHENTICATE CRAM-MD5").code == "CANNOT"


def test_logout_says_bye(server, user):
    imap = server.login(user)
    reply = imap.transact("ok", "LOGOUT")
    assert reply.untagged == ["BYE logging out"]
    assert imap.conn.closed


# -- mailboxes ----------------------------------------------------------------------------------


def test_new_account_lists_its_special_use_mailboxes(server, user):
    imap = server.login(user)
    listed = imap.transact("ok", 'LIST "" *').named("LIST")
    assert '(\\HasNoChildren) "/" INBOX' in listed
    assert '(\\HasNoChildren \\Sent) "/" Sent' in listed
    assert '(\\HasNoChildren \\Trash) "/" Trash' in listed
    assert imap.transact("ok", 'LIST "" ""').untagged == ['LIST (\\Noselect) "/" ""']


def test_create_rename_delete_subscribe_and_list_patterns(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Projects/2026/Q1")
    assert imap.transact("no", "CREATE Projects").code == "ALREADYEXISTS"
    assert imap.transact("ok", 'LIST "" Projects/%').named("LIST") == ['(\\HasChildren) "/" Projects/2026']
    imap.transact("ok", "RENAME Projects Work")
    assert sorted(imap.transact("ok", "LIST Work/ *").named("LIST")) == [
        '(\\HasChildren) "/" Work/2026', '(\\HasNoChildren) "/" Work/2026/Q1']
    imap.transact("ok", "SUBSCRIBE Work/2026/Q1")
    assert '() "/" Work/2026/Q1' in imap.transact("ok", 'LSUB "" *').named("LSUB")
    assert imap.transact("no", "SUBSCRIBE Nope").code == "NONEXISTENT"
    imap.transact("ok", "DELETE Work/2026/Q1")
    assert imap.transact("no", "SELECT Work/2026/Q1").code == "NONEXISTENT"
    imap.transact("no", "DELETE INBOX")
    imap.transact("ok", "CREATE Trailing/")
    assert '(\\HasNoChildren) "/" Trailing' in imap.transact("ok", 'LIST "" Trailing').named("LIST")


def test_the_selected_mailbox_cannot_be_deleted(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Open")
    imap.transact("ok", "SELECT Open")
    assert imap.transact("no", "DELETE Open").code == "INUSE"


def test_international_mailbox_names_travel_in_modified_utf7(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE &ZeVnLIqe-")  # 日本語
    imap.transact("ok", "CREATE Caf&AOk-/R&AOk-sum&AOk-")  # Café/Résumé
    names = {line.rsplit(" ", 1)[1] for line in imap.transact("ok", 'LIST "" *').named("LIST")}
    assert {"&ZeVnLIqe-", "Caf&AOk-", "Caf&AOk-/R&AOk-sum&AOk-"} <= names
    assert {"日本語", "Café/Résumé"} <= {m.name for m in server.store.mailboxes(user)}


def test_special_use_on_create_and_list_extended(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Receipts (USE (\\Archive))")
    assert imap.transact("no", "CREATE Bad (USE (\\Nonsense))").code == "USEATTR"  # RFC 6154 §3
    assert imap.transact("no", "CREATE Two (USE (\\Archive \\Junk))").code == "USEATTR"
    listed = imap.transact("ok", 'LIST (SPECIAL-USE) "" *').named("LIST")
    assert '(\\HasNoChildren \\Archive) "/" Receipts' in listed
    assert all("\\" in line.split(")")[0] for line in listed)  # only special-use mailboxes


def test_status_and_list_status(server, user):
    server.deliver(user)
    server.deliver(user)
    imap = server.login(user)
    status = imap.transact("ok", "STATUS INBOX (MESSAGES UNSEEN UIDNEXT UIDVALIDITY HIGHESTMODSEQ SIZE)").untagged
    assert re.fullmatch(r"STATUS INBOX \(MESSAGES 2 UNSEEN 2 UIDNEXT 3 UIDVALIDITY \d+ HIGHESTMODSEQ \d+ SIZE \d+\)",
                        status[0]), status
    statuses = imap.transact("ok", 'LIST "" % RETURN (STATUS (MESSAGES UNSEEN))').named("STATUS")
    assert "INBOX (MESSAGES 2 UNSEEN 2)" in statuses
    assert "Sent (MESSAGES 0 UNSEEN 0)" in statuses
    assert imap.transact("no", "STATUS Nowhere (MESSAGES)").code == "NONEXISTENT"


def test_lsub_percent_shows_an_unsubscribed_parent_as_noselect(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Parent/Child")
    imap.transact("ok", "SUBSCRIBE Parent/Child")
    assert '(\\Noselect) "/" Parent' in imap.transact("ok", 'LSUB "" %').named("LSUB")
    assert '() "/" Parent/Child' in imap.transact("ok", 'LSUB "" *').named("LSUB")


def test_rename_inbox_moves_its_messages_into_a_new_mailbox(server, user):
    server.deliver(user)
    imap = server.login(user)
    imap.transact("ok", "RENAME INBOX Old")
    assert server.store.mailbox(user, "Old").exists == 1
    assert server.store.mailbox(user, "INBOX").exists == 0


def test_renaming_the_selected_mailbox_keeps_both_sessions(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Folder/Sub")
    other = server.login(user)
    other.transact("ok", "SELECT Folder/Sub")
    imap.transact("ok", "SELECT Folder/Sub")
    imap.transact("ok", "RENAME Folder Renamed")
    # The session follows its mailbox to the new name: the APPEND there is news to it.
    assert imap.transact("ok", b"APPEND Renamed/Sub " + literal(b"Subject: x\r\n\r\ny\r\n")).named("EXISTS") == ["1"]
    assert other.transact("ok", "NOOP").named("EXISTS")[-1:] == ["1"]
    other.transact("ok", "FETCH 1 (UID)")


def test_a_deleted_selected_mailbox_ends_the_other_session(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Doomed")
    other = server.login(user)
    other.transact("ok", "SELECT Doomed")
    imap.transact("ok", "DELETE Doomed")
    other.send(b"n NOOP\r\n")
    assert b"* BYE the selected mailbox was deleted\r\n" in other.read()
    assert other.conn.closed


# -- APPEND -------------------------------------------------------------------------------------


def test_append_then_fetch_exact_bytes_flags_and_date(server, user):
    message = b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nbody line\r\n"
    imap = server.login(user)
    reply = imap.transact("ok", b'APPEND Drafts (\\Draft $Label) " 4-Mar-2025 05:06:07 +0000" ' + literal(message))
    assert re.fullmatch(r"APPENDUID \d+ 1", reply.code)
    imap.transact("ok", "SELECT Drafts")
    fetched = imap.transact("ok", "UID FETCH 1 (FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])").raw
    # \Recent: appended while no session had Drafts open, it is the first SELECT's
    assert fetched.startswith(b'* 1 FETCH (UID 1 FLAGS (\\Draft $Label \\Recent) '
                              b'INTERNALDATE "04-Mar-2025 05:06:07 +0000" '
                              b"RFC822.SIZE %d BODY[] {%d}\r\n" % (len(message), len(message)) + message + b")\r\n")
    assert imap.transact("no", b"APPEND Nowhere " + literal(message)).code == "TRYCREATE"
    assert imap.transact("bad", b"APPEND INBOX {0+}\r\n").text == "empty message"


def test_append_to_a_mailbox_named_by_a_literal(server, user):
    """The mailbox is an astring (RFC 3501 §6.3.11): a literal there is the name, and the
    message after it still streams into the store (found by an attack: the connection died)."""
    message = b"Subject: q\r\n\r\nbody\r\n"
    imap = server.login(user)
    reply = imap.transact("ok", b"APPEND " + literal(b"INBOX") + b" " + literal(message))
    assert re.fullmatch(r"APPENDUID \d+ 1", reply.code)
    reply = imap.transact("ok", b"APPEND {7}\r\nArchive (\\Seen) " + literal(message))  # synchronizing
    assert re.fullmatch(r"APPENDUID \d+ 1", reply.code)
    (archived,) = server.store.fetch(user, "Archive", [(1, 1)])
    assert archived.flags == ("\\Seen",) and server.store.read_message(archived) == message
    (stored,) = server.store.fetch(user, "INBOX", [(1, 1)])
    assert server.store.read_message(stored) == message
    assert imap.transact("no", b"APPEND " + literal(b"Nowhere") + b" " + literal(message)).code == "TRYCREATE"


def test_append_turns_bare_lf_into_crlf(server, user):
    message = b"Subject: lf\n\nline1\n.\nline3\r\nend\n"  # as a raw client may send it
    imap = server.login(user)
    imap.transact("ok", b"APPEND INBOX " + literal(message))
    stored = server.store.fetch(user, "INBOX", [(1, 1)])[0]
    assert server.store.read_message(stored) == b"Subject: lf\r\n\r\nline1\r\n.\r\nline3\r\nend\r\n"
    assert stored.size == len(b"Subject: lf\r\n\r\nline1\r\n.\r\nline3\r\nend\r\n")


def test_append_waits_for_the_continuation_of_a_synchronizing_literal(server, user):
    imap = server.login(user)
    imap.send(b"a1 APPEND INBOX (\\Flagged) {5}\r\n")
    assert imap.read() == b"+ Ready for literal data\r\n"
    imap.send(b"hello\r\n")
    assert imap.read().startswith(b"a1 OK [APPENDUID ")
    assert server.store.fetch(user, "INBOX", [(1, 1)])[0].flags == ("\\Flagged",)


def test_quota_namespace_id_unselect(server, user):
    imap = server.login(user)
    reply = imap.transact("ok", "GETQUOTAROOT INBOX")
    assert reply.untagged == ["QUOTAROOT INBOX"]  # no quota: no quota root
    assert imap.transact("no", 'GETQUOTA ""').code == "NONEXISTENT"
    server.accounts.set_quota(user, 10 * 1024 * 1024, 2)
    server.deliver(user)
    reply = imap.transact("ok", "GETQUOTAROOT INBOX")
    assert reply.untagged[0] == 'QUOTAROOT INBOX ""'
    assert re.fullmatch(r'QUOTA "" \(STORAGE \d+ 10240 MESSAGE 1 2\)', reply.untagged[1]), reply
    server.deliver(user)
    assert imap.transact("no", b"APPEND INBOX " + literal(b"Subject: one too many\r\n\r\nx\r\n")).code == "OVERQUOTA"
    assert imap.transact("no", 'SETQUOTA "" (STORAGE 1)').code == "NOPERM"
    assert imap.transact("ok", "NAMESPACE").untagged == ['NAMESPACE (("" "/")) NIL NIL']
    assert imap.transact("ok", 'ID ("name" "pytest")').untagged == ['ID ("name" "Postroom" "version" "test")']
    imap.transact("ok", "SELECT INBOX")
    imap.transact("ok", "UNSELECT")
    assert "without a selected mailbox" in imap.transact("bad", "FETCH 1 FLAGS").text


# -- SELECT, EXAMINE, \Recent ------------------------------------------------------------------


def test_select_answers_what_rfc_3501_asks(server, user):
    server.deliver(user)
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    server.deliver(user)
    server.deliver(user)
    imap.transact("ok", "STORE 1 +FLAGS (\\Seen)")
    reply = server.login(user).transact("ok", "SELECT INBOX")
    assert reply.code == "READ-WRITE"
    untagged = [re.sub(r"(UIDVALIDITY|HIGHESTMODSEQ) \d+", r"\1 N", line) for line in reply.untagged
                if not line.startswith("OK [MAILBOXID ")]  # RFC 8474: tests/test_imap_objectid.py
    assert untagged == [
        "FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)", "3 EXISTS", "0 RECENT", "OK [UNSEEN 2] first unseen",
        "OK [UIDVALIDITY N] UIDs valid", "OK [UIDNEXT 4] predicted next UID", "OK [HIGHESTMODSEQ N] modseq",
        "OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags allowed"]
    again = imap.transact("ok", "EXAMINE INBOX")
    assert again.untagged[0] == "OK [CLOSED] previous mailbox closed" and again.code == "READ-ONLY"


def test_examine_is_read_only_and_never_sets_seen(server, user):
    server.deliver(user)
    imap = server.login(user)
    reply = imap.transact("ok", "EXAMINE INBOX")
    assert "OK [PERMANENTFLAGS ()] read-only" in reply.untagged and reply.code == "READ-ONLY"
    assert b"\\Seen" not in imap.transact("ok", "FETCH 1 (BODY[])").raw
    assert imap.transact("no", "STORE 1 +FLAGS (\\Flagged)").code == "READ-ONLY"
    assert imap.transact("no", "EXPUNGE").code == "READ-ONLY"
    assert imap.transact("no", "MOVE 1 Trash").code == "READ-ONLY"
    assert server.store.fetch(user, "INBOX", [(1, 1)])[0].flags == ()


def test_examine_takes_recent_from_nobody(server, user):
    first = server.login(user)
    first.transact("ok", "SELECT INBOX")  # the mailbox is known: what arrives next is someone's \Recent
    first.transact("ok", "CLOSE")
    server.deliver(user)
    # EXAMINE shows what nobody has seen as recent, and takes it from nobody (RFC 3501 §6.3.2)
    assert server.login(user).transact("ok", "EXAMINE INBOX").named("RECENT") == ["1"]
    taker = server.login(user)
    assert taker.transact("ok", "SELECT INBOX").named("RECENT") == ["1"]
    assert "FLAGS (\\Recent)" in taker.transact("ok", "FETCH 1 FLAGS").untagged[0]
    assert server.login(user).transact("ok", "SELECT INBOX").named("RECENT") == ["0"]
    assert taker.transact("ok", "SEARCH RECENT").untagged == ["SEARCH 1"]


def test_close_expunges_silently_and_unselect_does_not(server, user):
    for _ in range(3):
        server.deliver(user)
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    imap.transact("ok", "STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    assert imap.transact("ok", "CHECK").text == "CHECK completed"  # a checkpoint; it expunges nothing
    imap.transact("ok", "UNSELECT")
    assert server.store.mailbox(user, "INBOX").exists == 3
    imap.transact("ok", "SELECT INBOX")
    assert imap.transact("ok", "CLOSE").untagged == []
    assert server.store.mailbox(user, "INBOX").exists == 1


# -- FETCH --------------------------------------------------------------------------------------


def test_fetch_macros_and_rfc822_items(server, user):
    server.deliver(user, body="the body")
    server.login(user).transact("ok", "SELECT INBOX")  # takes \Recent: FLAGS below show the store's alone
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    assert re.fullmatch(r'1 FETCH \(FLAGS \(\) INTERNALDATE "[^"]+" RFC822\.SIZE \d+\)',
                        imap.transact("ok", "FETCH 1 FAST").untagged[0])
    assert "ENVELOPE (" in imap.transact("ok", "FETCH 1 ALL").untagged[0]
    full = imap.transact("ok", "FETCH 1 FULL").untagged[0]
    assert "BODY (" in full and "BODYSTRUCTURE" not in full
    stored = server.store.read_message(server.store.fetch(user, "INBOX", [(1, 1)])[0])
    header, _, text = stored.partition(b"\r\n\r\n")
    head = header + b"\r\n\r\n"
    assert imap.transact("ok", "FETCH 1 (RFC822.HEADER)").raw.startswith(
        b"* 1 FETCH (RFC822.HEADER {%d}\r\n%s)\r\n" % (len(head), head))
    assert imap.transact("ok", "FETCH 1 (RFC822.TEXT)").raw.startswith(
        b"* 1 FETCH (RFC822.TEXT {%d}\r\n%s FLAGS (\\Seen))\r\n" % (len(text), text))  # FLAGS follow the literal
    assert imap.transact("ok", "FETCH 1 (RFC822)").raw.startswith(b"* 1 FETCH (RFC822 {%d}\r\n%s FLAGS (\\Seen))\r\n"
                                                                  % (len(stored), stored))


def test_fetch_sections_partials_and_seen(server, user):
    message = (b"From: Ann <ann@example.org>\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
               b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
               b"--b\r\nContent-Type: text/plain\r\n\r\nplain text part\r\n"
               b"--b\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--b--\r\n")
    imap = server.login(user)
    imap.transact("ok", b"APPEND INBOX " + literal(message))
    imap.transact("ok", "SELECT INBOX")
    reply = imap.transact("ok", "FETCH 1 (BODY.PEEK[1] BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[]<0.10> FLAGS)")
    assert reply.raw.startswith(b'* 1 FETCH (BODY[1] {15}\r\nplain text part BODY[HEADER.FIELDS (SUBJECT)] {19}\r\n'
                                b'Subject: report\r\n\r\n BODY[]<0> {10}\r\nFrom: Ann  FLAGS (\\Recent))\r\n'),\
        reply.raw
    reply = imap.transact("ok", "FETCH 1 (BODY[2])")
    assert reply.untagged == ["1 FETCH (BODY[2] {11}\r\n<p>html</p> FLAGS (\\Seen \\Recent))"]  # a non-peek sets \Seen


def test_fetch_never_renumbers_but_the_next_noop_does(server, user):
    for _ in range(3):
        server.deliver(user)
    first, second = server.login(user), server.login(user)
    first.transact("ok", "SELECT INBOX")
    second.transact("ok", "SELECT INBOX")
    second.transact("ok", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    second.transact("ok", "EXPUNGE")
    reply = first.transact("ok", "FETCH 1:3 (UID)")
    assert reply.untagged == ["2 FETCH (UID 2)", "3 FETCH (UID 3)"]  # message 1 is gone, numbers kept
    assert first.transact("ok", "NOOP").untagged == ["1 EXPUNGE"]


def test_implicit_seen_under_condstore_reports_uid_and_modseq(server, user):
    server.deliver(user)
    imap = server.login(user)
    imap.transact("ok", "ENABLE CONDSTORE")
    imap.transact("ok", "SELECT INBOX")
    response = imap.transact("ok", "FETCH 1 (BODY[TEXT])").untagged[0]
    assert re.fullmatch(r"1 FETCH \(UID 1 BODY\[TEXT\] \{14\}\r\nHello there.\r\n "
                        r"FLAGS \(\\Seen \\Recent\) MODSEQ \(\d+\)\)", response), response


# -- STORE, SEARCH, COPY, MOVE, EXPUNGE ----------------------------------------------------------


def test_store_flags_and_conditional_store(server, user):
    for i in range(3):
        server.deliver(user, subject=f"m{i}")
    imap = server.login(user)
    assert imap.transact("ok", "ENABLE CONDSTORE").untagged == ["ENABLED CONDSTORE"]
    imap.transact("ok", "SELECT INBOX")
    fetches = imap.transact("ok", "STORE 1:2 +FLAGS (\\Flagged)").named("FETCH")
    assert len(fetches) == 2 and all("\\Flagged" in f for f in fetches)
    assert imap.transact("ok", "STORE 1 -FLAGS.SILENT (\\Flagged)").untagged == []
    # $Work is new to the mailbox: announced (FLAGS, PERMANENTFLAGS) before the FETCH
    assert "FLAGS (\\Seen $Work \\Recent)" in imap.transact("ok", "STORE 3 FLAGS (\\Seen $Work)").named("FETCH")[0]
    modseqs = [int(m) for m in re.findall(r"MODSEQ \((\d+)\)", " ".join(imap.transact("ok", "FETCH 1:3 (MODSEQ)")
                                                                         .untagged))]
    reply = imap.transact("ok", f"STORE 1:3 (UNCHANGEDSINCE {min(modseqs)}) +FLAGS (\\Answered)")
    # Message 2 was changed once, 1 and 3 again later: those two fail the condition.
    assert reply.code == "MODIFIED 1,3" and reply.text == "conditional STORE failed"
    assert imap.transact("ok", "STORE 1 +FLAGS (\\Recent)").untagged == ["1 FETCH (FLAGS (\\Recent) UID 1 MODSEQ (%d))"
                                                                         % modseqs[0]]
    assert imap.transact("bad", "STORE 1 +FLAGS (\\Bogus)").code is None


def test_search_keys(server, user):
    server.deliver(user, subject="quarterly report", body="the xylophonist played")
    server.deliver(user, subject="lunch", body="sandwiches")
    server.deliver(user, subject="=?utf-8?q?caf=C3=A9?= plans", body="meet at noon")
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    imap.transact("ok", "STORE 2 +FLAGS (\\Seen)")

    def search(criteria: str | bytes) -> str:
        return imap.transact("ok", criteria if isinstance(criteria, bytes) else f"SEARCH {criteria}").untagged[0]

    assert search("BODY xylophonist") == "SEARCH 1"
    assert search("UNSEEN") == "SEARCH 1 3"
    assert search("SEEN") == "SEARCH 2"
    assert search("OR SUBJECT lunch SUBJECT quarterly") == "SEARCH 1 2"
    assert search("NOT SUBJECT lunch") == "SEARCH 1 3"
    assert search("2:*") == "SEARCH 2 3"
    assert search("5:9") == "SEARCH"  # beyond EXISTS matches nothing in SEARCH
    assert search("LARGER 1 SMALLER 100000") == "SEARCH 1 2 3"
    assert search("FROM sender@remote") == "SEARCH 1 2 3"
    assert search("SINCE 1-Jan-2020") == "SEARCH 1 2 3"
    assert search("BEFORE 1-Jan-2020") == "SEARCH"
    assert search(b"UID SEARCH SUBJECT lunch") == "SEARCH 2"
    assert search(b"SEARCH CHARSET UTF-8 SUBJECT " + literal("café".encode())) == "SEARCH 3"
    assert imap.transact("no", "SEARCH CHARSET KOI8-R SUBJECT x").code == "BADCHARSET"


def test_copy_move_and_expunge_with_uidplus(server, user):
    for i in range(4):
        server.deliver(user, subject=f"m{i}")
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    assert re.fullmatch(r"COPYUID \d+ 1:2 1:2", imap.transact("ok", "COPY 1:2 Archive").code)
    reply = imap.transact("ok", "MOVE 3 Trash")
    assert re.fullmatch(r"OK \[COPYUID \d+ 3 1\] moved", reply.untagged[0]) and reply.untagged[1:] == ["3 EXPUNGE"]
    imap.transact("ok", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert imap.transact("ok", "UID EXPUNGE 2").untagged == []  # UID 2 is not \Deleted: stays
    assert imap.transact("ok", "EXPUNGE").untagged == ["1 EXPUNGE"]
    assert [m.uid for m in server.store.fetch(user, "INBOX", [(1, 100)])] == [2, 4]
    assert [m.uid for m in server.store.fetch(user, "Trash", [(1, 100)])] == [1]
    assert imap.transact("no", "COPY 1 Missing").code == "TRYCREATE"
    assert imap.transact("ok", "UID COPY 99 Archive").code is None  # no such UID: nothing to do


def test_condstore_changedsince_and_search_modseq(server, user):
    for _ in range(3):
        server.deliver(user)
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    highest = server.store.mailbox(user, "INBOX").highestmodseq
    imap.transact("ok", "STORE 2 +FLAGS (\\Flagged)")
    untagged = imap.transact("ok", f"FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})").untagged
    # CHANGEDSINCE enables CONDSTORE: HIGHESTMODSEQ is told first (RFC 7162 §3.1)
    assert untagged[0].startswith("OK [HIGHESTMODSEQ ")
    fetches = untagged[1:]
    assert len(fetches) == 1 and fetches[0].startswith("2 FETCH (") and "MODSEQ (" in fetches[0]
    assert re.fullmatch(r"SEARCH 2 \(MODSEQ \d+\)", imap.transact("ok", f"SEARCH MODSEQ {highest + 1}").untagged[0])
    assert any(line.startswith("OK [HIGHESTMODSEQ ") for line in
               server.login(user).transact("ok", "SELECT INBOX (CONDSTORE)").untagged)


def test_uid_fetch_flags_of_a_run_matches_the_store(server, user):
    # UID FETCH 1:* (UID FLAGS) of a mailbox at rest goes out from the kept listing in one
    # step (imapd/selected.py _plain_flags_lines); a \Recent message, a change not yet told
    # and an expunge not yet announced take the message-by-message way. Each answer is the
    # store's flags at the session's sequence numbers.
    for i in range(6):
        server.deliver(user, subject=f"m{i}")
    first = server.login(user)
    first.transact("ok", "SELECT INBOX")  # claims \Recent: the next session has none
    first.transact("ok", "STORE 2 +FLAGS (\\Seen $Junk)")
    first.transact("ok", "STORE 3 +FLAGS (\\Answered \\Flagged)")
    first.transact("ok", "STORE 5 +FLAGS (\\Seen)")
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")

    def expected(seqs: range, uids: list[int], recent=()) -> list[str]:
        flags = {s.uid: " ".join(s.flags + (("\\Recent",) if s.uid in recent else ()))
                 for s in server.store.flags(user, "INBOX")}
        return [f"{seq} FETCH (UID {uid} FLAGS ({flags[uid]}))" for seq, uid in zip(seqs, uids, strict=True)]

    assert imap.transact("ok", "UID FETCH 1:* (UID FLAGS)").untagged == expected(range(1, 7), [1, 2, 3, 4, 5, 6])
    assert imap.transact("ok", "FETCH 3:5 (UID FLAGS)").untagged == expected(range(3, 6), [3, 4, 5])
    assert imap.transact("ok", "UID FETCH 2,4:5 (UID FLAGS)").untagged == expected([2, 4, 5], [2, 4, 5])
    # Another session's change, not yet told: the new flags, and the store's after them.
    # (the new keyword is announced first: FLAGS and PERMANENTFLAGS, RFC 3501 §7.2.6)
    first.transact("ok", "STORE 4 +FLAGS (\\Draft $Work)")
    untagged = imap.transact("ok", "UID FETCH 1:* (UID FLAGS)").untagged
    assert untagged[0].startswith("FLAGS (") and untagged[1].startswith("OK [PERMANENTFLAGS (")
    assert untagged[2:] == expected(range(1, 7), [1, 2, 3, 4, 5, 6])
    # An expunge not yet announced: UID 1 is no longer listed, the others keep their numbers.
    first.transact("ok", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    first.transact("ok", "EXPUNGE")
    # (UID FETCH may announce the expunge after its answers: RFC 3501 §7.4.1)
    assert imap.transact("ok", "UID FETCH 1:* (UID FLAGS)").untagged == (expected(range(2, 7), [2, 3, 4, 5, 6])
                                                                         + ["1 EXPUNGE"])
    assert imap.transact("ok", "UID FETCH 1:* (UID FLAGS)").untagged == expected(range(1, 6), [2, 3, 4, 5, 6])
    # New mail is \Recent for the session that sees it first.
    server.deliver(user, subject="new")
    imap.transact("ok", "NOOP")
    assert imap.transact("ok", "UID FETCH 1:* (UID FLAGS)").untagged == expected(range(1, 7), [2, 3, 4, 5, 6, 7],
                                                                                   recent={7})


# -- other sessions, IDLE -------------------------------------------------------------------------


def test_two_sessions_see_each_others_changes(server, user):
    server.deliver(user)
    server.deliver(user)
    first, second = server.login(user), server.login(user)
    first.transact("ok", "SELECT INBOX")
    second.transact("ok", "SELECT INBOX")
    second.transact("ok", "STORE 1 +FLAGS (\\Deleted)")
    second.transact("ok", "EXPUNGE")
    server.deliver(user, subject="third")
    reply = first.transact("ok", "NOOP")
    # UID 2 stays \Recent in the first session, which saw it first; UID 3 is its too
    assert reply.untagged[:3] == ["1 EXPUNGE", "2 EXISTS", "2 RECENT"], reply
    second.transact("ok", "STORE 1 +FLAGS (\\Flagged)")
    assert first.transact("ok", "NOOP").untagged == ["1 FETCH (UID 2 FLAGS (\\Flagged \\Recent))"]


def test_idle_is_woken_by_a_delivery(server, user):
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    imap.send(b"i1 IDLE\r\n")
    assert imap.read() == b"+ idling\r\n"
    server.deliver(user, subject="wake up")
    assert imap.wait_for(b"RECENT\r\n") == b"* 1 EXISTS\r\n* 1 RECENT\r\n"
    imap.send(b"DONE\r\n")
    imap.finish()
    assert imap.read() == b"i1 OK IDLE terminated\r\n"


def test_idle_ends_only_with_done(server, user):
    imap = server.login(user)
    imap.send(b"i1 IDLE\r\n")
    assert imap.read() == b"+ idling\r\n"
    imap.send(b"i2 NOOP\r\n")
    imap.finish()
    assert imap.read() == b"i1 BAD expected DONE\r\n"


def test_idle_sees_flag_changes_and_expunges_by_another_session(server, user):
    server.deliver(user)
    server.deliver(user)
    watcher = server.login(user)
    watcher.transact("ok", "SELECT INBOX")
    watcher.send(b"i1 IDLE\r\n")
    other = server.login(user)
    other.transact("ok", "SELECT INBOX")
    other.transact("ok", "STORE 2 +FLAGS (\\Flagged)")
    assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))\r\n" in watcher.wait_for(b"FETCH")  # the watcher's
    other.transact("ok", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.transact("ok", "EXPUNGE")
    # The \Deleted flag may be told first, if the watcher saw the STORE before the EXPUNGE.
    assert watcher.wait_for(b"EXPUNGE").endswith(b"* 1 EXPUNGE\r\n")
    watcher.send(b"DONE\r\n")
    watcher.finish()
    assert watcher.read() == b"i1 OK IDLE terminated\r\n"


def test_idle_tells_at_once_what_arrived_just_before_it(server, user):
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    server.deliver(user, subject="between NOOP and IDLE")
    imap.send(b"i1 IDLE\r\n")
    assert imap.read() == b"* 1 EXISTS\r\n* 1 RECENT\r\n+ idling\r\n"
    imap.send(b"DONE\r\n")
    imap.finish()
    assert imap.read() == b"i1 OK IDLE terminated\r\n"


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    (b"a1 FROBNICATE\r\n", b"a1 BAD unknown command\r\n"),
    (b"a1 SELECT\r\n", b"a1 BAD"),
    (b"a1 FETCH 0 FLAGS\r\n", b"a1 BAD"),
    (b"a1 FETCH 1:x FLAGS\r\n", b"a1 BAD"),
    (b"a1 FETCH 99 FLAGS\r\n", b"a1 BAD invalid message sequence number\r\n"),
    (b"a1 STORE 1 +FLAGS (\\Recent)\r\n", b"a1 OK"),  # \Recent is the server's: ignored
    (b"a1 SEARCH FOO\r\n", b"a1 BAD"),
    (b"a1 LIST\r\n", b"a1 BAD"),
    (b"a1 APPEND INBOX {999999999}\r\n", b"a1 NO [TOOBIG]"),
    (b"a1 " + b"X" * 70000 + b"\r\n", b"BAD"),
    (b"a1 SEARCH " + b"(" * 100 + b"ALL" + b")" * 100 + b"\r\n", b"a1 BAD"),
    (b"* NOOP\r\n", b"* BAD missing or invalid tag\r\n"),
])
def test_bad_input_gets_a_tagged_answer_and_the_session_goes_on(server, user, line, expected):
    server.deliver(user)
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    imap.send(line)
    assert expected in imap.read()
    imap.transact("ok", "NOOP")


def test_twenty_bad_commands_in_a_row_end_the_session(server, user):
    imap = server.login(user)
    for _ in range(19):
        imap.transact("bad", "FROBNICATE")
    imap.transact("ok", "NOOP")  # a good command starts the count again
    for _ in range(19):
        imap.transact("bad", "FROBNICATE")
    imap.send(b"z FROBNICATE\r\n")
    assert imap.read() == b"z BAD unknown command\r\n* BYE too many bad commands\r\n"
    assert imap.conn.closed


def test_a_name_that_is_not_modified_utf7_cannot_exist_and_a_pattern_matches_nothing(server, user):
    """Dovecot's answer (imaptest's atoms group): the syntax is fine, so not BAD; such a
    mailbox cannot exist (NO), and such a LIST pattern lists nothing (OK)."""
    imap = server.connect()
    imap.transact("ok", f'LOGIN "{user}" "{PASSWORD}"')
    bad = "!#$$&'+,-.0123456789:;<=>?@^_`|[}"
    for command in (f"SELECT {bad}", f"EXAMINE {bad}", f"CREATE {bad}", f"DELETE {bad}", f"STATUS {bad} (MESSAGES)",
                    f"RENAME INBOX {bad}", f"SUBSCRIBE {bad}", 'CREATE "&Jjo"', 'SELECT "a&-&"'):
        imap.transact("no", command)
    result = imap.transact("ok", f'LIST "" {bad}%*')
    assert not [line for line in result.untagged if line.startswith("LIST")]
    imap.transact("ok", "NOOP")  # the session goes on


def test_a_store_that_brings_a_new_keyword_announces_it_before_the_fetch(server, user):
    """RFC 3501 §7.2.6: FLAGS tells the client which flags the mailbox has; a FETCH showing
    a keyword it never heard of (imaptest: "Keyword used without being in FLAGS") is wrong."""
    server.deliver(user, "one")
    imap = server.connect()
    imap.transact("ok", f'LOGIN "{user}" "{PASSWORD}"')
    imap.transact("ok", "SELECT INBOX")
    result = imap.transact("ok", "STORE 1 +FLAGS ($Important)")
    lines = result.untagged
    flags = next(i for i, line in enumerate(lines) if line.startswith("FLAGS ("))
    permanent = next(i for i, line in enumerate(lines) if line.startswith("OK [PERMANENTFLAGS ("))
    fetch = next(i for i, line in enumerate(lines) if "FETCH" in line)
    assert flags < fetch and permanent < fetch
    assert "$Important" in lines[flags] and "$Important" in lines[permanent]
    again = imap.transact("ok", "STORE 1 -FLAGS ($Important)")
    assert not [line for line in again.untagged if line.startswith("FLAGS (")]  # nothing new: not repeated
