"""pop3d's sans-IO parts, alone: the state table, every command's reply, the maildrop's
marks, the framing limits, STLS and AUTH PLAIN, and the body encoder's dot-stuffing and TOP
cut wherever chunk edges fall. Input is fed in 1-10 byte pieces; a small in-memory driver
plays the adapter's part (password check, message bytes, UPDATE) so whole sessions run
without sockets or store."""

from __future__ import annotations

import base64
import random
import re

import pytest

from pop3d import replies
from pop3d.core import (
    AUTHORIZATION,
    COMMANDS,
    MAX_ERRORS,
    TRANSACTION,
    UPDATE,
    Authenticate,
    Close,
    POP3Core,
    Reply,
    Retrieve,
    Settings,
    StartTLS,
    Update,
)
from pop3d.framer import MAX_LINE, TOO_LONG, BodyEncoder, LineFramer
from pop3d.maildrop import EXPIRE_AT_QUIT, EXPIRE_NEVER, Maildrop, too_soon
from pop3d.replies import CommandError, Err

PASSWORD = "s3cret pass"
MESSAGES = {
    11: b"Subject: one\r\nFrom: a@example.test\r\n\r\n.starts with a dot\r\nline 2\r\n..two dots\r\n",
    12: b"Subject: two\r\n\r\nbody\r\n.\r\nafter a lone dot\r\n",
    15: b"Subject: three\r\n\r\nno final newline",
}


def settings(**changes) -> Settings:
    base = dict(sid="SID1", implementation="Postroom test", tls_available=True, tls_active=False,
                plaintext_auth=True, login_delay=0, expire="NEVER")
    return Settings(**{**base, **changes})


class Driver:
    """The adapter's part, in memory: feeds bytes in random small pieces and answers the
    core's work events like pop3d.session does."""

    def __init__(self, core: POP3Core, seed: int = 0, messages: dict[int, bytes] = MESSAGES):
        self.core = core
        self.rng = random.Random(seed)
        self.messages = dict(messages)
        self.out = bytearray()
        self.closed = False
        self.tls_started = 0
        self.removed: tuple[int, ...] | None = None
        self.logins: list[Authenticate] = []

    def send(self, data: bytes) -> bytes:
        start = len(self.out)
        pos = 0
        while pos < len(data):
            size = self.rng.randint(1, 10)
            self.core.receive_data(data[pos : pos + size])
            pos += size
            self.pump()
        return bytes(self.out[start:])

    def pump(self) -> None:
        while not self.closed:
            event = self.core.next_event()
            if event is None:
                return
            self.act(event)

    def act(self, event) -> None:
        if isinstance(event, Reply):
            self.out += event.data
        elif isinstance(event, Close):
            self.out += event.data
            self.closed = True
        elif isinstance(event, StartTLS):
            self.out += event.data
            self.tls_started += 1
        elif isinstance(event, Authenticate):
            self.logins.append(event)
            if event.password == PASSWORD:
                drop = Maildrop(777, [(uid, len(raw)) for uid, raw in sorted(self.messages.items())])
                self.act(self.core.logged_in(drop))
            else:
                self.act(self.core.login_refused(replies.WRONG_PASSWORD))
        elif isinstance(event, Retrieve):
            raw = self.messages.get(event.uid)
            if raw is None:
                self.act(self.core.retrieve_failed(replies.message_gone(event.number)))
                return
            self.out += event.ok
            encoder = BodyEncoder(event.lines)
            pos = 0
            while pos < len(raw) and not encoder.done:
                size = self.rng.randint(1, 10)
                self.out += encoder.feed(raw[pos : pos + size])
                pos += size
            self.out += encoder.end()
            self.core.finished(event)
        elif isinstance(event, Update):
            self.removed = event.uids
            self.act(self.core.updated(len(event.uids)))


