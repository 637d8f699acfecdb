"""SEARCH's extensions, SORT and THREAD through the daemon's own session over a real store
(tests/imap_script.py): ESEARCH (RFC 4731), SEARCHRES (RFC 5182), SORT and SORT=DISPLAY
(RFC 5256, RFC 5957), THREAD=REFERENCES and ORDEREDSUBJECT (RFC 5256), ESORT and
CONTEXT=SEARCH/SORT (RFC 5267). Orders and trees in detail are tests/test_imap_sort.py's.
"""

from __future__ import annotations

import re

import pytest

from imap_script import ScriptServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-search"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def put(server: ScriptServer, user: str, *headers: str, body: str = "Hello.") -> None:
    """A message with exactly these header fields, into INBOX."""
    server.store.ensure_account(user)
    server.store.append(user, "INBOX", ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode())


def esearch(lines: list[str]) -> list[str]:
    """The ESEARCH responses, their `(TAG "...")` left out."""
    return [re.sub(r'^ESEARCH \(TAG "[^"]*"\) ?', "", line) for line in lines if line.startswith("ESEARCH")]


def selected(server: ScriptServer, user: str):
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    return imap


def test_capabilities_are_offered(server, user):
    caps = server.login(user).transact("ok", "CAPABILITY").untagged[0].split()
    for cap in ("ESEARCH", "SEARCHRES", "SORT", "SORT=DISPLAY", "THREAD=REFERENCES", "THREAD=ORDEREDSUBJECT",
                "ESORT", "CONTEXT=SEARCH", "CONTEXT=SORT"):
        assert cap in caps


# -- ESEARCH ------------------------------------------------------------------------------------

def test_esearch_return_options(server, user):
    for i in range(5):
        server.deliver(user, subject=f"m{i}")
    imap = selected(server, user)
    imap.transact("ok", "STORE 2,4 +FLAGS (\\Seen)")
    reply = imap.transact("ok", "SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN")
    assert re.fullmatch(r'ESEARCH \(TAG "x\d+"\) MIN 1 MAX 5 ALL 1,3,5 COUNT 3', reply.untagged[0]), reply.untagged
    assert esearch(imap.transact("ok", "SEARCH RETURN () 2:4").untagged) == ["ALL 2:4"]
    assert esearch(imap.transact("ok", "UID SEARCH RETURN (COUNT) SEEN").untagged) == ["UID COUNT 2"]
    assert esearch(imap.transact("ok", "SEARCH RETURN (MIN MAX) 100").untagged) == [""]  # nothing: no MIN, MAX
    assert esearch(imap.transact("ok", "SEARCH RETURN (COUNT) CHARSET UTF-8 SUBJECT m3").untagged) == ["COUNT 1"]
    imap.transact("bad", "SEARCH RETURN (BOGUS) ALL")
    imap.transact("bad", "SEARCH RETURN (PARTIAL 1) ALL")
    imap.transact("bad", "SEARCH RETURN (PARTIAL 1:*) ALL")
    # a plain SEARCH is answered as before
    assert imap.transact("ok", "SEARCH UNSEEN").untagged == ["SEARCH 1 3 5"]


def test_esearch_with_condstore(server, user):
    for i in range(3):
        server.deliver(user, subject=f"m{i}")
    imap = selected(server, user)
    # FETCH MODSEQ enables CONDSTORE: the client is told HIGHESTMODSEQ, once (RFC 7162 §3.1)
    first = imap.transact("ok", "FETCH 1 (MODSEQ)").untagged
    assert any(re.fullmatch(r"OK \[HIGHESTMODSEQ \d+\] .*", line) for line in first), first
    assert not any("HIGHESTMODSEQ" in line for line in imap.transact("ok", "FETCH 1 (MODSEQ)").untagged)
    modseqs = {}
    for seq in (1, 3, 2):
        line = imap.transact("ok", f"STORE {seq} +FLAGS (\\Seen)").named("FETCH")[0]
        modseqs[seq] = int(re.search(r"MODSEQ \((\d+)\)", line).group(1))
    assert esearch(imap.transact("ok", "SEARCH RETURN (MIN) MODSEQ 1").untagged) == [f"MIN 1 MODSEQ {modseqs[1]}"]
    assert esearch(imap.transact("ok", "SEARCH RETURN (MAX) MODSEQ 1").untagged) == [f"MAX 3 MODSEQ {modseqs[3]}"]
    assert esearch(imap.transact("ok", "SEARCH RETURN () 1:3 MODSEQ 1").untagged) == [f"ALL 1:3 MODSEQ {modseqs[2]}"]
    assert esearch(imap.transact("ok", f"SEARCH RETURN () MODSEQ {modseqs[2] + 1}").untagged) == [""]


