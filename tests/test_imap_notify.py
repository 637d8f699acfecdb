"""NOTIFY (RFC 5465) end to end: a running `postroom serve` and two sessions over real
sockets, one changing the store and the other told without asking, read line by line as
the server writes them. Also the MX agent's delivery (another process) told the same way.
"""

from __future__ import annotations

import itertools
import re
import smtplib
import socket
import time
from email.message import EmailMessage

import pytest

from conftest import CHEAP_HASHER, client_tls_context, start_module_daemon
from storage import Accounts

PASSWORD = "correct horse battery staple"
WAIT = 5.0  # seconds a notification may take (the watcher polls every 0.25 s)
_accounts = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("imap-notify")
    data_dir = root / "var"
    daemon = start_module_daemon(root, storage={"shards": 2})
    daemon.accounts = Accounts(data_dir / "accounts.lmdb", hasher=CHEAP_HASHER)
    daemon.accounts.add_domain("example.test")
    yield daemon
    daemon.accounts.close()
    assert daemon.stop() == 0, daemon.stderr()
    assert "Traceback" not in daemon.stderr(), daemon.stderr()


@pytest.fixture
def user(server) -> str:
    address = f"notify{next(_accounts)}@example.test"
    server.accounts.add_user(address, PASSWORD)
    return address


