"""The sans-IO cores of SORT, THREAD and ESEARCH: base subjects (RFC 5256 §2.1), sort keys
(RFC 5256 §3, RFC 5957), both threading algorithms (RFC 5256 §4) and the ESEARCH forms
(RFC 4731, RFC 5182 SAVE, RFC 5267 PARTIAL and updates). Plain values in and out.
"""

from __future__ import annotations

import pytest

from imapd import results, threads
from imapd.sort import Summary, base_subject, sort
from imapd.syntax import SearchReturn, SortKey
from storage import Envelope, EnvelopeAddress


def message(uid: int, *, subject: str | None = None, date: float | None = None, arrived: float = 0.0, size: int = 10,
            sender: EnvelopeAddress | None = None, to: EnvelopeAddress | None = None, msgid: str | None = None,
            refs: tuple[str, ...] = (), in_reply_to: str | None = None) -> Summary:
    envelope = Envelope(subject=subject, subject_text=subject, from_=(sender,) if sender else None,
                        to=(to,) if to else None, message_id=f"<{msgid}>" if msgid else None,
                        in_reply_to=in_reply_to)
    return Summary(uid=uid, internal_date=arrived, size=size, sent=date, envelope=envelope, references=refs)


# -- base subject -------------------------------------------------------------------------------

@pytest.mark.parametrize("subject, base, reply", [
    ("a", "a", False),
    ("Re: lunch", "lunch", True),
    ("[foo] Fwd: [bar] Re: fw: b (fWd)  (fwd)", "b", True),
    ("Re: [FWD: c]", "c", True),
    ("[xyz]", "[xyz]", False),  # a blob that is all there is stays
    ("[a] [b] topic", "topic", False),
    ("re: [fwd: [fwd: re: [fwd: babylon]]]", "babylon", True),
    ("Ad: Re: Ad: x", "Ad: Re: Ad: x", False),
    ("  many\t  spaces   here ", "many spaces here", False),
    ("", "", False),
    (None, "", False),
])
def test_base_subject(subject, base, reply):
    assert base_subject(subject) == (base, reply)


def test_base_subject_of_a_hostile_subject_is_bounded():
    assert base_subject("[ab]" * 100_000)[0] == "[ab]"  # cut to MAX_SUBJECT, a whole number of blobs
    assert base_subject("re: " * 400 + "x") == ("x", True)
    assert base_subject("re: " * 100_000 + "x") == ("", True)  # only the first MAX_SUBJECT characters count


# -- SORT ---------------------------------------------------------------------------------------

def addr(mailbox: str, host: str = "example.test", name: str | None = None) -> EnvelopeAddress:
    return EnvelopeAddress(name, None, mailbox, host)


def test_sort_keys_and_ties_in_uid_order():
    m = [message(1, arrived=0), message(2, arrived=2), message(3, arrived=1), message(4, arrived=2)]
    uids = lambda keys: [s.uid for s in sort(m, keys)]  # noqa: E731
    assert uids([SortKey("arrival")]) == [1, 3, 2, 4]
    # REVERSE turns the key around; equal messages stay in UID order
    assert uids([SortKey("arrival", reverse=True)]) == [2, 4, 3, 1]


def test_sort_by_date_falls_back_to_arrival():
    m = [message(1, date=100.0, arrived=500), message(2, date=None, arrived=50), message(3, date=10.0)]
    assert [s.uid for s in sort(m, [SortKey("date")])] == [3, 2, 1]


def test_sort_by_subject_size_and_addresses():
    m = [message(1, subject="Re: beta", size=30, sender=addr("zed")),
         message(2, subject="alpha", size=10, sender=addr("Amy")),
         message(3, subject="[list] Beta", size=20, sender=addr("bob"))]
    assert [s.uid for s in sort(m, [SortKey("subject")])] == [2, 1, 3]
    assert [s.uid for s in sort(m, [SortKey("subject"), SortKey("size", reverse=True)])] == [2, 1, 3]
    assert [s.uid for s in sort(m, [SortKey("size")])] == [2, 3, 1]
    assert [s.uid for s in sort(m, [SortKey("from")])] == [2, 3, 1]  # i;ascii-casemap: AMY < BOB < ZED


def test_sort_display_uses_the_decoded_name_or_the_address():
    m = [message(1, sender=addr("a", "b.c", name="foo bar")),
         message(2, sender=addr("b", "c.d")),
         message(3, sender=addr("e", "f.g", name="=?iso-8859-1?q?foo_aar?=")),
         message(4)]
    assert [s.uid for s in sort(m, [SortKey("displayfrom")])] == [4, 2, 3, 1]


# -- THREAD -------------------------------------------------------------------------------------

def render(roots) -> str:
    return threads.render(roots, lambda m: m.uid)


def test_references_builds_the_tree_and_sorts_by_date():
    m = [message(1, msgid="1@x", arrived=30),
         message(2, msgid="2@x", in_reply_to="<1@x>", arrived=10),
         message(3, msgid="3@x", in_reply_to="<1@x>", arrived=10),
         message(4, msgid="4@x", refs=("1@x", "2@x"), arrived=10)]
    assert render(threads.references(m)) == "(1 (2 4)(3))"


