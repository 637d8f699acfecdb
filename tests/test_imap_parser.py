"""imapd's sans-IO command reading: the Framer (bytes -> frames, literals, limits), the
parser (frames -> Commands) and the modified UTF-7 codec. Every command is fed whole and in
seeded random 1..10 byte pieces, and both must give the same events."""

from __future__ import annotations

import datetime
import random
from dataclasses import fields

import pytest

from imapd import syntax as c
from imapd import utf7
from imapd.parser import Close, Continue, Frame, Framer, Reject, parse_command
from imapd.tokens import CANNOT_EXIST
from imapd.syntax import Command, FetchItem, ParseError, Section, SequenceSet

UTC = datetime.timezone.utc


def pieces(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 10)
        out.append(data[i:i + n])
        i += n
    return out


def drain(framer: Framer) -> list:
    out = []
    while (event := framer.next()) is not None:
        out.append(event)
    return out


def events(chunks: list[bytes], **limits) -> list:
    framer = Framer(**limits)
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        out.extend(drain(framer))
    return out


def frame_events(data: bytes, **limits) -> list:
    """The events for `data` fed whole; the same must come from every split of it."""
    whole = events([data], **limits)
    for seed in range(5):
        assert events(pieces(data, seed), **limits) == whole, seed
    return whole


def parse(data: bytes, **limits) -> Command:
    """The one Command in `data` (literals acknowledged as the framer asks)."""
    evs = frame_events(data, **limits)
    frames = [e for e in evs if isinstance(e, Frame)]
    assert len(frames) == 1 and all(isinstance(e, (Frame, Continue)) for e in evs), evs
    return parse_command(frames[0])


def parse_error(data: bytes) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse(data)
    return info.value


def args(data: bytes) -> dict:
    """The parsed command's arguments: its fields but the tag and the name."""
    command = parse(data)
    return {f.name: getattr(command, f.name) for f in fields(command) if f.name not in ("tag", "name")}


# -- framing ----------------------------------------------------------------------------------

def test_lines_become_one_part_frames_in_order():
    assert frame_events(b"a1 NOOP\r\nDONE\r\ndGVzdA==\r\n") == [
        Frame([b"a1 NOOP"]), Frame([b"DONE"]), Frame([b"dGVzdA=="])]
    assert Frame([b"DONE"]).raw == b"DONE"


def test_bare_lf_ends_a_line_and_a_lone_cr_stays():
    assert frame_events(b"a NOOP\nb NOOP\r\nc x\ry\r\n") == [
        Frame([b"a NOOP"]), Frame([b"b NOOP"]), Frame([b"c x\ry"])]


def test_nothing_until_the_line_ends():
    framer = Framer()
    framer.feed(b"a1 NOOP\r")
    assert framer.next() is None
    assert framer.buffered() == 8
    framer.feed(b"\n")
    assert framer.next() == Frame([b"a1 NOOP"])
    assert framer.buffered() == 0


def test_synchronizing_literal_asks_for_continuation_exactly_when_the_marker_line_ends():
    framer = Framer()
    framer.feed(b"a LOGIN {3}\r")
    assert framer.next() is None
    framer.feed(b"\n")
    assert framer.next() == Continue()
    assert framer.next() is None
    framer.feed(b"ab")
    assert framer.next() is None
    framer.feed(b"c {2}\r\n")
    assert framer.next() == Continue()
    framer.feed(b"pw\r\n")
    assert framer.next() == Frame([b"a LOGIN {3}", b"abc", b" {2}", b"pw", b""])
    assert framer.next() is None


def test_literal_plus_needs_no_continuation_and_literal_bytes_are_opaque():
    data = b"a LOGIN {8+}\r\n{1}\r\nx\r\n {0}\r\n\r\nb NOOP\r\n"
    assert frame_events(data) == [Continue(), Frame([b"a LOGIN {8+}", b"{1}\r\nx\r\n", b" {0}", b"", b""]),
                                  Frame([b"b NOOP"])]


def test_literal_limit_is_looked_up_with_the_command_name():
    asked = []

    def limit(name):
        asked.append(name)
        return 100

    events([b"a append x {1+}\r\ny\r\nb UID fetch 1 {1+}\r\nx\r\nc uid {1+}\r\nx\r\n"
            b"d {1+}\r\nx\r\n"], max_literal=limit)
    assert asked == ["APPEND", "UID FETCH", "UID", ""]


def test_oversized_synchronizing_literal_is_refused_without_reading_it():
    evs = frame_events(b"a APPEND x {11}\r\nb NOOP\r\n", max_literal=lambda name: 10)
    assert evs == [Reject("a", "literal too big", "TOOBIG", "NO"), Frame([b"b NOOP"])]


def test_literal_at_the_limit_is_read():
    evs = frame_events(b"a APPEND x {10}\r\n0123456789\r\n", max_literal=lambda name: 10)
    assert evs == [Continue(), Frame([b"a APPEND x {10}", b"0123456789", b""])]