class Wire:
    """An IMAP client on a TLS socket that sees every line the server writes, when it
    writes it: commands answered up to their tagged line, unsolicited lines waited for."""

    def __init__(self, server, user: str):
        address = server.listen("imap.listen_tls")
        sock = socket.create_connection((address.host, address.port), timeout=WAIT)
        self.sock = client_tls_context(server.config).wrap_socket(sock, server_hostname=address.host)
        self.buffer = b""
        self.tags = itertools.count(1)
        self.line()  # the greeting
        self.command(f'LOGIN "{user}" "{PASSWORD}"')

    def line(self, timeout: float = WAIT) -> str | None:
        """The next line (CRLF off), or None if none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                return None
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode()

    def command(self, text: str, status: str = "OK") -> list[str]:
        """Send a command; its untagged lines, the tagged one last (its status checked)."""
        tag = f"w{next(self.tags)}"
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        lines = []
        while True:
            line = self.line()
            assert line is not None, f"no answer to {text!r} after {lines}"
            lines.append(line)
            if line.startswith(tag + " "):
                assert line.split(" ")[1] == status, f"{text!r}: {lines}"
                return lines

    def told(self, pattern: str) -> str:
        """Wait, without sending anything, for an unsolicited line matching `pattern`."""
        seen = []
        while True:
            line = self.line()
            assert line is not None, f"not told {pattern!r}; got {seen}"
            if re.fullmatch(pattern, line):
                return line
            seen.append(line)

    def quiet(self, seconds: float = 1.0) -> None:
        line = self.line(timeout=seconds)
        assert line is None, f"told {line!r}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pair(server, user):
    watcher, actor = Wire(server, user), Wire(server, user)
    yield watcher, actor
    watcher.close()
    actor.close()


def test_notify_is_advertised_and_set_status_tells_the_items_of_the_events(pair):
    watcher, actor = pair
    assert " NOTIFY" in watcher.command("CAPABILITY")[0]
    actor.command("CREATE Other")
    actor.command("APPEND Other {12+}\r\nSubject: x\r\n")
    lines = watcher.command("NOTIFY SET STATUS (mailboxes Other (MessageExpunge))")
    assert lines[:-1] == ["* STATUS Other (MESSAGES 1)"]
    lines = watcher.command("NOTIFY SET STATUS (mailboxes Other (MessageNew MessageExpunge))")
    assert re.fullmatch(r"\* STATUS Other \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+\)", lines[0]), lines
    lines = watcher.command("NOTIFY SET STATUS (mailboxes Other (FlagChange))")
    assert re.fullmatch(r"\* STATUS Other \(UIDVALIDITY \d+ HIGHESTMODSEQ \d+\)", lines[0]), lines
    assert len(watcher.command("NOTIFY SET (mailboxes Other (MessageNew MessageExpunge FlagChange))")) == 1
    # With CONDSTORE enabled, HIGHESTMODSEQ comes with any message event (RFC 5465 §5.2).
    watcher.command("ENABLE CONDSTORE")
    lines = watcher.command("NOTIFY SET STATUS (mailboxes Other (MessageNew MessageExpunge))")
    assert re.fullmatch(r"\* STATUS Other \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ HIGHESTMODSEQ \d+\)", lines[0]), lines


def test_changes_to_another_mailbox_are_told_as_status(pair):
    watcher, actor = pair
    actor.command("CREATE Other")
    watcher.command("SELECT INBOX")
    watcher.command("NOTIFY SET (selected (MessageNew MessageExpunge)) "
                    "(personal (MessageNew MessageExpunge FlagChange))")
    actor.command("APPEND Other {12+}\r\nSubject: x\r\n")
    watcher.told(r"\* STATUS Other \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ HIGHESTMODSEQ \d+\)")
    actor.command("SELECT Other")
    actor.command("STORE 1 +FLAGS (\\Deleted)")
    watcher.told(r"\* STATUS Other \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ HIGHESTMODSEQ \d+\)")
    actor.command("EXPUNGE")
    watcher.told(r"\* STATUS Other \(MESSAGES 0 UIDNEXT 2 UIDVALIDITY \d+ HIGHESTMODSEQ \d+\)")
    # The selected mailbox is never told by STATUS.
    actor.command("APPEND INBOX {12+}\r\nSubject: y\r\n")
    assert watcher.told(r"\* \d+ EXISTS|\* STATUS .*") == "* 1 EXISTS"


def test_the_selected_mailbox_is_told_at_once_with_messagenew_attributes(pair):
    watcher, actor = pair
    watcher.command("SELECT INBOX")
    watcher.command("NOTIFY SET (selected (MessageNew (UID FLAGS) MessageExpunge FlagChange))")
    actor.command("APPEND INBOX (\\Draft) {12+}\r\nSubject: x\r\n")
    watcher.told(r"\* 1 EXISTS")
    watcher.told(r"\* 1 FETCH \(UID 1 FLAGS \((\\Recent )?\\Draft( \\Recent)?\)\)")
    actor.command("SELECT INBOX")
    actor.command("STORE 1 +FLAGS.SILENT (\\Flagged)")
    watcher.told(r"\* 1 FETCH \(UID 1 FLAGS \(.*\\Flagged.*\)\)")
    actor.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
    actor.command("EXPUNGE")
    watcher.told(r"\* 1 EXPUNGE")
    watcher.command("NOOP")


def unsolicited_fetch_uids(wire: Wire, wanted: int, timeout: float) -> set[int]:
    """The UIDs of the FETCH responses the client is told without asking, literals skipped,
    until `wanted` of them or `timeout` seconds with nothing new."""
    uids: set[int] = set()
    while len(uids) < wanted:
        line = wire.line(timeout)
        if line is None:
            break
        literal = re.search(r"\{(\d+)\}$", line)
        if literal:
            size = int(literal.group(1))
            while len(wire.buffer) < size:
                wire.sock.settimeout(timeout)
                wire.buffer += wire.sock.recv(1 << 20)
            wire.buffer = wire.buffer[size:]
        found = re.match(r"\* \d+ FETCH \(UID (\d+)", line)
        if found:
            uids.add(int(found.group(1)))
    return uids


def test_messages_that_come_during_a_push_are_pushed_too(pair):
    """attack15: while a push of MessageNew's FETCH waited for the client to read, the news
    of further messages was dropped: they got no FETCH at all, and their EXISTS only at the
    client's next command."""
    watcher, actor = pair
    watcher.command("SELECT INBOX")
    watcher.command("NOTIFY SET (selected (MessageNew (UID BODY.PEEK[]) MessageExpunge))")
    body = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 4000  # more than the socket buffers hold
    count = 5
    for _ in range(count):  # the watcher reads nothing meanwhile: the first push waits
        actor.sock.sendall(b"a APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\n")
        assert actor.told(r"a (OK|NO|BAD) .*").startswith("a OK")
        time.sleep(0.5)  # the store's watcher looks every 0.25 s: each message is news of its own
    assert unsolicited_fetch_uids(watcher, count, WAIT) == set(range(1, count + 1))
    watcher.command("NOOP")