def logged_in(seed: int = 0, **changes) -> Driver:
    driver = Driver(POP3Core(settings(**changes)), seed)
    driver.send(b"USER alice@example.test\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert driver.core.state == TRANSACTION
    return driver


def stuffed_reference(raw: bytes, lines: int | None = None) -> bytes:
    """RFC 1939 §3 done line by line, the obvious way."""
    parts = [p for p in re.split(b"(?<=\n)", raw) if p]
    if lines is not None:
        for i, part in enumerate(parts):
            if part in (b"\r\n", b"\n"):
                parts = parts[: i + 1 + lines]
                break
    body = b"".join(b"." + p if p.startswith(b".") else p for p in parts)
    if body and not body.endswith(b"\n"):
        body += b"\r\n"
    return body + b".\r\n"


# -- the state table ----------------------------------------------------------------------

NOT_VALID = "not valid"  # the refusal a state gives a verb it does not allow
# (command, what it answers before login, what it answers after login): COMMANDS as behaviour.
STATE_CASES = [
    ("CAPA", "+OK capability list follows", "+OK capability list follows"),
    ("USER bob", "+OK send PASS", NOT_VALID),
    ("PASS x", "-ERR USER first", NOT_VALID),
    ("AUTH", "+OK SASL mechanisms follow", NOT_VALID),
    ("STLS", "+OK begin TLS negotiation", NOT_VALID),
    ("XCLIENT ADDR=192.0.2.7", "-ERR XCLIENT is for the nodes of this cluster only", NOT_VALID),
    ("QUIT", "+OK Postroom test signing off", "+OK Postroom test signing off (0 messages deleted)"),
    ("STAT", NOT_VALID, "+OK 3 "),
    ("LIST", NOT_VALID, "+OK 3 messages ("),
    ("RETR 1", NOT_VALID, f"+OK {len(MESSAGES[11])} octets"),
    ("TOP 1 0", NOT_VALID, "+OK top of message follows"),
    ("DELE 1", NOT_VALID, "+OK message 1 deleted"),
    ("NOOP", NOT_VALID, "+OK nothing to do"),
    ("RSET", NOT_VALID, "+OK maildrop has 3 messages"),
    ("UIDL", NOT_VALID, "+OK unique-id listing follows"),
]


def test_state_table_is_the_table_of_cases():
    for state, column in ((AUTHORIZATION, 1), (TRANSACTION, 2)):
        assert set(COMMANDS[state]) == {case[0].split()[0] for case in STATE_CASES if case[column] != NOT_VALID}
        assert all(callable(handler) for handler in COMMANDS[state].values())
    assert COMMANDS[UPDATE] == {}


@pytest.mark.parametrize("logged_in_first", [False, True], ids=["AUTHORIZATION", "TRANSACTION"])
@pytest.mark.parametrize("command, before, after", STATE_CASES, ids=[case[0].split()[0] for case in STATE_CASES])
def test_each_state_runs_its_commands_and_refuses_the_others(command, before, after, logged_in_first):
    driver = logged_in() if logged_in_first else Driver(POP3Core(settings()))
    expected = after if logged_in_first else before
    reply = driver.send(command.encode() + b"\r\n").decode()
    verb = command.split()[0]
    if expected == NOT_VALID:
        assert reply == f"-ERR {verb} is not valid {'after' if logged_in_first else 'before'} login\r\n"
        assert driver.send(b"NOOP\r\n" if logged_in_first else b"CAPA\r\n").startswith(b"+OK")  # state unchanged
    else:
        assert reply.startswith(expected), reply


def test_a_cluster_peer_names_the_client_it_relays():
    """XCLIENT ADDR= (a cluster's POP3 proxy, pop3d/proxy.py): believed from a live node only."""
    driver = Driver(POP3Core(settings(cluster_peer=True)))
    assert driver.send(b"XCLIENT ADDR=bogus\r\n") == b"-ERR usage: XCLIENT ADDR=address\r\n"
    assert driver.core.forwarded_for is None
    assert driver.send(b"XCLIENT ADDR=2001:db8::7 PORT=41000\r\n") == b"+OK client address noted\r\n"
    assert driver.core.forwarded_for == "2001:db8::7"


@pytest.mark.parametrize("logged_in_first", [False, True], ids=["AUTHORIZATION", "TRANSACTION"])
def test_apop_and_unknown_verbs_are_refused_in_every_state(logged_in_first):
    driver = logged_in() if logged_in_first else Driver(POP3Core(settings()))
    assert driver.send(b"APOP alice 0123\r\n").startswith(b"-ERR APOP is not supported")
    assert driver.send(b"XTND\r\n") == b"-ERR unknown command 'XTND'\r\n"


def test_update_reads_no_more_commands():
    """RFC 1939 §6: after QUIT in TRANSACTION the core only waits for the removal."""
    core = POP3Core(settings())
    driver = Driver(core)
    driver.send(b"USER a\r\nPASS " + PASSWORD.encode() + b"\r\n")
    core.receive_data(b"DELE 1\r\nQUIT\r\nNOOP\r\nSTAT\r\n")
    assert core.next_event() == Reply(b"+OK message 1 deleted\r\n")
    assert core.next_event() == Update((11,))
    assert core.state == UPDATE and core.next_event() is None
    core.updated(1)
    assert core.next_event() is None and core.closed


# -- every command ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_a_whole_session_in_small_pieces(seed):
    driver = Driver(POP3Core(settings()), seed)
    sizes = {uid: len(raw) for uid, raw in MESSAGES.items()}
    total = sum(sizes.values())
    assert driver.send(b"user alice@example.test\r\n") == b"+OK send PASS\r\n"
    greeting = f"+OK maildrop has 3 messages ({total} octets)\r\n".encode()
    assert driver.send(b"pass " + PASSWORD.encode() + b"\r\n") == greeting
    assert driver.logins == [Authenticate("alice@example.test", PASSWORD, "USER")]
    assert driver.send(b"STAT\r\n") == f"+OK 3 {total}\r\n".encode()
    assert driver.send(b"LIST\r\n") == (f"+OK 3 messages ({total} octets)\r\n1 {sizes[11]}\r\n2 {sizes[12]}\r\n"
                                        f"3 {sizes[15]}\r\n.\r\n").encode()
    assert driver.send(b"LIST 2\r\n") == f"+OK 2 {sizes[12]}\r\n".encode()
    assert driver.send(b"UIDL\r\n") == b"+OK unique-id listing follows\r\n1 777.11\r\n2 777.12\r\n3 777.15\r\n.\r\n"
    assert driver.send(b"UIDL 3\r\n") == b"+OK 3 777.15\r\n"
    for number, uid in ((1, 11), (2, 12), (3, 15)):
        expected = f"+OK {sizes[uid]} octets\r\n".encode() + stuffed_reference(MESSAGES[uid])
        assert driver.send(f"RETR {number}\r\n".encode()) == expected
    assert driver.send(b"TOP 1 1\r\n") == b"+OK top of message follows\r\n" + stuffed_reference(MESSAGES[11], 1)
    assert driver.send(b"TOP 1 0\r\n") == (b"+OK top of message follows\r\nSubject: one\r\nFrom: a@example.test\r\n"
                                          b"\r\n.\r\n")
    assert driver.send(b"DELE 2\r\n") == b"+OK message 2 deleted\r\n"
    assert driver.send(b"DELE 2\r\n") == b"-ERR message 2 already deleted\r\n"
    assert driver.send(b"RETR 2\r\n") == b"-ERR message 2 already deleted\r\n"
    assert driver.send(b"LIST\r\n").count(b"\r\n") == 4  # +OK, two messages, "."
    assert driver.send(b"STAT\r\n") == f"+OK 2 {total - sizes[12]}\r\n".encode()
    assert driver.send(b"RSET\r\n") == f"+OK maildrop has 3 messages ({total} octets)\r\n".encode()
    assert driver.send(b"NOOP\r\n") == b"+OK nothing to do\r\n"
    assert driver.send(b"DELE 1\r\nDELE 3\r\n") == b"+OK message 1 deleted\r\n+OK message 3 deleted\r\n"
    assert driver.send(b"QUIT\r\n") == b"+OK Postroom test signing off (2 messages deleted)\r\n"
    assert driver.removed == (11, 15)
    assert driver.closed and driver.core.state == UPDATE


def test_pipelined_commands_are_answered_in_order():
    driver = logged_in()
    out = driver.send(b"NOOP\r\nSTAT\r\nLIST 1\r\nRETR 2\r\nUIDL 1\r\nNOOP\r\n")
    lines = out.split(b"\r\n")
    assert lines[0] == b"+OK nothing to do" and lines[1].startswith(b"+OK 3 ") and lines[2].startswith(b"+OK 1 ")
    assert out.endswith(b"+OK 1 777.11\r\n+OK nothing to do\r\n")


def test_quit_before_login_closes_without_update():
    driver = Driver(POP3Core(settings()))
    assert driver.send(b"QUIT\r\n") == b"+OK Postroom test signing off\r\n"
    assert driver.closed and driver.removed is None


def test_expire_0_removes_what_retr_sent():
    driver = logged_in(expire="0")
    driver.send(b"RETR 1\r\nTOP 2 0\r\nDELE 3\r\nQUIT\r\n")
    assert driver.removed == (11, 15)  # RETR'd 1 and DELE'd 3; TOP is not a retrieval


def test_a_message_gone_meanwhile_is_an_error_and_the_session_goes_on():
    driver = logged_in()
    del driver.messages[12]
    assert driver.send(b"RETR 2\r\nNOOP\r\n") == \
        b"-ERR message 2 was removed by another session\r\n+OK nothing to do\r\n"


@pytest.mark.parametrize("line, reply", [
    (b"RETR", b"-ERR usage: RETR message"),
    (b"RETR 1 2", b"-ERR usage: RETR message"),
    (b"RETR x", b"-ERR message number must be a decimal number: 'x'"),
    (b"RETR -1", b"-ERR message number must be a decimal number: '-1'"),
    (b"RETR 0", b"-ERR no such message, only 3 in maildrop"),
    (b"RETR 4", b"-ERR no such message, only 3 in maildrop"),
    (b"RETR 99999999999", b"-ERR message number must be a decimal number: '99999999999'"),
    (b"TOP 1", b"-ERR usage: TOP message lines"),
    (b"TOP 1 x", b"-ERR line count must be a decimal number: 'x'"),
    (b"LIST 1 2", b"-ERR usage: LIST [message]"),
    (b"STAT 1", b"-ERR usage: STAT"),
    (b"FROB", b"-ERR unknown command 'FROB'"),
    (b"", b"-ERR empty command"),
    (b"APOP alice 0123", b"-ERR APOP is not supported: use USER/PASS or AUTH PLAIN (over TLS)"),
    (b"NOOP\x00", b"-ERR control characters in command"),
    (b"NOOP \xff", b"-ERR command is not valid UTF-8"),
])
def test_bad_input_gets_a_clear_error(line, reply):
    driver = logged_in()
    assert driver.send(line + b"\r\n") == reply + b"\r\n"
    assert driver.send(b"NOOP\r\n") == b"+OK nothing to do\r\n"  # and the session goes on


def test_too_many_errors_close_the_session():
    driver = logged_in()
    out = driver.send(b"FROB\r\n" * (MAX_ERRORS + 5))
    assert out.count(b"-ERR") == MAX_ERRORS and out.endswith(b"too many errors, closing\r\n")
    assert driver.closed


# -- the maildrop -------------------------------------------------------------------------


def test_maildrop_marks_keep_count_and_octets_and_decide_what_update_removes():
    maildrop = Maildrop(9, [(11, 100), (12, 20), (15, 3)])
    assert (maildrop.count(), maildrop.octets()) == (3, 123)
    maildrop.delete(2)
    with pytest.raises(CommandError) as refused:
        maildrop.delete(2)
    assert refused.value.err == Err("message 2 already deleted")
    with pytest.raises(CommandError) as refused:
        maildrop.message(4)
    assert refused.value.err == Err("no such message, only 3 in maildrop")
    assert (maildrop.count(), maildrop.octets()) == (2, 103)
    assert list(maildrop.undeleted()) == [(1, 11, 100), (3, 15, 3)]
    maildrop.sent_whole(3)
    assert maildrop.to_remove(EXPIRE_NEVER) == (12,) and maildrop.to_remove(EXPIRE_AT_QUIT) == (12, 15)
    maildrop.undelete_all()
    assert (maildrop.count(), maildrop.octets()) == (3, 123) and maildrop.to_remove(EXPIRE_NEVER) == ()
    assert maildrop.uidl(15) == "9.15"


@pytest.mark.parametrize("last_login, now, delay, refused", [
    (None, 1000.0, 60, False),  # never logged in
    (990.0, 1000.0, 0, False),  # no LOGIN-DELAY
    (990.0, 1000.0, 60, True),
    (940.0, 1000.0, 60, False),  # exactly the delay ago
    (1010.0, 1000.0, 60, False),  # the clock went back
])
def test_login_delay(last_login, now, delay, refused):
    assert too_soon(last_login, now, delay) is refused


# -- framing ------------------------------------------------------------------------------


def test_over_long_lines_are_refused_and_skipped_whole():
    driver = logged_in(seed=3)
    out = driver.send(b"NOOP " + b"x" * (MAX_LINE * 3) + b"\r\nSTAT\r\n")
    assert out.startswith(f"-ERR line too long (limit {MAX_LINE} octets)\r\n".encode())
    assert out.count(b"-ERR") == 1 and out.split(b"\r\n")[1].startswith(b"+OK 3 ")


def test_framer_memory_is_bounded_inside_a_long_line():
    framer = LineFramer(max_line=100)
    results = []
    for _ in range(1000):
        framer.feed(b"y" * 64)
        results.append(framer.next_line())
        assert framer.buffered() <= 200
    framer.feed(b"tail\r\nok\r\n")
    results.append(framer.next_line())
    assert [r for r in results if r is not None] == [TOO_LONG, b"ok"]


def test_a_bare_lf_ends_a_line_too():
    driver = logged_in()
    assert driver.send(b"NOOP\n") == b"+OK nothing to do\r\n"


# -- authentication and TLS ---------------------------------------------------------------


def test_capabilities_follow_state_and_settings():
    def capa(driver):
        return driver.send(b"CAPA\r\n").decode().split("\r\n")[1:-2]

    plain = Driver(POP3Core(settings(plaintext_auth=False)))
    assert capa(plain) == ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS",
                           "EXPIRE NEVER", "IMPLEMENTATION Postroom test"]
    plain.send(b"STLS\r\n")
    assert capa(plain)[6:8] == ["USER", "SASL PLAIN"] and "STLS" not in capa(plain)
    tuned = Driver(POP3Core(settings(tls_active=True, login_delay=900, expire="0")))
    assert "LOGIN-DELAY 900" in capa(tuned) and "EXPIRE 0" in capa(tuned) and "STLS" not in capa(tuned)
    after = logged_in()
    assert capa(after) == ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE NEVER",
                           "IMPLEMENTATION Postroom test"]


