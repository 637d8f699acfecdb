"""The selected-mailbox view: sequence numbers, deferred expunges, shared UID arrays."""

from imapd.syntax import SequenceSet
from imapd.view import Snapshots, View
from storage.mailboxes import Mailbox
from storage.messages import FlagState


def mailbox(modseq: int = 5) -> Mailbox:
    return Mailbox(id=7, account="a@example.test", name="INBOX", uidnext=20, highestmodseq=modseq, exists=4,
                   unseen=0, size=0, special_use=None)


def test_sequence_numbers_and_uid_sets():
    view = View(mailbox(), [3, 5, 9, 12], readonly=False)
    assert [view.seq_of(u) for u in (3, 5, 9, 12, 4)] == [1, 2, 3, 4, None]
    assert view.seq_ranges(SequenceSet(((2, None),))) == [(5, 12)]
    assert view.uid_ranges(SequenceSet(((10, None),))) == [(10, 12)]
    assert view.uid_ranges(SequenceSet(((13, None),))) == [(12, 13)]  # "n:*" reaches the last message
    assert view.uids_in([(4, 10), (1, 3)]) == [3, 5, 9]
    view.pending.add(9)
    assert view.known([1, 3, 9, 12, 13]) == ([3, 12], [1, 4])
    view.pending.clear()
    try:
        view.seq_ranges(SequenceSet(((5, 5),)))
    except ValueError:
        pass
    else:
        raise AssertionError("sequence number beyond EXISTS accepted")


def test_expunge_announces_descending_stable_numbers():
    view = View(mailbox(), [3, 5, 9, 12], readonly=False)
    assert view.expunge_now([5, 12]) == [4, 2]
    assert list(view.uids) == [3, 9]


def test_views_in_the_same_state_share_one_array_and_copy_to_change():
    snapshots = Snapshots()
    first = View(mailbox(), [1, 2, 3], readonly=False, snapshots=snapshots)
    second = View(mailbox(), [1, 2, 3], readonly=False, snapshots=snapshots)
    assert first.uids is second.uids
    first.add([4])
    assert list(second.uids) == [1, 2, 3] and list(first.uids) == [1, 2, 3, 4]
    first.in_step(6)
    second.add([4])
    second.in_step(6)
    assert first.uids is second.uids
    second.pending.add(2)  # an expunge it may not announce yet: it keeps its own state
    second.in_step(7)
    assert list(second.uids) == [1, 2, 3, 4]


def test_flag_updates_skip_what_the_session_already_told():
    view = View(mailbox(), [1, 2], readonly=False)
    view.mark_told([FlagState(1, 8, ("\\Seen",))])
    updates = view.flag_updates([FlagState(1, 8, ("\\Seen",)), FlagState(2, 9, ()), FlagState(3, 9, ())])
    assert [u.uid for u in updates] == [2]