def test_references_breaks_loops_and_keeps_the_last_parent():
    m = [message(1, msgid="a@b", arrived=3), message(2, msgid="b@b", refs=("a@b", "c@b"), arrived=1),
         message(3, msgid="c@b", refs=("b@b",), arrived=2)]
    assert render(threads.references(m)) == "(3 2)(1)"


def test_references_duplicate_ids_and_dummies():
    # a second message with an id already used is a message of its own
    assert render(threads.references([message(1, msgid="a@b"), message(2, msgid="a@b")])) == "(1)(2)"
    # a missing parent with two children stays as a dummy root; with one it gives way
    assert render(threads.references([message(1, refs=("gone@b",)), message(2, refs=("gone@b",))])) == "((1)(2))"
    assert render(threads.references([message(1, refs=("gone@b",))])) == "(1)"


def test_references_gathers_by_subject():
    m = [message(1, msgid="a@b", subject="foo", arrived=1), message(2, msgid="b@b", subject="Re: foo", arrived=2),
         message(3, msgid="c@b", subject="foo", arrived=3)]
    # 2 is a reply: it goes under 1; 3 is not: both go under a new dummy
    assert render(threads.references(m)) == "((1 2)(3))"


def test_references_of_a_deep_chain_needs_no_recursion():
    n = 20_000
    m = [message(1, msgid="m1@x")] + [message(i, msgid=f"m{i}@x", in_reply_to=f"<m{i - 1}@x>") for i in range(2, n)]
    text = render(threads.references(m))
    assert text.startswith("(1 2 3 ") and text.endswith(f" {n - 1})")


def test_ordered_subject():
    m = [message(1, subject="a", date=10.0), message(2, subject="b", date=9.0), message(3, subject="Re: a", date=8.0),
         message(4, subject="b", date=7.0), message(5, subject="c", date=100.0)]
    assert render(threads.ordered_subject(m)) == "(4 2)(3 1)(5)"
    m.append(message(6, subject="a", date=11.0))
    assert render(threads.ordered_subject(m)) == "(4 2)(3 (1)(6))(5)"


def test_header_field_is_unfolded():
    head = b"Subject: x\r\nReferences: <a@b>\r\n\t<c@d>\r\nTo: y\r\n"
    assert threads.header_field(head, "References") == "<a@b> <c@d>"
    assert threads.message_ids(threads.header_field(head, "references")) == ["a@b", "c@d"]
    assert threads.header_field(b"Subject: x\r\n\r\nReferences: <body@x>\r\n", "references") is None


# -- ESEARCH ------------------------------------------------------------------------------------

def test_esearch_lines():
    every = SearchReturn(min=True, max=True, all=True, count=True)
    assert results.esearch_line("A1", False, [1, 2, 3, 7], every) == 'ESEARCH (TAG "A1") MIN 1 MAX 7 ALL 1:3,7 COUNT 4'
    assert results.esearch_line("A1", True, [], every) == 'ESEARCH (TAG "A1") UID COUNT 0'
    assert results.esearch_line("t", False, [5, 3, 4, 2], SearchReturn(all=True, min=True), sorted_result=True) \
        == 'ESEARCH (TAG "t") MIN 5 ALL 5,3:4,2'
    window = SearchReturn(partial=(2, 4))
    assert results.esearch_line("t", False, [1, 2, 4, 5], window) == 'ESEARCH (TAG "t") PARTIAL (2:4 2,4:5)'
    assert results.esearch_line("t", False, [1], window) == 'ESEARCH (TAG "t") PARTIAL (2:4 NIL)'


def test_esearch_modseq_is_of_the_messages_shown():
    numbers, modseqs = [1, 2, 3], [5, 9, 7]
    assert results.esearch_line("t", False, numbers, SearchReturn(min=True), modseqs).endswith("MIN 1 MODSEQ 5")
    assert results.esearch_line("t", False, numbers, SearchReturn(max=True), modseqs).endswith("MAX 3 MODSEQ 7")
    assert results.esearch_line("t", False, numbers, SearchReturn(all=True), modseqs).endswith("MODSEQ 9")


def test_what_save_keeps():
    assert results.saved([3, 5, 9], SearchReturn(save=True)) == [3, 5, 9]
    assert results.saved([3, 5, 9], SearchReturn(save=True, min=True)) == [3]
    assert results.saved([3, 5, 9], SearchReturn(save=True, min=True, max=True)) == [3, 9]
    assert results.saved([3, 5, 9], SearchReturn(save=True, min=True, count=True)) == [3, 5, 9]


def test_update_lines():
    assert results.update_lines("t", False, [1, 2, 4], [4, 5], False) == [
        'ESEARCH (TAG "t") REMOVEFROM (1 1:2)', 'ESEARCH (TAG "t") ADDTO (2 5)']
    assert results.update_lines("t", True, [1, 2, 3, 4, 5], [2], False) == [
        'ESEARCH (TAG "t") UID REMOVEFROM (1 1,3:5)']
    # a SORT's result: one pair per run of adjacent positions
    assert results.update_lines("t", False, [], [7, 3, 9], True) == ['ESEARCH (TAG "t") ADDTO (1 7,3,9)']
    assert results.update_lines("t", False, [7, 3, 9], [3], True) == ['ESEARCH (TAG "t") REMOVEFROM (1 7) (3 9)']
    assert results.update_lines("t", False, [1], [1], False) == []