def test_oversized_literal_plus_is_read_and_dropped_then_refused_with_bad():
    data = b"a LOGIN {20+}\r\n" + b"x" * 20 + b" {3+}\r\nabc\r\nb NOOP\r\n"
    evs = frame_events(data, max_literal=lambda name: 10)
    assert evs == [Reject("a", "literal too big", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_dropped_command_ends_at_a_synchronizing_literal():
    data = b"a LOGIN {20+}\r\n" + b"x" * 20 + b" {3}\r\nb NOOP\r\n"
    evs = frame_events(data, max_literal=lambda name: 10)
    assert evs == [Reject("a", "literal too big", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_dropped_literal_is_never_buffered():
    framer = Framer(max_literal=lambda name: 1 << 20)
    framer.feed(b"a APPEND x {3145728+}\r\n")
    assert framer.next() is None
    chunk = b"y" * 65536
    for _ in range(48):
        framer.feed(chunk)
        assert framer.next() is None
        assert framer.buffered() == 0
    framer.feed(b"\r\nb NOOP\r\n")
    assert drain(framer) == [Reject("a", "literal too big", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_accepted_literal_is_taken_out_of_the_read_buffer():
    framer = Framer(max_literal=lambda name: 1 << 20)
    framer.feed(b"a APPEND x {200000+}\r\n")
    for _ in range(4):
        framer.feed(b"z" * 50000)
        assert framer.next() is None
        assert framer.buffered() == 0
    framer.feed(b"\r\n")
    frame = framer.next()
    assert frame.parts[1] == b"z" * 200000


def test_absurd_literal_plus_closes_the_connection():
    framer = Framer(max_literal=lambda name: 1 << 20)
    framer.feed(b"a APPEND x {4194305+}\r\nxxxx")
    assert framer.next() == Close("literal too big")
    framer.feed(b"b NOOP\r\n")
    assert framer.next() is None
    assert framer.buffered() == 0
    # Four times the limit is still dropped and answered.
    evs = events([b"a APPEND x {4194304+}\r\n", b"q" * 4194304, b"\r\n"], max_literal=lambda name: 1 << 20)
    assert evs == [Reject("a", "literal too big", "TOOBIG", "BAD")]


def test_refused_literal_plus_over_a_gibibyte_closes_even_within_four_times_the_limit():
    evs = events([b"a APPEND x {1073741825+}\r\n"], max_literal=lambda name: 1 << 29)
    assert evs == [Close("literal too big")]


def test_small_refused_literal_plus_is_dropped_even_with_a_zero_limit():
    evs = events([b"a LOGIN {5+}\r\nabcde\r\nb NOOP\r\n"], max_literal=lambda name: 0)
    assert evs == [Reject("a", "literal too big", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_line_of_max_line_octets_passes_and_one_more_is_refused():
    ok = b"a " + b"x" * 98
    assert frame_events(ok + b"\r\n", max_line=100) == [Frame([ok])]
    assert frame_events(ok + b"\n", max_line=100) == [Frame([ok])]
    evs = frame_events(ok + b"y\r\nb NOOP\r\n", max_line=100)
    assert evs == [Reject("a", "line too long", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_long_line_is_dropped_as_it_arrives():
    framer = Framer(max_line=100)
    framer.feed(b"t1 SEARCH ")
    for _ in range(1000):
        framer.feed(b"x" * 1000)
        assert framer.next() is None
        assert framer.buffered() <= 102
    framer.feed(b"\r\nt2 NOOP\r\n")
    assert drain(framer) == [Reject("t1", "line too long", "TOOBIG", "BAD"), Frame([b"t2 NOOP"])]


def test_a_line_dropped_past_a_mebibyte_closes_the_connection():
    """attack15: under COMPRESS=DEFLATE, 6 MB from a client inflated to a 6 GB line that the
    framer read and dropped for as long as it came, at a core's worth of CPU."""
    framer = Framer(max_line=100)
    framer.feed(b"t1 SEARCH ")
    closed = None
    for _ in range(2000):
        framer.feed(b"x" * 1000)
        closed = framer.next()
        if closed is not None:
            break
    assert closed == Close("line too long")
    framer.feed(b"\r\nt2 NOOP\r\n")
    assert framer.next() is None and framer.buffered() == 0


def test_the_literals_of_a_dropped_command_count_together():
    """Each {n+} of a dropped command within four times the limit, all of them together not:
    one command could otherwise make the server read and drop gigabytes."""
    literal = 3 << 20
    chunks = [b"a APPEND x {%d+}\r\n" % literal] + [b"q" * literal + b" {%d+}\r\n" % literal] * 3
    evs = events(chunks + [b"\r\nb NOOP\r\n"], max_literal=lambda name: 1 << 20)
    assert evs == [Close("literal too big")]
    # One such literal alone is still dropped and answered.
    evs = events([chunks[0], b"q" * literal, b"\r\nb NOOP\r\n"], max_literal=lambda name: 1 << 20)
    assert evs == [Reject("a", "literal too big", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_long_line_ending_in_a_literal_drops_the_literal_too():
    long = b"a LOGIN " + b"x" * 200
    evs = frame_events(long + b" {5+}\r\nab\r\nc\r\nb NOOP\r\n", max_line=100)
    assert evs == [Reject("a", "line too long", "TOOBIG", "BAD"), Frame([b"b NOOP"])]
    evs = frame_events(long + b" {5}\r\nb NOOP\r\n", max_line=100)
    assert evs == [Reject("a", "line too long", "TOOBIG", "BAD"), Frame([b"b NOOP"])]


def test_long_continuation_line_keeps_the_tag():
    data = b"a LOGIN {1+}\r\nx " + b"y" * 200 + b"\r\nb NOOP\r\n"
    assert frame_events(data, max_line=100) == [Reject("a", "line too long", "TOOBIG", "BAD"),
                                                Frame([b"b NOOP"])]


def test_long_line_without_a_readable_tag():
    assert frame_events(b"+" * 300 + b"\r\n", max_line=100) == [Reject(None, "line too long", "TOOBIG", "BAD")]


def test_command_size_counts_lines_and_all_literals_but_the_largest():
    small = b"a LOGIN {3+}\r\nabc {3+}\r\nabc\r\n"
    assert frame_events(small, max_command=40) == [Frame([b"a LOGIN {3+}", b"abc", b" {3+}", b"abc", b""])]
    many = b"a LOGIN" + b" {3+}\r\nabc" * 20 + b"\r\nb NOOP\r\n"
    assert frame_events(many, max_command=40) == [Reject("a", "command too long", "TOOBIG", "BAD"),
                                                  Frame([b"b NOOP"])]
    sync = b"a LOGIN {20+}\r\n" + b"u" * 20 + b" {15}\r\nb NOOP\r\n"
    assert frame_events(sync, max_command=30) == [Reject("a", "command too long", "TOOBIG", "NO"),
                                                  Frame([b"b NOOP"])]
    sync_line = b"a LOGIN {20+}\r\n" + b"u" * 20 + b" " * 20 + b"{1}\r\nb NOOP\r\n"
    assert frame_events(sync_line, max_command=30) == [Reject("a", "command too long", "TOOBIG", "BAD"),
                                                       Frame([b"b NOOP"])]
    big = b"a APPEND x {1000+}\r\n" + b"m" * 1000 + b"\r\n"
    assert frame_events(big, max_command=40, max_literal=lambda name: 1000)[0].parts[1] == b"m" * 1000


@pytest.mark.parametrize("max_line,max_command", [(60, 100), (200, 300), (20, 1000)])
def test_random_streams_frame_the_same_however_they_are_split(max_line, max_command):
    words = [b"a ", b"LOGIN ", b"APPEND ", b"{3}", b"{3+}", b"{70+}", b"{999999+}", b"{20}", b"\r\n", b"\n",
             b"\r", b"x", b"y" * 40, b"z" * 150, b" ", b"b NOOP\r\n"]
    rng = random.Random(max_line)
    limits = {"max_line": max_line, "max_command": max_command, "max_literal": lambda name: 30}
    for _ in range(500):
        data = b"".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        whole = events([data], **limits)
        assert events(pieces(data, rng.randrange(1 << 30)), **limits) == whole, data


def test_a_malformed_marker_is_no_literal():
    assert frame_events(b"a LOGIN {x}\r\n") == [Frame([b"a LOGIN {x}"])]
    assert parse_error(b"a LOGIN {x}\r\n").tag == "a"


# -- the tokenizer and general errors -----------------------------------------------------------

def test_tag_is_kept_in_errors():
    err = parse_error(b"x1 FROB 1\r\n")
    assert (err.tag, str(err), err.code, err.status) == ("x1", "unknown command", None, "BAD")
    assert parse_error(b"x2 UID FROB 1\r\n").tag == "x2"
    assert parse_error(b"x3 UID\r\n").tag == "x3"
    assert parse_error(b"x4\r\n").tag == "x4"
    assert parse_error(b"x5 LOGIN a\r\n").tag == "x5"
    assert str(parse_error(b"x6 LOGIN a\r\n")) == "missing password"


def test_no_tag():
    assert (parse_error(b"\r\n").tag, str(parse_error(b"\r\n"))) == (None, "empty command line")
    assert parse_error(b"+ NOOP\r\n").tag is None
    assert parse_error(b"a(b NOOP\r\n").tag is None
    assert parse_error(b" NOOP\r\n").tag is None


def test_command_names_and_keys_are_case_insensitive():
    assert parse(b"a noop\r\n") == Command("a", "NOOP")
    assert parse(b"a Uid Expunge 1\r\n") == c.Expunge("a", "UID EXPUNGE", SequenceSet(((1, 1),)), uid=True)


def test_commands_without_arguments():
    for name in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "IDLE", "NAMESPACE"):
        assert parse(f"t {name}\r\n".encode()) == Command("t", name)
        assert str(parse_error(f"t {name} x\r\n".encode())) == "unexpected extra arguments"
    assert parse(b"t EXPUNGE\r\n") == c.Expunge("t", "EXPUNGE", sequence=None, uid=False)


def test_quoted_strings_take_only_two_escapes_and_utf8():
    assert args(b'a LOGIN "a\\\\b\\"c" "p\xc3\xa4ss w"\r\n') == {"user": 'a\\b"c', "password": "päss w"}
    assert str(parse_error(b'a LOGIN "a\\nb" x\r\n')) == "malformed quoted string"
    assert str(parse_error(b'a LOGIN "ab x\r\n')) == "malformed quoted string"
    assert str(parse_error(b'a LOGIN "\xff" x\r\n')) == "user name is not valid UTF-8"


def test_tokens_must_be_separated():
    assert str(parse_error(b'a LOGIN "a""b"\r\n')) == "arguments must be separated by a space"
    assert str(parse_error(b"a STATUS x (MESSAGES)(UIDNEXT)\r\n")) == "arguments must be separated by a space"


def test_extra_spaces_are_tolerated():
    assert args(b"a LOGIN  fred   pw \r\n") == {"user": "fred", "password": "pw"}


def test_atoms_refuse_8bit_and_control_bytes():
    assert str(parse_error(b"a LOGIN fr\xc3\xa9d pw\r\n")) == "invalid character in an atom"
    assert str(parse_error(b"a LOGIN fr\x01d pw\r\n")) == "invalid character in an atom"
    assert str(parse_error(b"a LOGIN fr*d pw\r\n")) == "invalid character in user name"


def test_nesting_limit():
    ok = b"a SEARCH " + b"(" * 16 + b"ALL" + b")" * 16 + b"\r\n"
    assert args(ok)["query"] == ("all",)
    err = parse_error(b"a SEARCH " + b"(" * 17 + b"ALL" + b")" * 17 + b"\r\n")
    assert (str(err), err.code, err.tag) == ("lists nested too deeply", "LIMIT", "a")


def test_token_count_limit():
    # Lines this long only pass a framer configured for them: parse the frame directly.
    # STORE's arguments: the set, the item, the list, and the flags in it.
    def store(flags: int) -> Frame:
        return Frame([b"a STORE 1 FLAGS (" + b" ".join([b"\\Seen"] * flags) + b")"])

    assert len(parse_command(store(99_997)).flags) == 99_997
    with pytest.raises(ParseError) as info:
        parse_command(store(99_998))
    assert (str(info.value), info.value.code, info.value.tag) == ("too many arguments", "LIMIT", "a")


def test_unbalanced_parentheses():
    assert str(parse_error(b"a FETCH 1 (FLAGS\r\n")) == "missing ')'"
    assert str(parse_error(b"a FETCH 1 FLAGS)\r\n")) == "unexpected ')'"


# -- authentication ---------------------------------------------------------------------------

def test_login_with_literals_split_across_reads():
    data = b"a LOGIN {4}\r\nfr\xc3\xa9 {5+}\r\np w\r\n\r\n"
    assert frame_events(data)[0] == Continue()
    assert args(data) == {"user": "fré", "password": "p w\r\n"}
    assert args(b"a LOGIN NIL \"\"\r\n") == {"user": "NIL", "password": ""}
    assert args(b"a LOGIN [me] pw\r\n") == {"user": "[me]", "password": "pw"}


def test_authenticate():
    assert args(b"a AUTHENTICATE plain\r\n") == {"mechanism": "PLAIN", "initial": None}
    assert args(b"a AUTHENTICATE PLAIN AGZyZWQAcHc=\r\n") == {"mechanism": "PLAIN", "initial": "AGZyZWQAcHc="}
    assert args(b"a AUTHENTICATE PLAIN =\r\n") == {"mechanism": "PLAIN", "initial": ""}
    assert str(parse_error(b"a AUTHENTICATE\r\n")) == "missing mechanism"
    assert str(parse_error(b"a AUTHENTICATE PLAIN a b\r\n")) == "unexpected extra arguments"


def test_enable_and_id():
    assert args(b"a ENABLE condstore UTF8=ACCEPT\r\n") == {"capabilities": ("CONDSTORE", "UTF8=ACCEPT")}
    assert str(parse_error(b"a ENABLE\r\n")) == "missing capability"
    assert args(b'a ID ("name" "Thunderbird" "version" "115.0" "os" NIL)\r\n') == {
        "params": {"name": "Thunderbird", "version": "115.0", "os": None}}
    assert args(b"a ID nil\r\n") == {"params": None}
    assert args(b"a ID ()\r\n") == {"params": {}}
    assert args(b'a ID ({4+}\r\nname "x")\r\n') == {"params": {"name": "x"}}
    assert str(parse_error(b'a ID ("name")\r\n')) == "ID parameters must come in pairs"
    assert str(parse_error(b"a ID (name x)\r\n")) == "ID field name must be a string"
    assert parse_error(b"a ID (" + b'"k" "v" ' * 31 + b")\r\n").code == "LIMIT"
    assert str(parse_error(b'a ID ("' + b"k" * 31 + b'" "v")\r\n')) == "ID field name too long"
    assert str(parse_error(b'a ID ("k" "' + b"v" * 1025 + b'")\r\n')) == "ID field value too long"


# -- mailboxes --------------------------------------------------------------------------------

def test_select_and_examine():
    assert parse(b"a SELECT inbox\r\n") == c.Select("a", "SELECT", mailbox="INBOX", condstore=False)
    assert not parse(b"a SELECT inbox\r\n").readonly and parse(b"a EXAMINE inbox\r\n").readonly
    assert args(b'a EXAMINE "Sent" (condstore)\r\n') == {"mailbox": "Sent", "condstore": True, "qresync": None}
    assert str(parse_error(b"a SELECT x (FOO)\r\n")) == "unknown select parameter"
    assert str(parse_error(b"a SELECT x ()\r\n")) == "empty select parameters"
    assert str(parse_error(b"a SELECT\r\n")) == "missing mailbox name"


def test_select_qresync_parameters():
    # RFC 7162 §3.2.5 and its examples
    assert args(b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))\r\n")["qresync"] == \
        c.QResync(67890007, 20050715194045000, SequenceSet(((41, 41), (43, 211), (214, 541))))
    got = args(b"a EXAMINE INBOX (QRESYNC (67890007 9006 41:211 (1:15,20:30 1:15,20:30)) CONDSTORE)\r\n")
    assert got["condstore"] and got["qresync"] == c.QResync(
        67890007, 9006, SequenceSet(((41, 211),)), SequenceSet(((1, 15), (20, 30))), SequenceSet(((1, 15), (20, 30))))
    assert args(b"a SELECT INBOX (QRESYNC (1 2 (3 4)))\r\n")["qresync"].known_uids is None
    assert str(parse_error(b"a SELECT x (QRESYNC (1 2 3 (1:2 5)))\r\n")) == \
        "sequence match data: the two sets differ in size"
    assert str(parse_error(b"a SELECT x (QRESYNC (1 2 3 (1:* 5)))\r\n")) == "sequence match data cannot hold *"
    assert str(parse_error(b"a SELECT x (QRESYNC (0 2))\r\n")) == "UIDVALIDITY out of range"
    assert str(parse_error(b"a SELECT x (QRESYNC (1))\r\n")) == "missing mod-sequence"
    assert str(parse_error(b"a SELECT x (QRESYNC (1 2 3 4))\r\n")) == "sequence match data must be a parenthesized list"


def test_fetch_vanished_modifier():
    assert args(b"a UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)\r\n")["vanished"]
    for wrong in (b"a FETCH 1 (FLAGS) (CHANGEDSINCE 1 VANISHED)\r\n", b"a UID FETCH 1 (FLAGS) (VANISHED)\r\n"):
        assert str(parse_error(wrong)) == "VANISHED needs UID FETCH and CHANGEDSINCE"


def test_mailbox_names_decode_modified_utf7_and_inbox():
    assert args(b"a SELECT &U,BTFw-/&ZeVnLIqe-\r\n")["mailbox"] == "台北/日本語"
    assert args(b'a SELECT "Inbox/Entw&APw-rfe"\r\n')["mailbox"] == "INBOX/Entwürfe"
    assert args(b"a SELECT inboxes\r\n")["mailbox"] == "inboxes"
    assert args(b"a SELECT foo/inbox\r\n")["mailbox"] == "foo/inbox"
    assert args(b"a SELECT {6+}\r\nA&-B C\r\n")["mailbox"] == "A&B C"
    assert args(b"a SELECT [Gmail]/Sent\r\n")["mailbox"] == "[Gmail]/Sent"
    # Not modified UTF-7: a name that cannot exist (the store refuses its lone surrogate), so
    # the command answers NO rather than BAD, as Dovecot does.
    assert args(b'a SELECT "&Jjo!"\r\n')["mailbox"] == CANNOT_EXIST + "&Jjo!"
    assert args(b'a SELECT "caf\xc3\xa9"\r\n')["mailbox"].startswith(CANNOT_EXIST + "caf")
    assert str(parse_error(b'a SELECT "x&AAA-"\r\n')) == "control character in mailbox name"


def test_create_with_special_use():
    assert parse(b"a CREATE Foo\r\n") == c.Create("a", "CREATE", mailbox="Foo", special_use=())
    assert args(b"a CREATE Sent (USE (\\sent \\Archive))\r\n") == {"mailbox": "Sent",
                                                                  "special_use": ("\\Sent", "\\Archive")}
    assert args(b"a CREATE X (USE (\\Important))\r\n")["special_use"] == ("\\Important",)
    assert str(parse_error(b"a CREATE X (USE (Sent))\r\n")) == "invalid special-use attribute"
    assert str(parse_error(b"a CREATE X (USE ())\r\n")) == "empty USE attributes"
    assert str(parse_error(b"a CREATE X (FOO (\\Sent))\r\n")) == "unknown create parameter"


def test_mailbox_commands():
    kinds = {"DELETE": c.Delete, "SUBSCRIBE": c.Subscribe, "UNSUBSCRIBE": c.Unsubscribe,
             "GETQUOTAROOT": c.GetQuotaRoot}
    for name, kind in kinds.items():
        assert parse(f"a {name} \"a b\"\r\n".encode()) == kind("a", name, mailbox="a b")
    assert args(b"a RENAME inbox/x {3+}\r\nnew\r\n") == {"old": "INBOX/x", "new": "new"}
    assert str(parse_error(b"a RENAME x\r\n")) == "missing new mailbox name"


def test_status():
    assert args(b"a STATUS INBOX (messages UIDNEXT uidvalidity UNSEEN RECENT HIGHESTMODSEQ SIZE DELETED "
                b"APPENDLIMIT)\r\n") == {"mailbox": "INBOX", "items": (
                    "MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT", "HIGHESTMODSEQ", "SIZE", "DELETED",
                    "APPENDLIMIT")}
    assert str(parse_error(b"a STATUS INBOX (MESSAGES FOO)\r\n")) == "unknown status item FOO"
    assert str(parse_error(b"a STATUS INBOX ()\r\n")) == "empty status item list"
    assert str(parse_error(b"a STATUS INBOX MESSAGES\r\n")) == "status items must be a parenthesized list"


NO_RETURN = c.ListReturn(subscribed=False, children=False, special_use=False, status=None)


def test_list_basic():
    assert args(b'a LIST "" *\r\n') == {"reference": "", "patterns": ("*",), "select": (), "returns": NO_RETURN}
    assert args(b'a LIST "" ""\r\n')["patterns"] == ("",)
    assert args(b"a LIST inbox/ %/&U,BTFw-*\r\n") == {"reference": "INBOX/", "patterns": ("%/台北*",),
                                                     "select": (), "returns": NO_RETURN}
    assert args(b'a LIST "" inbox\r\n')["patterns"] == ("INBOX",)
    assert args(b'a LIST "" InBoX/%\r\n')["patterns"] == ("INBOX/%",)
    assert args(b'a LIST "" "&Jjo"\r\n')["patterns"] == (CANNOT_EXIST + "&Jjo",)  # matches nothing


def test_list_extended():
    assert args(b'a LIST (subscribed RECURSIVEMATCH) "" ("INBOX" %/x) RETURN (CHILDREN special-use '
                b"STATUS (MESSAGES UNSEEN) SUBSCRIBED)\r\n") == {
        "reference": "", "patterns": ("INBOX", "%/x"), "select": ("SUBSCRIBED", "RECURSIVEMATCH"),
        "returns": c.ListReturn(subscribed=True, children=True, special_use=True, status=("MESSAGES", "UNSEEN"))}
    assert args(b'a LIST (SPECIAL-USE) "" *\r\n')["select"] == ("SPECIAL-USE",)
    assert args(b'a LIST () "" * RETURN ()\r\n') == {"reference": "", "patterns": ("*",), "select": (),
                                                    "returns": NO_RETURN}
    assert str(parse_error(b'a LIST (RECURSIVEMATCH) "" *\r\n')) == "RECURSIVEMATCH needs another selection option"
    assert str(parse_error(b'a LIST (FOO) "" *\r\n')) == "unknown selection option FOO"
    assert str(parse_error(b'a LIST "" * RETURN (FOO)\r\n')) == "unknown return option FOO"
    assert str(parse_error(b'a LIST "" * RETURN (STATUS (BAR))\r\n')) == "unknown status item BAR"
    assert str(parse_error(b'a LIST "" * FOO (CHILDREN)\r\n')) == "expected RETURN"
    assert str(parse_error(b'a LIST "" ()\r\n')) == "empty pattern list"


def test_lsub():
    assert parse(b'a LSUB "" Lists/%\r\n') == c.Lsub("a", "LSUB", reference="", pattern="Lists/%")
    assert str(parse_error(b'a LSUB "" (a b)\r\n')) == "mailbox pattern must be a string"


# -- APPEND ---------------------------------------------------------------------------------

def one(data: bytes) -> c.AppendMessage:
    command = parse(data)
    assert len(command.messages) == 1
    return command.messages[0]


def test_append_forms():
    plain = b"a APPEND Drafts {11}\r\nHello\r\nBody\r\n"
    assert frame_events(plain)[0] == Continue()
    assert args(plain) == {"mailbox": "Drafts", "messages": (c.AppendMessage(message=b"Hello\r\nBody"),)}
    assert one(b"a APPEND INBOX (\\Seen \\draft $Label) {1+}\r\nx\r\n") == c.AppendMessage(
        flags=("\\Seen", "\\Draft", "$Label"), message=b"x")
    assert one(b"a APPEND INBOX () {1+}\r\nx\r\n").flags == ()
    got = one(b'a APPEND INBOX " 7-Feb-1994 21:52:25 -0800" {1+}\r\nx\r\n')
    tz = datetime.timezone(-datetime.timedelta(hours=8))
    assert got.date == datetime.datetime(1994, 2, 7, 21, 52, 25, tzinfo=tz)
    assert got.date.utcoffset() == -datetime.timedelta(hours=8)
    got = one(b'a APPEND INBOX (\\Seen) "17-jul-2023 01:02:03 +0530" {1+}\r\nx\r\n')
    assert got.date == datetime.datetime(2023, 7, 16, 19, 32, 3, tzinfo=UTC)
    assert got.flags == ("\\Seen",)


def test_multiappend_catenate_binary_and_utf8_forms():
    """RFC 3502: messages one after another, each with its own flags and date; RFC 4469
    CATENATE; RFC 3516 literal8; RFC 6855 UTF8 (literal8)."""
    command = parse(b'a APPEND INBOX {1+}\r\nx (\\Seen) "17-jul-2023 01:02:03 +0000" {1+}\r\ny ~{2+}\r\n\0z'
                    b' CATENATE (URL "/INBOX/;uid=1" TEXT {1+}\r\nw) UTF8 (~{1+}\r\nv)\r\n')
    assert command.messages == (
        c.AppendMessage(message=b"x"),
        c.AppendMessage(flags=("\\Seen",), date=datetime.datetime(2023, 7, 17, 1, 2, 3, tzinfo=UTC), message=b"y"),
        c.AppendMessage(message=b"\0z", binary=True),
        c.AppendMessage(catenate=(c.CatenateUrl("/INBOX/;uid=1"), b"w")),
        c.AppendMessage(message=b"v", binary=True, utf8=True))
    assert str(parse_error(b"a APPEND INBOX CATENATE ()\r\n")) == "empty CATENATE list"
    assert str(parse_error(b"a APPEND INBOX CATENATE (TEXT \"x\")\r\n")) == "a CATENATE TEXT part must be a literal"
    assert str(parse_error(b"a APPEND INBOX CATENATE (FOO \"x\")\r\n")) == "unknown CATENATE part FOO"
    assert str(parse_error(b"a APPEND INBOX CATENATE (URL)\r\n")) == "missing CATENATE part value"
    assert str(parse_error(b"a APPEND INBOX UTF8 ({1+}\r\nx)\r\n")) == "UTF8 takes one literal8"
    assert str(parse_error(b"a APPEND INBOX {1+}\r\nx ~{1+}\r\ny z\r\n")) == "the message must be a literal"
    assert str(parse_error(b"a LOGIN ~{1+}\r\nx y\r\n")) == "user name cannot be a literal8"


def test_multiappend_and_catenate_are_bounded():
    many = b"a APPEND INBOX" + b" {1+}\r\nx" * 101 + b"\r\n"
    error = parse_error(many)
    assert error.code == "LIMIT"
    assert len(parse(many.replace(b" {1+}\r\nx" * 101, b" {1+}\r\nx" * 100)).messages) == 100
    parts = b"a APPEND INBOX CATENATE (" + b" ".join([b'URL "/INBOX/;uid=1"'] * 101) + b")\r\n"
    assert parse_error(parts).code == "LIMIT"


def test_an_append_head_parses_with_its_catenate_list_open():
    """What imapd/appending.py asks as a literal begins: the command so far, cut short."""
    head = parse_command(Frame([b'a APPEND INBOX CATENATE (URL "/INBOX/;uid=1" TEXT {3}', b"abc", b""]),
                         partial=True)
    assert head.messages[0].catenate == (c.CatenateUrl("/INBOX/;uid=1"), b"abc")
    with pytest.raises(ParseError):
        parse_command(Frame([b'a APPEND INBOX CATENATE (URL "/INBOX/;uid=1" TEXT {3}', b"abc", b""]))


@pytest.mark.parametrize("date", [b"30-Feb-2020 10:00:00 +0000", b"7-Foo-1994 21:52:25 -0800",
                                  b"07-Feb-1994 24:00:00 +0000", b"07-Feb-1994 21:52:25 +0060",
                                  b"07-Feb-1994 21:52:25", b"07-Feb-94 21:52:25 +0000",
                                  b"07-Feb-1994  21:52:25 +0000", b"007-Feb-1994 21:52:25 +0000"])
def test_append_bad_date_time(date):
    assert str(parse_error(b'a APPEND INBOX "' + date + b'" {1+}\r\nx\r\n')) == "invalid date-time"


def test_append_needs_a_literal():
    assert str(parse_error(b'a APPEND INBOX "hello"\r\n')) == "invalid date-time"
    assert str(parse_error(b"a APPEND INBOX hello\r\n")) == "the message must be a literal"
    assert str(parse_error(b"a APPEND INBOX\r\n")) == "missing message literal"
    assert str(parse_error(b"a APPEND INBOX {1+}\r\nx y\r\n")) == "the message must be a literal"
    assert str(parse_error(b"a APPEND INBOX (\\*) {1+}\r\nx\r\n")) == "flag must be an atom"


# -- FETCH ------------------------------------------------------------------------------------

def items(data: bytes) -> tuple[FetchItem, ...]:
    return args(data)["items"]


def test_fetch_macros_and_simple_items():
    names = lambda data: [i.name for i in items(data)]  # noqa: E731
    assert names(b"a FETCH 1 ALL\r\n") == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    assert names(b"a FETCH 1 fast\r\n") == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    assert names(b"a FETCH 1 FULL\r\n") == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]
    assert names(b"a FETCH 1 (uid Flags INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY MODSEQ RFC822 "
                 b"RFC822.HEADER RFC822.TEXT)\r\n") == [
        "UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY", "MODSEQ", "RFC822",
        "RFC822.HEADER", "RFC822.TEXT"]
    assert items(b"a FETCH 1 RFC822\r\n") == (FetchItem("RFC822"),)
    assert str(parse_error(b"a FETCH 1 (ALL)\r\n")) == "unknown fetch item ALL"
    assert str(parse_error(b"a FETCH 1 ()\r\n")) == "empty fetch item list"
    assert str(parse_error(b"a FETCH 1 FOO\r\n")) == "unknown fetch item FOO"
    assert str(parse_error(b"a FETCH 1 BINARY[1.TEXT]\r\n")) == "a BINARY section is part numbers only"
    assert str(parse_error(b"a FETCH 1 BINARY.SIZE[1]<0.1>\r\n")) == "BINARY.SIZE takes no partial range"
    assert str(parse_error(b"a FETCH 1 BINARY.PEEKX[1]\r\n")) == "unknown fetch item BINARY.PEEKX[1]"
    assert items(b"a FETCH 1 (BINARY[1.2]<3.4> binary.peek[] BINARY.SIZE[2])\r\n") == (
        FetchItem("BINARY[]", section=Section(part=(1, 2)), partial=(3, 4)),
        FetchItem("BINARY[]", section=Section(), peek=True), FetchItem("BINARY.SIZE", section=Section(part=(2,))))


def test_fetch_args():
    assert parse(b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)\r\n") == c.Fetch(
        "a", "UID FETCH", sequence=SequenceSet(((1, None),)), items=(FetchItem("FLAGS"),), changedsince=12345,
        uid=True)
    assert args(b"a FETCH 2 FLAGS\r\n") == {"sequence": SequenceSet(((2, 2),)), "items": (FetchItem("FLAGS"),),
                                            "changedsince": None, "vanished": False, "uid": False}
    assert str(parse_error(b"a FETCH 1 FLAGS (CHANGEDSINCE 0)\r\n")) == "CHANGEDSINCE value out of range"
    assert str(parse_error(b"a FETCH 1 FLAGS (CHANGEDSINCE)\r\n")) == "missing CHANGEDSINCE value"
    assert str(parse_error(b"a FETCH 1 FLAGS (FOO 1)\r\n")) == "unknown fetch modifier FOO"
    assert str(parse_error(b"a FETCH 1 FLAGS ()\r\n")) == "empty fetch modifier list"


@pytest.mark.parametrize("spec,section", [
    (b"", Section()),
    (b"HEADER", Section(text="HEADER")),
    (b"text", Section(text="TEXT")),
    (b"1", Section(part=(1,))),
    (b"1.2.3", Section(part=(1, 2, 3))),
    (b"2.MIME", Section(part=(2,), text="MIME")),
    (b"4.2.HEADER", Section(part=(4, 2), text="HEADER")),
    (b"4.2.TEXT", Section(part=(4, 2), text="TEXT")),
    (b"HEADER.FIELDS (From to)", Section(text="HEADER.FIELDS", fields=("From", "to"))),
    (b'header.fields.not ("Subject" {8+}\r\nX-Mailer)', Section(text="HEADER.FIELDS.NOT",
                                                                fields=("Subject", "X-Mailer"))),
    (b"1.HEADER.FIELDS (DATE)", Section(part=(1,), text="HEADER.FIELDS", fields=("DATE",))),
])
def test_fetch_sections(spec, section):
    assert items(b"a FETCH 1 BODY[" + spec + b"]\r\n") == (FetchItem("BODY[]", section=section),)
    got = items(b"a FETCH 1 (BODY.PEEK[" + spec + b"]<10.2048> UID)\r\n")
    assert got == (FetchItem("BODY[]", section=section, peek=True, partial=(10, 2048)), FetchItem("UID"))


@pytest.mark.parametrize("spec,error", [
    (b"MIME", "invalid section MIME"),
    (b"0", "invalid part number"),
    (b"01", "invalid part number"),
    (b"1.", "invalid section 1."),
    (b"1..2", "invalid section 1..2"),
    (b"HEADER.1", "invalid section HEADER.1"),
    (b"FOO", "invalid section FOO"),
    (b"HEADER.FIELDS", "HEADER.FIELDS needs a list of field names"),
    (b"HEADER.FIELDS ()", "empty header field list"),
    (b"HEADER.FIELDS (From:)", "invalid header field name"),
    (b'HEADER.FIELDS ("Fr om")', "invalid header field name"),
    (b"HEADER (From)", "unexpected arguments in section"),
    (b"TEXT", None),
])
def test_fetch_bad_sections(spec, error):
    data = b"a FETCH 1 BODY[" + spec + b"]\r\n"
    if error is None:
        assert items(data) == (FetchItem("BODY[]", section=Section(text="TEXT")),)
    else:
        assert str(parse_error(data)) == error


@pytest.mark.parametrize("suffix,error", [
    (b"<0.0>", "partial count out of range"),
    (b"<1>", "invalid partial range"),
    (b"<a.1>", "partial origin must be a number"),
    (b"<0.1", "invalid partial range"),
    (b"<4294967296.1>", "partial origin out of range"),
])
def test_fetch_bad_partial(suffix, error):
    assert str(parse_error(b"a FETCH 1 BODY[]" + suffix + b"\r\n")) == error


def test_fetch_partial_on_plain_body_is_not_a_section():
    assert str(parse_error(b"a FETCH 1 BODY<0.1>\r\n")) == "unknown fetch item BODY<0.1>"


# -- sequence sets ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,ranges", [
    ("1", ((1, 1),)),
    ("1:5", ((1, 5),)),
    ("*", ((None, None),)),
    ("5:*", ((5, None),)),
    ("*:5", ((None, 5),)),
    ("7:3", ((7, 3),)),
    ("1,3:4,10:*", ((1, 1), (3, 4), (10, None))),
    ("4294967295", ((4294967295, 4294967295),)),
])
def test_sequence_sets(text, ranges):
    assert args(f"a UID EXPUNGE {text}\r\n".encode()) == {"sequence": SequenceSet(ranges), "uid": True}


@pytest.mark.parametrize("text", ["0", "0:5", "5:0", "1,,2", "1,", ",1", "1:", ":1", "1:2:3", "4294967296",
                                  "4294967295:4294967296", "a", "-1", "+1", "01", "1:*5", "$1", "1,$", "1.5"])
def test_bad_sequence_sets(text):
    assert str(parse_error(f"a COPY {text} x\r\n".encode())) == "invalid sequence set"


def test_sequence_set_must_be_an_atom():
    assert str(parse_error(b'a COPY "1" x\r\n')) == "sequence set must be an atom"
    assert str(parse_error(b"a COPY (1) x\r\n")) == "sequence set must be an atom"


def test_sequence_set_element_limit():
    ok = ",".join(["1"] * 16384)
    assert len(args(f"a UID EXPUNGE {ok}\r\n".encode())["sequence"].ranges) == 16384
    err = parse_error(f"a UID EXPUNGE {ok},1\r\n".encode())
    assert (str(err), err.code) == ("sequence set has too many elements", "LIMIT")


# -- STORE, COPY, MOVE ------------------------------------------------------------------------

def test_store_forms():
    one = SequenceSet(((1, 1),))
    assert parse(b"a STORE 1 FLAGS (\\Seen)\r\n") == c.Store(
        "a", "STORE", sequence=one, mode="set", silent=False, flags=("\\Seen",), unchangedsince=None, uid=False)
    assert args(b"a STORE 1 +flags.silent \\deleted $Junk\r\n") == {
        "sequence": one, "mode": "add", "silent": True, "flags": ("\\Deleted", "$Junk"), "unchangedsince": None,
        "uid": False}
    assert args(b"a STORE 1 -FLAGS ()\r\n") == {
        "sequence": one, "mode": "remove", "silent": False, "flags": (), "unchangedsince": None, "uid": False}
    assert parse(b"a UID STORE 2:4 (UNCHANGEDSINCE 0) FLAGS.SILENT (\\Answered \\Ext)\r\n") == c.Store(
        "a", "UID STORE", sequence=SequenceSet(((2, 4),)), mode="set", silent=True,
        flags=("\\Answered", "\\Ext"), unchangedsince=0, uid=True)
    assert args(b"a STORE 1 (unchangedsince 9223372036854775807) FLAGS x\r\n")["unchangedsince"] == 2**63 - 1


@pytest.mark.parametrize("data,error", [
    (b"a STORE 1 FLAGS\r\n", "missing flags"),
    (b"a STORE 1 *FLAGS (x)\r\n", "store item must be an atom"),
    (b"a STORE 1 +FLAG (x)\r\n", "unknown store item +FLAG"),
    (b"a STORE 1 FLAGS (x) (y)\r\n", "flag must be an atom"),
    (b"a STORE 1 FLAGS (\\)\r\n", "flag must be an atom"),
    (b"a STORE 1 FLAGS (a%b)\r\n", "flag must be an atom"),
    (b"a STORE 1 (UNCHANGEDSINCE 9223372036854775808) FLAGS x\r\n", "UNCHANGEDSINCE value out of range"),
    (b"a STORE 1 (FOO 1) FLAGS x\r\n", "unknown store modifier FOO"),
])
def test_store_errors(data, error):
    assert str(parse_error(data)) == error


def test_copy_move_and_uid_expunge():
    kinds = {"COPY": (c.Copy, False), "MOVE": (c.Move, False), "UID COPY": (c.Copy, True),
             "UID MOVE": (c.Move, True)}
    for name, (kind, uid) in kinds.items():
        assert parse(f"a {name} 1:3,7 inbox/Archive\r\n".encode()) == kind(
            "a", name, sequence=SequenceSet(((1, 3), (7, 7))), mailbox="INBOX/Archive", uid=uid)
    assert str(parse_error(b"a UID EXPUNGE\r\n")) == "missing sequence set"
    assert str(parse_error(b"a EXPUNGE 1\r\n")) == "unexpected extra arguments"


# -- SEARCH -----------------------------------------------------------------------------------

def query(criteria: bytes, charset: bytes = b"") -> tuple:
    got = args(b"a SEARCH " + charset + criteria + b"\r\n")
    return got["query"]


D = datetime.date


@pytest.mark.parametrize("criteria,tree", [
    (b"ALL", ("all",)),
    (b"ANSWERED", ("flag", "\\Answered", True)),
    (b"UNANSWERED", ("flag", "\\Answered", False)),
    (b"DELETED", ("flag", "\\Deleted", True)),
    (b"UNDELETED", ("flag", "\\Deleted", False)),
    (b"DRAFT", ("flag", "\\Draft", True)),
    (b"UNDRAFT", ("flag", "\\Draft", False)),
    (b"FLAGGED", ("flag", "\\Flagged", True)),
    (b"UNFLAGGED", ("flag", "\\Flagged", False)),
    (b"SEEN", ("flag", "\\Seen", True)),
    (b"unseen", ("flag", "\\Seen", False)),
    (b"KEYWORD $Forwarded", ("flag", "$Forwarded", True)),
    (b"UNKEYWORD $Junk", ("flag", "$Junk", False)),
    (b"RECENT", ("recent",)),
    (b"NEW", ("and", [("recent",), ("flag", "\\Seen", False)])),
    (b"OLD", ("not", ("recent",))),
    (b"BEFORE 1-Feb-1994", ("before", D(1994, 2, 1))),
    (b'ON "15-mar-2024"', ("on", D(2024, 3, 15))),
    (b"SINCE 01-Jan-2000", ("since", D(2000, 1, 1))),
    (b"SENTBEFORE 29-Feb-2024", ("sentbefore", D(2024, 2, 29))),
    (b"SENTON 31-Dec-1999", ("senton", D(1999, 12, 31))),
    (b"SENTSINCE 9-Sep-2009", ("sentsince", D(2009, 9, 9))),
    (b"LARGER 1024", ("larger", 1024)),
    (b"SMALLER 0", ("smaller", 0)),
    (b"FROM alice", ("from", "alice")),
    (b'TO "bob smith"', ("to", "bob smith")),
    (b"CC {3+}\r\ncar", ("cc", "car")),
    (b"BCC dave", ("bcc", "dave")),
    (b'SUBJECT ""', ("subject", "")),
    (b"BODY hello", ("body", "hello")),
    (b"TEXT world", ("text", "world")),
    (b'HEADER Message-ID "<x@y>"', ("header", "Message-ID", "<x@y>")),
    (b"UID 1:*", ("uidset", SequenceSet(((1, None),)))),
    (b"1:3,5", ("seq", SequenceSet(((1, 3), (5, 5))))),
    (b"*", ("seq", SequenceSet(((None, None),)))),
    (b"NOT SEEN", ("not", ("flag", "\\Seen", True))),
    (b"OR SEEN FLAGGED", ("or", ("flag", "\\Seen", True), ("flag", "\\Flagged", True))),
    (b"MODSEQ 620162338", ("modseq", 620162338)),
    (b'MODSEQ "/flags/\\\\draft" all 620162338', ("modseq", 620162338)),
    (b'MODSEQ "/flags/$Junk" priv 0', ("modseq", 0)),
    (b"(SEEN)", ("flag", "\\Seen", True)),
    (b"(SEEN FLAGGED)", ("and", [("flag", "\\Seen", True), ("flag", "\\Flagged", True)])),
    (b"SEEN (FLAGGED (DELETED)) NEW", ("and", [("flag", "\\Seen", True), ("flag", "\\Flagged", True),
                                               ("flag", "\\Deleted", True), ("recent",),
                                               ("flag", "\\Seen", False)])),
    (b"NOT (FROM a TO b)", ("not", ("and", [("from", "a"), ("to", "b")]))),
    (b"OR OR FROM a FROM b NOT FROM c", ("or", ("or", ("from", "a"), ("from", "b")), ("not", ("from", "c")))),
    (b"or (seen unflagged) uid 4", ("or", ("and", [("flag", "\\Seen", True), ("flag", "\\Flagged", False)]),
                                    ("uidset", SequenceSet(((4, 4),))))),
])
def test_search_keys(criteria, tree):
    assert query(criteria) == tree


def test_search_args_and_uid_search():
    assert parse(b"a UID SEARCH CHARSET utf-8 SUBJECT {5+}\r\n\xc3\xa9t\xc3\xa9 UNDELETED\r\n") == c.Search(
        "a", "UID SEARCH", charset="UTF-8", query=("and", [("subject", "été"), ("flag", "\\Deleted", False)]),
        uid=True)
    assert args(b'a SEARCH CHARSET "US-ASCII" FROM x\r\n') == {"charset": "US-ASCII", "query": ("from", "x"),
                                                                "uid": False, "returns": None}
    assert args(b"a SEARCH FROM \"\xc3\xa9\"\r\n") == {"charset": None, "query": ("from", "é"), "uid": False,
                                                         "returns": None}


def test_search_return_options():
    """RFC 4731 §3.1, RFC 5182 SAVE, RFC 5267 PARTIAL, UPDATE and CONTEXT."""
    assert parse(b"a SEARCH RETURN () ALL\r\n").returns == c.SearchReturn(all=True)
    assert parse(b"a SEARCH RETURN (min Max COUNT) CHARSET UTF-8 ALL\r\n").returns == c.SearchReturn(
        min=True, max=True, count=True)
    assert parse(b"a SEARCH RETURN (SAVE) ALL\r\n").returns == c.SearchReturn(save=True)
    assert parse(b"a SEARCH RETURN (UPDATE CONTEXT) ALL\r\n").returns == c.SearchReturn(all=True, update=True)
    assert parse(b"a SEARCH RETURN (PARTIAL 9:3) ALL\r\n").returns == c.SearchReturn(partial=(3, 9))
    for bad in (b"(PARTIAL 1)", b"(PARTIAL 1:*)", b"(PARTIAL 0:3)", b"(PARTIAL)", b"(BOGUS)", b"ALL"):
        parse_error(b"a SEARCH RETURN " + bad + b" ALL\r\n")


def test_saved_result_dollar():
    """RFC 5182: `$` where a sequence set may stand, alone."""
    saved = SequenceSet((), saved=True)
    assert parse(b"a FETCH $ FLAGS\r\n").sequence == saved
    assert parse(b"a UID COPY $ x\r\n").sequence == saved
    assert parse(b"a SEARCH $ UID $\r\n").query == ("and", [("seq", saved), ("uidset", saved)])


def test_sort_thread_and_cancelupdate():
    command = parse(b"a UID SORT RETURN (MIN) (REVERSE date subject) utf-8 UNSEEN\r\n")
    assert command == c.Sort("a", "UID SORT", keys=(c.SortKey("date", True), c.SortKey("subject")), charset="UTF-8",
                             query=("flag", "\\Seen", False), uid=True, returns=c.SearchReturn(min=True))
    assert parse(b"a THREAD references US-ASCII ALL\r\n") == c.Thread("a", "THREAD", algorithm="REFERENCES",
                                                                      charset="US-ASCII", query=("all",))
    assert parse(b'a CANCELUPDATE "x1" x2\r\n') == c.CancelUpdate("a", "CANCELUPDATE", tags=("x1", "x2"))
    assert str(parse_error(b"a SORT (FOO) UTF-8 ALL\r\n")) == "unknown sort criterion FOO"
    assert str(parse_error(b"a SORT (REVERSE) UTF-8 ALL\r\n")) == "missing sort criterion"
    assert parse_error(b"a SORT (SUBJECT) KOI8-R ALL\r\n").code == "BADCHARSET"
    assert str(parse_error(b"a THREAD FOO UTF-8 ALL\r\n")) == "unknown threading algorithm FOO"
    assert str(parse_error(b"a CANCELUPDATE\r\n")) == "missing tag"


def test_search_charset_errors():
    err = parse_error(b"a SEARCH CHARSET ISO-8859-1 FROM x\r\n")
    assert (str(err), err.code, err.status, err.tag) == ("unsupported charset ISO-8859-1", "BADCHARSET", "NO", "a")
    assert str(parse_error(b'a SEARCH CHARSET US-ASCII FROM "\xc3\xa9"\r\n')) == "FROM argument is not valid US-ASCII"
    assert str(parse_error(b'a SEARCH CHARSET UTF-8 FROM "\xff"\r\n')) == "FROM argument is not valid UTF-8"
    assert str(parse_error(b"a SEARCH FROM \"\xff\"\r\n")) == "FROM argument is not valid UTF-8"


@pytest.mark.parametrize("criteria,error", [
    (b"", "missing search criteria"),
    (b"CHARSET UTF-8", "missing search criteria"),
    (b"FOO", "unknown search key FOO"),
    (b"FROM", "missing FROM argument"),
    (b"OR SEEN", "missing search key"),
    (b"NOT", "missing search key"),
    (b"()", "empty parenthesized search criteria"),
    (b'"SEEN"', "a search key must be an atom"),
    (b"BEFORE 30-Feb-2020", "invalid BEFORE argument"),
    (b"SINCE 1-Foo-2020", "invalid SINCE argument"),
    (b"ON 1-Jan-20", "invalid ON argument"),
    (b"ON {10+}\r\n1-Jan-2020", "invalid ON argument"),
    (b"LARGER -1", "LARGER argument must be a number"),
    (b"SMALLER x", "SMALLER argument must be a number"),
    (b"KEYWORD \\Seen", "KEYWORD argument must be an atom"),
    (b"UID 0", "invalid UID argument"),
    (b"0", "invalid sequence set"),
    (b"1:*:2", "invalid sequence set"),
    (b'MODSEQ "/flags/" all 1', "invalid MODSEQ entry name"),
    (b'MODSEQ "/x/\\\\Seen" all 1', "invalid MODSEQ entry name"),
    (b'MODSEQ "/flags/\\\\Seen" both 1', "invalid MODSEQ entry type"),
    (b"MODSEQ 9223372036854775808", "MODSEQ value out of range"),
    (b"HEADER Subject", "missing HEADER argument"),
    (b"RETURN (ALL)", "missing search criteria"),
    (b"ALL RETURN (ALL)", "unknown search key RETURN"),
])
def test_search_errors(criteria, error):
    assert str(parse_error(b"a SEARCH " + criteria + b"\r\n")) == error


def test_search_nesting_limit():
    assert query(b"NOT " * 256 + b"ALL")[0] == "not"
    err = parse_error(b"a SEARCH " + b"NOT " * 257 + b"ALL\r\n")
    assert (str(err), err.code) == ("search criteria nested too deeply", "LIMIT")


def test_search_key_limit():
    """A search costs about keys x messages: at most MAX_KEYS keys, NOT/OR/groups included."""
    assert query(b"TEXT x " * 1000)[0] == "and"
    err = parse_error(b"a SEARCH " + b"TEXT x " * 1001 + b"\r\n")
    assert (str(err), err.code) == ("more than 1000 search keys", "LIMIT")
    err = parse_error(b"a SEARCH " + b"OR SEEN " * 500 + b"(SEEN)\r\n")
    assert err.code == "LIMIT"


# -- quota ------------------------------------------------------------------------------------

def test_quota_commands():
    assert parse(b'a GETQUOTA ""\r\n') == c.GetQuota("a", "GETQUOTA", root="")
    assert parse(b'a SETQUOTA "" (storage 512 MESSAGE 1000)\r\n') == c.SetQuota(
        "a", "SETQUOTA", root="", limits={"STORAGE": 512, "MESSAGE": 1000})
    assert args(b"a SETQUOTA x ()\r\n") == {"root": "x", "limits": {}}
    assert str(parse_error(b"a SETQUOTA x (STORAGE)\r\n")) == "missing resource limit"


# -- modified UTF-7 ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,wire", [
    ("INBOX", b"INBOX"),
    ("&", b"&-"),
    ("a&b&&", b"a&-b&-&-"),
    ("&-", b"&--"),
    ("Entwürfe", b"Entw&APw-rfe"),
    ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 §5.1.3
    ("😀", b"&2D3eAA-"),
    ("a😀b𝄞", b"a&2D3eAA-b&2DTdHg-"),
    ("é&é", b"&AOk-&-&AOk-"),
    ("x\x7fy", b"x&AH8-y"),
    ("", b""),
])
def test_utf7_round_trip(text, wire):
    assert utf7.encode(text) == wire
    assert utf7.decode(wire) == text


def test_utf7_round_trip_of_every_plane():
    text = "".join(chr(c) for c in (0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFD, 0x10000, 0x1F600, 0x10FFFF))
    assert utf7.decode(utf7.encode(text)) == text


@pytest.mark.parametrize("wire", [
    b"&Jjo!",  # not base64 and unterminated
    b"&Jjo!-",  # outside the alphabet
    b"&Jjo",  # unterminated shift
    b"&",
    b"&Jjo=-",  # padding is not modified base64
    b"&Jj-",  # ends inside a UTF-16 unit
    b"&Jjp-",  # non-zero leftover bits
    b"&AGE-",  # printable ASCII ("a") encoded
    b"&2D0-",  # a lone high surrogate
    b"&3gA-",  # a lone low surrogate
    b"&U,BTFw-&ZeVnLIqe-",  # null shift between two runs
    b"caf\xc3\xa9",  # raw 8-bit
    b"tab\there",
])
def test_utf7_rejects_malformed(wire):
    with pytest.raises(utf7.UTF7Error):
        utf7.decode(wire)