def test_search_partial(server, user):
    for i in range(5):
        server.deliver(user, subject=f"m{i}")
    imap = selected(server, user)
    assert esearch(imap.transact("ok", "SEARCH RETURN (PARTIAL 4:2) ALL").untagged) == ["PARTIAL (2:4 2:4)"]
    assert esearch(imap.transact("ok", "SEARCH RETURN (PARTIAL 3:9) 1:2,4:5").untagged) == ["PARTIAL (3:9 4:5)"]
    assert esearch(imap.transact("ok", "SEARCH RETURN (PARTIAL 6:6) ALL").untagged) == ["PARTIAL (6:6 NIL)"]


# -- SEARCHRES ----------------------------------------------------------------------------------

def test_searchres_saves_a_result_for_dollar(server, user):
    for i in range(5):
        server.deliver(user, subject=f"m{i}")
    imap = selected(server, user)
    imap.transact("ok", "STORE 2,4 +FLAGS (\\Seen)")
    # SAVE alone answers nothing (RFC 5182 §2.4); `$` then names the messages
    assert imap.transact("ok", "SEARCH RETURN (SAVE) SEEN").untagged == []
    # \Recent: delivered with no session on INBOX, they are the first SELECT's
    assert imap.transact("ok", "FETCH $ (FLAGS)").named("FETCH") == ["2 (FLAGS (\\Seen \\Recent))",
                                                                     "4 (FLAGS (\\Seen \\Recent))"]
    assert imap.transact("ok", "UID FETCH $ (UID)").named("FETCH") == ["2 (UID 2)", "4 (UID 4)"]
    assert imap.transact("ok", "SEARCH $ SUBJECT m3").untagged == ["SEARCH 4"]
    assert imap.transact("ok", "UID SEARCH UID $").untagged == ["SEARCH 2 4"]
    imap.transact("ok", "STORE $ +FLAGS.SILENT (\\Deleted)")
    imap.transact("ok", "EXPUNGE")
    assert imap.transact("ok", "FETCH $ (UID)").untagged == []  # expunged messages leave `$`
    # SAVE with MIN answers MIN and keeps only that message; with ALL it keeps them all
    assert esearch(imap.transact("ok", "SEARCH RETURN (SAVE MIN) ALL").untagged) == ["MIN 1"]
    assert imap.transact("ok", "UID SEARCH $").untagged == ["SEARCH 1"]
    assert esearch(imap.transact("ok", "SEARCH RETURN (SAVE ALL) 2:3").untagged) == ["ALL 2:3"]
    assert imap.transact("ok", "SEARCH $").untagged == ["SEARCH 2 3"]
    # a failed SAVE empties `$`; a new SELECT does too
    imap.transact("bad", "SEARCH RETURN (SAVE) HEADER \"\" x")
    assert imap.transact("ok", "SEARCH $").untagged == ["SEARCH"]
    imap.transact("ok", "SEARCH RETURN (SAVE) ALL")
    imap.transact("ok", "SELECT INBOX")
    assert imap.transact("ok", "SEARCH $").untagged == ["SEARCH"]


# -- SORT, ESORT --------------------------------------------------------------------------------