def test_without_flagchange_a_flag_change_waits_for_a_command(pair):
    watcher, actor = pair
    actor.command("APPEND INBOX {12+}\r\nSubject: x\r\n")
    watcher.command("SELECT INBOX")
    watcher.command("NOTIFY SET (selected (MessageNew MessageExpunge))")
    actor.command("SELECT INBOX")
    actor.command("STORE 1 +FLAGS.SILENT (\\Flagged)")
    watcher.quiet(1.0)  # not asked for: not pushed
    assert any("FLAGS (" in line and "\\Flagged" in line for line in watcher.command("NOOP"))
    actor.command("APPEND INBOX {12+}\r\nSubject: y\r\n")
    watcher.told(r"\* 2 EXISTS")  # asked for: pushed


def test_selected_delayed_holds_expunges_for_a_command(pair):
    watcher, actor = pair
    actor.command("APPEND INBOX {12+}\r\nSubject: x\r\n")
    watcher.command("SELECT INBOX")
    watcher.command("NOTIFY SET (selected-delayed (MessageNew MessageExpunge))")
    actor.command("APPEND INBOX {12+}\r\nSubject: y\r\n")
    watcher.told(r"\* 2 EXISTS")
    watcher.told(r"\* \d+ RECENT")
    actor.command("SELECT INBOX")
    actor.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
    actor.command("EXPUNGE")
    watcher.quiet(1.0)
    assert "* 1 EXPUNGE" in watcher.command("NOOP")


def test_mailbox_name_and_subscription_events_are_told_as_list(pair):
    watcher, actor = pair
    watcher.command("NOTIFY SET (personal (MailboxName SubscriptionChange))")
    actor.command("CREATE Foo")
    watcher.told(r'\* LIST \(\\HasNoChildren\) "/" Foo')
    actor.command("RENAME Foo Bar")
    watcher.told(r'\* LIST \(\\HasNoChildren\) "/" Bar \("OLDNAME" \(Foo\)\)')
    actor.command("SUBSCRIBE Bar")
    watcher.told(r'\* LIST \(\\HasNoChildren \\Subscribed\) "/" Bar')
    actor.command("UNSUBSCRIBE Bar")
    watcher.told(r'\* LIST \(\\HasNoChildren\) "/" Bar')
    actor.command("CREATE Bar/Kid")
    watcher.told(r'\* LIST \(\\HasNoChildren\) "/" Bar/Kid')
    actor.command("DELETE Bar/Kid")
    watcher.told(r'\* LIST \(\\NonExistent\) "/" Bar/Kid')
    actor.command("DELETE Bar")
    watcher.told(r'\* LIST \(\\NonExistent\) "/" Bar')
    # Filters: a group for other mailboxes tells nothing of these.
    watcher.command("NOTIFY SET (mailboxes INBOX (MailboxName))")
    actor.command("CREATE Elsewhere")
    watcher.quiet(1.0)