def test_passwords_are_refused_before_tls_unless_allowed():
    driver = Driver(POP3Core(settings(plaintext_auth=False)))
    refused = b"-ERR [AUTH] plaintext authentication is not allowed before STLS\r\n"
    assert driver.send(b"USER alice@example.test\r\n") == refused
    assert driver.send(b"PASS " + PASSWORD.encode() + b"\r\n") == refused
    assert driver.send(b"AUTH PLAIN AGFsaWNlAHg=\r\n") == refused
    assert driver.logins == []
    assert driver.send(b"STLS\r\n") == b"+OK begin TLS negotiation\r\n"
    driver.send(b"USER alice@example.test\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert driver.core.state == TRANSACTION


def test_stls_discards_what_was_pipelined_in_the_clear():
    driver = Driver(POP3Core(settings(plaintext_auth=False)))
    driver.core.receive_data(b"STLS\r\nUSER mallory\r\nPASS x\r\n")
    driver.pump()
    assert bytes(driver.out) == b"+OK begin TLS negotiation\r\n" and driver.tls_started == 1
    assert driver.logins == [] and driver.core.buffered() == 0
    assert driver.send(b"STLS\r\n") == b"-ERR TLS is already active\r\n"
    no_cert = Driver(POP3Core(settings(tls_available=False)))
    assert no_cert.send(b"STLS\r\n") == b"-ERR STLS is not available: no certificate configured\r\n"


def plain(authzid: str, user: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def test_auth_plain_with_an_initial_response_and_with_a_continuation():
    driver = Driver(POP3Core(settings()), seed=1)
    assert driver.send(b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert driver.send(b"*\r\n") == b"-ERR authentication cancelled\r\n"
    assert driver.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert driver.send(plain("", "alice@example.test", "wrong") + b"\r\n") == \
        b"-ERR [AUTH] wrong user name or password\r\n"
    assert driver.send(b"AUTH PLAIN " + plain("alice@example.test", "alice@example.test", PASSWORD) + b"\r\n") \
        .startswith(b"+OK maildrop has 3 messages")
    assert driver.logins[-1] == Authenticate("alice@example.test", PASSWORD, "PLAIN")


@pytest.mark.parametrize("line, reply", [
    (b"AUTH CRAM-MD5", b"-ERR unsupported mechanism 'CRAM-MD5': PLAIN only"),
    (b"AUTH PLAIN !!!", b"-ERR malformed AUTH PLAIN response"),
    (b"AUTH PLAIN " + base64.b64encode(b"no nuls"), b"-ERR malformed AUTH PLAIN response"),
    (b"AUTH PLAIN " + plain("bob@example.test", "alice@example.test", PASSWORD),
     b"-ERR [AUTH] acting as another user is not allowed"),
    (b"PASS " + PASSWORD.encode(), b"-ERR USER first"),
    (b"USER", b"-ERR usage: USER name"),
])
def test_bad_logins(line, reply):
    driver = Driver(POP3Core(settings()))
    assert driver.send(line + b"\r\n") == reply + b"\r\n"
    assert driver.core.state == AUTHORIZATION


@pytest.mark.parametrize("between", [b"CAPA", b"FROB", b"STAT", b"", b"NOOP x\x01"])
def test_pass_must_follow_user_at_once(between):
    """RFC 1939 §7: PASS right after USER. Any line between, known, unknown, refused or
    empty, breaks the pair (an unknown one used to leave USER pending)."""
    driver = Driver(POP3Core(settings()))
    assert driver.send(b"USER alice@example.test\r\n" + between + b"\r\nPASS " + PASSWORD.encode() + b"\r\n") \
        .endswith(b"-ERR USER first\r\n")


def test_a_password_may_hold_spaces():
    driver = Driver(POP3Core(settings()))
    driver.send(b"USER alice@example.test\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert driver.logins[0].password == PASSWORD and " " in PASSWORD


def test_failed_logins_end_the_session_and_in_use_does_not_count():
    core = POP3Core(settings())
    core.receive_data(b"USER a\r\nPASS b\r\n")
    core.next_event()
    event = core.next_event()
    assert isinstance(event, Authenticate) and core.next_event() is None  # one command at a time
    assert core.login_refused(replies.MAILDROP_IN_USE, counts=False) == \
        Reply(b"-ERR [IN-USE] maildrop already locked by another POP3 session\r\n")
    driver = Driver(core)
    out = driver.send(b"USER a\r\nPASS b\r\nUSER a\r\nPASS b\r\nUSER a\r\nPASS b\r\nNOOP\r\n")
    assert out.count(b"-ERR [AUTH] wrong user name or password") == 3
    assert out.endswith(b"too many failed logins, closing\r\n") and driver.closed


def test_internal_errors_name_the_session_not_the_error():
    core = POP3Core(settings())
    core.receive_data(b"USER a\r\nPASS b\r\n")
    core.next_event()
    core.next_event()
    assert core.failed() == Reply(b"-ERR [SYS/TEMP] internal error, session SID1\r\n")


# -- message bodies -----------------------------------------------------------------------


def encode(raw: bytes, lines: int | None, sizes) -> bytes:
    encoder = BodyEncoder(lines)
    out = bytearray()
    pos = 0
    for size in sizes:
        if pos >= len(raw) or encoder.done:
            break
        out += encoder.feed(raw[pos : pos + size])
        pos += size
    while pos < len(raw) and not encoder.done:
        out += encoder.feed(raw[pos : pos + 7])
        pos += 7
    return bytes(out + encoder.end())


def random_message(rng: random.Random) -> bytes:
    header = b"".join(rng.choice([b"Subject: x\r\n", b".Dotted: y\r\n", b"From: a\r\n"])
                      for _ in range(rng.randint(0, 4)))
    body = b"".join(rng.choice([b".\r\n", b"..\r\n", b".x\r\n", b"plain\r\n", b"\r\n", b"a.b\r\n", b"x\r\n.y\r\n"])
                    for _ in range(rng.randint(0, 12)))
    tail = rng.choice([b"", b".", b"end", b"\r", b".\r"])
    return header + rng.choice([b"\r\n", b""]) + body + tail


@pytest.mark.parametrize("seed", range(300))
def test_body_encoder_matches_line_by_line_stuffing_whatever_the_chunks(seed):
    rng = random.Random(seed)
    raw = random_message(rng)
    sizes = [rng.randint(1, 10) for _ in range(len(raw) + 1)]
    lines = rng.choice([None, 0, 1, 2, 5, 100])
    assert encode(raw, lines, sizes) == stuffed_reference(raw, lines), (raw, lines)


def test_a_dot_at_a_16k_chunk_edge_is_stuffed():
    """twisted.mail.pop3's defect: a line starting exactly at a chunk edge went out unstuffed."""
    first = b"Subject: edge\r\n\r\n" + b"a" * (16 * 1024 - 17 - 2) + b"\r\n"
    assert len(first) == 16 * 1024
    raw = first + b".hidden\r\n"
    encoder = BodyEncoder()
    out = encoder.feed(raw[: 16 * 1024]) + encoder.feed(raw[16 * 1024 :]) + encoder.end()
    assert out.endswith(b"\r\n..hidden\r\n.\r\n")
    assert out.count(b"\r\n") == raw.count(b"\r\n") + 1  # CRLF kept as is: no CR CR LF


def test_a_dot_after_a_chunk_edge_inside_or_after_crlf_is_stuffed():
    raw = b"A: b\r\n\r\nx\r\n.one\r\n.two\r\n."
    want = b"A: b\r\n\r\nx\r\n..one\r\n..two\r\n..\r\n.\r\n"
    for cut in range(1, len(raw)):  # every edge: before CR, between CR and LF, before the dot
        encoder = BodyEncoder()
        assert encoder.feed(raw[:cut]) + encoder.feed(raw[cut:]) + encoder.end() == want, cut


def test_top_tells_when_it_needs_no_more_input():
    encoder = BodyEncoder(1)
    assert encoder.feed(b"A: b\r\n\r\nfirst\r\nsecond\r\n") == b"A: b\r\n\r\nfirst\r\n"
    assert encoder.done and encoder.feed(b"more\r\n") == b""


def test_an_empty_message_is_just_the_terminator():
    assert BodyEncoder().end() == b".\r\n"