def test_sort(server, user):
    put(server, user, "From: Zed <zed@example.test>", "Subject: Re: beta", "Date: Tue, 3 Mar 2020 10:00:00 +0000")
    put(server, user, "From: amy@example.test", "Subject: alpha", "Date: Mon, 2 Mar 2020 10:00:00 +0000",
        body="a longer body than the others have")
    put(server, user, "From: Bob <bob@example.test>", "Subject: [list] beta", "Date: Sun, 1 Mar 2020 10:00:00 +0000")
    imap = selected(server, user)
    assert imap.transact("ok", "SORT (SUBJECT) UTF-8 ALL").untagged == ["SORT 2 1 3"]
    assert imap.transact("ok", "SORT (DATE) US-ASCII ALL").untagged == ["SORT 3 2 1"]
    assert imap.transact("ok", "SORT (REVERSE ARRIVAL) UTF-8 ALL").untagged == ["SORT 3 2 1"]
    assert imap.transact("ok", "SORT (FROM) UTF-8 ALL").untagged == ["SORT 2 3 1"]
    assert imap.transact("ok", "SORT (DISPLAYFROM) UTF-8 ALL").untagged == ["SORT 2 3 1"]  # amy@..., Bob, Zed
    assert imap.transact("ok", "SORT (REVERSE SIZE) UTF-8 ALL").untagged[0].startswith("SORT 2 ")
    imap.transact("ok", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    imap.transact("ok", "EXPUNGE")
    assert imap.transact("ok", "UID SORT (SUBJECT) UTF-8 ALL").untagged == ["SORT 2 3"]
    assert imap.transact("ok", "SORT (SUBJECT) UTF-8 ALL").untagged == ["SORT 1 2"]
    assert imap.transact("no", "SORT (SUBJECT) KOI8-R ALL").code == "BADCHARSET"
    imap.transact("bad", "SORT (BOGUS) UTF-8 ALL")
    imap.transact("bad", "SORT () UTF-8 ALL")
    assert imap.transact("bad", "SORT (" + "SIZE " * 19 + ") UTF-8 ALL").code == "LIMIT"
    imap.transact("bad", "SORT (SUBJECT) UTF-8")  # criteria are not optional
    assert imap.transact("no", "SORT (SUBJECT) ALL").code == "BADCHARSET"  # nor the charset: ALL is read as one


def test_esort_and_sort_partial(server, user):
    for subject in ("d", "b", "e", "a", "c"):
        server.deliver(user, subject=subject)
    imap = selected(server, user)
    reply = imap.transact("ok", "SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL")
    assert esearch(reply.untagged) == ["MIN 4 MAX 3 ALL 4,2,5,1,3 COUNT 5"]  # first and last in sort order
    assert esearch(imap.transact("ok", "UID SORT RETURN (PARTIAL 2:3) (SUBJECT) UTF-8 ALL").untagged) \
        == ["UID PARTIAL (2:3 2,5)"]
    assert esearch(imap.transact("ok", "SORT RETURN () (REVERSE SUBJECT) UTF-8 1:2").untagged) == ["ALL 1:2"]


# -- THREAD -------------------------------------------------------------------------------------

def test_thread_references_and_orderedsubject(server, user):
    put(server, user, "Message-ID: <1@x>", "Subject: plans", "Date: Mon, 2 Mar 2020 10:00:00 +0000")
    put(server, user, "Message-ID: <2@x>", "Subject: Re: plans", "In-Reply-To: <1@x>",
        "Date: Mon, 2 Mar 2020 11:00:00 +0000")
    put(server, user, "Message-ID: <3@x>", "Subject: other", "Date: Mon, 2 Mar 2020 09:00:00 +0000")
    put(server, user, "Message-ID: <4@x>", "Subject: Re: plans", "References: <1@x>\r\n <2@x>",
        "Date: Mon, 2 Mar 2020 12:00:00 +0000")
    put(server, user, "Message-ID: <5@x>", "Subject: Re: plans", "References: <1@x>",
        "Date: Mon, 2 Mar 2020 13:00:00 +0000")
    imap = selected(server, user)
    assert imap.transact("ok", "THREAD REFERENCES UTF-8 ALL").untagged == ["THREAD (3)(1 (2 4)(5))"]
    assert imap.transact("ok", "THREAD ORDEREDSUBJECT UTF-8 ALL").untagged == ["THREAD (3)(1 (2)(4)(5))"]
    assert imap.transact("ok", "THREAD REFERENCES UTF-8 NOT 3").untagged == ["THREAD (1 (2 4)(5))"]
    imap.transact("ok", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    imap.transact("ok", "EXPUNGE")
    # 1 gone: its replies stay together under the missing parent, kept as a dummy
    assert imap.transact("ok", "THREAD REFERENCES UTF-8 ALL").untagged == ["THREAD (2)((1 3)(4))"]
    assert imap.transact("ok", "UID THREAD REFERENCES UTF-8 ALL").untagged == ["THREAD (3)((2 4)(5))"]
    assert imap.transact("ok", "THREAD REFERENCES UTF-8 SUBJECT nothing").untagged == ["THREAD"]
    imap.transact("bad", "THREAD BOGUS UTF-8 ALL")


# -- CONTEXT=SEARCH, CONTEXT=SORT ----------------------------------------------------------------

def test_search_update_follows_changes(server, user):
    for i in range(5):
        server.deliver(user, subject=f"m{i}")
    imap = selected(server, user)
    other = selected(server, user)
    reply = imap.transact("ok", "SEARCH RETURN (UPDATE) SEEN")
    assert esearch(reply.untagged) == [""]
    tag = re.match(r'ESEARCH \(TAG "([^"]+)"\)', reply.untagged[0]).group(1)
    assert esearch(imap.transact("ok", "STORE 1,2,4 +FLAGS.SILENT (\\Seen)").untagged) == ["ADDTO (1 1:2,4)"]
    assert esearch(imap.transact("ok", "STORE 1,2 -FLAGS.SILENT (\\Seen)").untagged) == ["REMOVEFROM (1 1:2)"]
    # another session's change, told with the next command's answer
    other.transact("ok", "STORE 5 +FLAGS.SILENT (\\Seen)")
    assert esearch(imap.transact("ok", "NOOP").untagged) == ["ADDTO (2 5)"]
    # an expunge: REMOVEFROM first, in the numbers the client still knows
    imap.transact("ok", "STORE 3:4 +FLAGS.SILENT (\\Deleted)")
    lines = imap.transact("ok", "EXPUNGE").untagged
    assert lines[0].endswith("REMOVEFROM (1 4)") and lines[1:] == ["4 EXPUNGE", "3 EXPUNGE"]
    server.store.append(user, "INBOX", b"Subject: new\r\n\r\nhi\r\n", flags=["\\Seen"])
    assert esearch(imap.transact("ok", "NOOP").untagged) == ["ADDTO (2 4)"]
    imap.transact("ok", f'CANCELUPDATE "{tag}"')
    assert esearch(imap.transact("ok", "STORE 1 +FLAGS.SILENT (\\Seen)").untagged) == []
    imap.transact("bad", f'CANCELUPDATE "{tag}"')


def test_uid_search_and_sort_updates(server, user):
    for subject in ("c", "a", "b"):
        server.deliver(user, subject=subject)
    imap = selected(server, user)
    assert esearch(imap.transact("ok", "UID SEARCH RETURN (UPDATE ALL) UNSEEN").untagged) == ["UID ALL 1:3"]
    assert esearch(imap.transact("ok", "SORT RETURN (UPDATE ALL) (SUBJECT) UTF-8 UNSEEN").untagged) == ["ALL 2:3,1"]
    lines = esearch(imap.transact("ok", "STORE 3 +FLAGS.SILENT (\\Seen)").untagged)
    assert sorted(lines) == ["REMOVEFROM (2 3)", "UID REMOVEFROM (3 3)"]


def test_live_searches_are_limited(server, user):
    server.deliver(user)
    imap = selected(server, user)
    for _ in range(16):
        assert imap.transact("ok", "SEARCH RETURN (UPDATE) ALL").code is None
    assert imap.transact("ok", "SEARCH RETURN (UPDATE) ALL").code.startswith("NOUPDATE")


def test_sequence_sets_in_an_empty_mailbox_match_nothing(server, user):
    """attack15: `*` in an empty mailbox is 0, and a sequence set reaching it failed the
    command with NO [SERVERBUG] (an index error) instead of matching nothing."""
    imap = selected(server, user)
    for command in ("SEARCH 1:*", "SEARCH *", "UID SEARCH 1:* ALL", "SEARCH RETURN (MIN MAX COUNT) 1:*",
                    "SORT (DATE) UTF-8 1:*", "THREAD REFERENCES UTF-8 *", "SEARCH OR 1:* SUBJECT x"):
        reply = imap.transact("ok", command)
        for line in reply.untagged:  # empty answers: no numbers, no MIN/MAX/COUNT of any
            assert re.fullmatch(r'(SEARCH|SORT|THREAD|ESEARCH \(TAG "x\d+"\)( UID)?( COUNT 0)?)', line), (command, line)
    server.deliver(user, subject="one")
    imap.transact("ok", "NOOP")
    assert imap.transact("ok", "SEARCH 1:*").untagged[-1] == "SEARCH 1"