def test_annotation_changes_are_told_as_metadata_without_values(pair):
    watcher, actor = pair
    actor.command("CREATE Noted")
    actor.command('SETMETADATA Noted (/private/comment "before")')
    watcher.command("SELECT INBOX")
    watcher.command("NOTIFY SET (selected (MessageNew MessageExpunge)) "
                    "(personal (MailboxMetadataChange ServerMetadataChange))")
    actor.command('SETMETADATA Noted (/private/comment "after" /shared/comment "new")')
    watcher.told(r"\* METADATA Noted /private/comment /shared/comment")
    actor.command('SETMETADATA "" (/shared/comment "server")')
    watcher.told(r'\* METADATA "" /shared/comment')
    actor.command("SETMETADATA Noted (/private/comment NIL)")
    watcher.told(r"\* METADATA Noted /private/comment")
    # The selected mailbox's annotations are told too (not a message event).
    actor.command('SETMETADATA INBOX (/private/comment "x")')
    watcher.told(r"\* METADATA INBOX /private/comment")
    # Without the events, nothing.
    watcher.command("NOTIFY SET (personal (MailboxName))")
    actor.command('SETMETADATA Noted (/private/comment "quiet")')
    watcher.quiet(1.0)


def test_the_clients_own_changes_are_not_told_back(pair):
    # RFC 5465 §5: the server SHOULD omit notifying the client of events it caused.
    watcher, actor = pair
    watcher.command("CREATE Other")
    watcher.command("NOTIFY SET (personal (MessageNew MessageExpunge MailboxName SubscriptionChange "
                    "MailboxMetadataChange))")
    for command in ("CREATE Mine/Deep", "RENAME Mine Yours", "SUBSCRIBE Yours/Deep",
                    "APPEND Other {12+}\r\nSubject: x\r\n", 'SETMETADATA Other (/private/comment "mine")',
                    "DELETE Yours/Deep"):
        assert [line for line in watcher.command(command) if " LIST " in line or " STATUS " in line
                or " METADATA " in line] == []
    watcher.quiet(1.0)
    # Another client's changes are told, the same mailboxes included.
    actor.command("APPEND Other {12+}\r\nSubject: y\r\n")
    watcher.told(r"\* STATUS Other \(MESSAGES 2 UIDNEXT 3 UIDVALIDITY \d+\)")
    actor.command("CREATE Theirs")
    watcher.told(r'\* LIST \(\\HasNoChildren\) "/" Theirs')
    # And one told while the client's own command ran is told after it, when it is not
    # about the same mailboxes.
    actor.command("APPEND Other {12+}\r\nSubject: z\r\n")
    watcher.command("CREATE Later")
    watcher.told(r"\* STATUS Other \(MESSAGES 3 UIDNEXT 4 UIDVALIDITY \d+\)")
    watcher.quiet(1.0)


def test_notify_none_stops_notifications(pair):
    watcher, actor = pair
    watcher.command("NOTIFY SET (personal (MailboxName))")
    actor.command("CREATE One")
    watcher.told(r'\* LIST \(\\HasNoChildren\) "/" One')
    watcher.command("NOTIFY NONE")
    actor.command("CREATE Two")
    watcher.quiet(1.0)


def test_mail_delivered_by_the_mx_is_told(server, user):
    watcher = Wire(server, user)
    try:
        watcher.command("NOTIFY SET (inboxes (MessageNew MessageExpunge))")
        message = EmailMessage()
        message["From"] = "sender@remote.example"
        message["To"] = user
        message["Subject"] = "news"
        message.set_content("Hello.\n")
        address = server.listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=30) as smtp:
            smtp.send_message(message)
        watcher.told(r"\* STATUS INBOX \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+\)")
    finally:
        watcher.close()


@pytest.mark.parametrize(("command", "answer"), [
    ("NOTIFY SET (selected (MessageNew MessageExpunge AnnotationChange))",
     "NO [BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange MailboxMetadataChange "
     "ServerMetadataChange)]"),
    ("NOTIFY SET (personal (SomeVendorEvent))", "NO [BADEVENT"),
    ("NOTIFY SET (selected (MessageNew))", "BAD"),
    ("NOTIFY SET (selected (FlagChange))", "BAD"),
    ("NOTIFY SET (selected (MessageNew MessageExpunge MailboxName))", "BAD"),
    ("NOTIFY SET (personal (MessageNew (UID) MessageExpunge))", "BAD"),
    ("NOTIFY SET (selected (MessageNew MessageExpunge)) (selected-delayed (MessageNew MessageExpunge))", "BAD"),
    ("NOTIFY SET (bogus (MessageNew MessageExpunge))", "BAD"),
    ("NOTIFY SET", "BAD"),
    ("NOTIFY SET (personal NONE) (subtree (INBOX Sent) (MailboxName))", "OK"),
])
def test_notify_syntax_and_unsupported_events(server, user, command, answer):
    wire = Wire(server, user)
    try:
        status = answer.split(" ")[0]
        tagged = wire.command(command, status)[-1]
        assert tagged.split(" ", 1)[1].startswith(answer), tagged
    finally:
        wire.close()


# -- the comparison of two listings, alone (imapd.notify.changes) ---------------------------------


def _box(mailbox_id: int, name: str, *, uidnext: int = 1, modseq: int = 1, exists: int = 0,
         subscribed: bool = False):
    from storage import Mailbox
    return Mailbox(id=mailbox_id, account="a@example.test", name=name, uidnext=uidnext, highestmodseq=modseq,
                   exists=exists, unseen=0, size=0, special_use=None, subscribed=subscribed)


def test_changes_between_two_listings():
    from imapd.notify import changes
    old = [_box(1, "INBOX", uidnext=3, modseq=5, exists=2), _box(2, "A"), _box(3, "Gone"), _box(4, "Sub")]
    new = [_box(1, "INBOX", uidnext=3, modseq=6, exists=2), _box(2, "B"), _box(5, "Fresh"),
           _box(4, "Sub", subscribed=True)]
    found = {(c.kind, c.mailbox.name, c.new, c.expunged, c.flags) for c in changes(old, new)}
    assert found == {("messages", "INBOX", False, False, True), ("renamed", "B", False, False, False),
                     ("deleted", "Gone", False, False, False), ("created", "Fresh", False, False, False),
                     ("subscription", "Sub", False, False, False)}
    # New mail and an expunge between two looks: both seen, not taken for a flag change.
    arrived_and_gone = changes([_box(1, "INBOX", uidnext=3, modseq=5, exists=2)],
                               [_box(1, "INBOX", uidnext=4, modseq=8, exists=2)])
    assert [(c.new, c.expunged, c.flags) for c in arrived_and_gone] == [(True, True, False)]


# -- a client that does not read (in process: tests/imap_script.py) ------------------------------


@pytest.fixture(scope="module")
def script_server(tmp_path_factory):
    from imap_script import ScriptServer
    running = ScriptServer(tmp_path_factory.mktemp("imap-notify-script"))
    yield running
    running.close()


def test_a_client_that_does_not_read_is_told_of_the_overflow_once_and_then_nothing(script_server):
    user = script_server.user()
    watcher, actor = script_server.login(user), script_server.login(user)
    watcher.transact("ok", "NOTIFY SET (personal (MailboxName))")
    actor.transact("ok", "CREATE Read")
    watcher.wait_for(b'* LIST (\\HasNoChildren) "/" Read\r\n')
    watcher.conn.reading = False  # its socket's buffer is full from now on
    actor.transact("ok", "CREATE Unread")
    told = watcher.wait_for(b"NOTIFICATIONOVERFLOW")
    assert told.startswith(b"* OK [NOTIFICATIONOVERFLOW]") and b"Unread" not in told
    watcher.conn.reading = True
    actor.transact("ok", "CREATE Later")
    time.sleep(1.0)
    assert watcher.transact("ok", "NOOP").untagged == []  # notifications stay off (RFC 5465 §5.8)
    watcher.transact("ok", "NOTIFY SET (personal (MailboxName))")
    actor.transact("ok", "CREATE Again")
    watcher.wait_for(b'* LIST (\\HasNoChildren) "/" Again\r\n')
