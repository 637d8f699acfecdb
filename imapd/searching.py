"""SEARCH, SORT and THREAD on the selected mailbox, and what hangs on their results:
ESEARCH (RFC 4731), SEARCHRES's `$` (RFC 5182), SORT with SORT=DISPLAY (RFC 5256 §3,
RFC 5957), THREAD=REFERENCES and ORDEREDSUBJECT (RFC 5256 §4), ESORT and CONTEXT=SEARCH,
CONTEXT=SORT (RFC 5267): PARTIAL, and UPDATE's live results with CANCELUPDATE.

The query is imapd.search_keys' tree, made the store's by `resolve_query` (sequence
numbers, `*`, `$` and \\Recent become UIDs) and answered by Store.search. SORT and THREAD
then read each match's summary (Store.fetch; THREAD=REFERENCES also the References field
of each message's header) in a worker thread, and order them with the sans-IO imapd.sort
and imapd.threads; imapd.results writes the ESEARCH forms.

A live search (RETURN (UPDATE)) keeps its result as UIDs in its order. imapd.selected
calls `before_expunge` just before it sends EXPUNGE (REMOVEFROM must name the numbers the
client still knows) and `refresh` at the end of every sync that saw a change: the search
runs again and the difference goes out as ADDTO and REMOVEFROM (RFC 5267 §4.3).

Handlers are called as in imapd.selected: `(session, command)`, returning the tagged OK's
text, `(code, text)` or None, raising imapd.answers.Answer for NO and BAD.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from imapd import results
from imapd import sort as sorting
from imapd import threads
from imapd.answers import Answer, as_ranges, bad
from imapd.state import SessionState
from imapd.syntax import CancelUpdate, Search, SearchReturn, Sort, SortKey, Thread
from imapd.view import View
from storage import SearchError, Store, StoreError

MAX_LIVE_SEARCHES = 16  # RETURN (UPDATE) searches a session keeps; past it NOUPDATE
MAX_HEADER_READ = 256 * 1024  # of a header, read for its References field (THREAD)


@dataclass
class LiveSearch:
    """A search kept up to date (RFC 5267 §4): its query, as the store takes it, and the
    UIDs it matches now, in its order."""

    query: tuple
    uid: bool
    keys: tuple[SortKey, ...] | None  # None for a SEARCH
    result: list[int]


def _view(session: SessionState) -> View:
    if session.view is None:
        raise bad("no mailbox selected")
    return session.view


# -- SEARCH, SORT, THREAD ---------------------------------------------------------------------

async def search(session: SessionState, command: Search):
    view = _view(session)
    returns = command.returns
    try:
        query = resolve_query(session, command.query)
        uids = await _matching(session, query)
    except Answer:
        if returns is not None and returns.save:
            view.saved = set()  # RFC 5182 §2.1: a failed SAVE leaves `$` empty
        raise
    uids, seqs = view.known(uids)
    numbers = uids if command.uid else seqs
    modseqs = await _modseqs(session, uids) if _has_modseq(query) and uids else None
    if returns is None and session.rev2:
        returns = SearchReturn(all=True)  # RFC 9051 §6.4.4: ESEARCH, with ALL when no RETURN is given
    if returns is None:
        line = "SEARCH" + (" " + " ".join(map(str, numbers)) if numbers else "")
        if modseqs:
            line += f" (MODSEQ {max(modseqs)})"
        session.untagged(line)
        return None
    return _answer_esearch(session, command.tag, command.uid, query, None, uids, numbers, returns, modseqs)


async def sort(session: SessionState, command: Sort):
    view = _view(session)
    returns = command.returns
    try:
        query = resolve_query(session, command.query)
        ordered = await _sorted(session, query, command.keys)
    except Answer:
        if returns is not None and returns.save:
            view.saved = set()
        raise
    numbers = ordered if command.uid else [view.seq_of(uid) for uid in ordered]
    if returns is None:
        session.untagged("SORT" + "".join(f" {n}" for n in numbers))
        return None
    return _answer_esearch(session, command.tag, command.uid, query, command.keys, ordered, numbers, returns, None)


async def thread(session: SessionState, command: Thread):
    view = _view(session)
    query = resolve_query(session, command.query)
    uids, _ = view.known(await _matching(session, query))
    store = session.context.store
    summaries = await session.run_store(_summaries, store, session.user, view.name, uids,
                                        command.algorithm == "REFERENCES")
    if command.algorithm == "REFERENCES":
        roots = threads.references(summaries)
    else:
        roots = threads.ordered_subject(summaries)
    number_of = (lambda m: m.uid) if command.uid else (lambda m: view.seq_of(m.uid))
    text = threads.render(roots, number_of)
    session.untagged("THREAD" + (" " + text if text else ""))
    return None


def _answer_esearch(session: SessionState, tag: str, uid: bool, query: tuple, keys: tuple[SortKey, ...] | None,
                    uids: list[int], numbers: list[int], returns: SearchReturn, modseqs: list[int] | None):
    """The ESEARCH response, SAVE and UPDATE of a SEARCH or SORT with RETURN options."""
    view = _view(session)
    if returns.save:
        kept = results.saved(uids, returns)
        view.saved = set(kept)
    if returns.min or returns.max or returns.all or returns.count or returns.partial is not None:
        session.untagged(results.esearch_line(tag, uid, numbers, returns, modseqs, sorted_result=keys is not None))
    if returns.update:
        if len(view.updates) >= MAX_LIVE_SEARCHES and tag not in view.updates:
            return f"NOUPDATE {results.quoted(tag)}", "search done, too many updating searches"
        view.updates[tag] = LiveSearch(query, uid, keys, list(uids))
    return None


async def cancelupdate(session: SessionState, command: CancelUpdate):
    """RFC 5267 §4.3: the named live searches end."""
    view = _view(session)
    unknown = [tag for tag in command.tags if tag not in view.updates]
    if unknown:
        raise bad("no updating search with that tag")
    for tag in command.tags:
        del view.updates[tag]
    return None


# -- keeping live searches up to date ---------------------------------------------------------

def before_expunge(session: SessionState, uids: Iterable[int]) -> None:
    """REMOVEFROM for messages about to be announced expunged, in the numbers the client
    knows until it reads the EXPUNGEs."""
    view = session.view
    if view is None or not view.updates:
        return
    gone = set(uids)
    for tag, live in view.updates.items():
        assert isinstance(live, LiveSearch)
        if not gone.intersection(live.result):
            continue
        kept = [u for u in live.result if u not in gone]
        _send_changes(session, tag, live, live.result, kept)
        live.result = kept


async def refresh(session: SessionState) -> None:
    """Run every live search again and tell the client how its result changed."""
    view = session.view
    if view is None or not view.updates:
        return
    for tag, live in list(view.updates.items()):
        assert isinstance(live, LiveSearch)
        try:
            if live.keys is None:
                new, _ = view.known(await _matching(session, live.query))
            else:
                new = await _sorted(session, live.query, live.keys)
        except Answer:
            continue  # the store failed: the next change tries again
        waiting = [u for u in live.result if u in view.pending]  # expunged, not yet announced
        current = [u for u in live.result if u not in view.pending]
        _send_changes(session, tag, live, current, new)
        live.result = sorted(new + waiting) if live.keys is None else new + waiting


def _send_changes(session: SessionState, tag: str, live: LiveSearch, old: list[int], new: list[int]) -> None:
    view = _view(session)
    if live.uid:
        before, after = old, new
    else:
        before = [view.seq_of(u) or 0 for u in old]
        after = [view.seq_of(u) or 0 for u in new]
    for line in results.update_lines(tag, live.uid, before, after, live.keys is not None):
        session.untagged(line)


# -- evaluation -------------------------------------------------------------------------------

async def _matching(session: SessionState, query: tuple) -> list[int]:
    """The UIDs matching a store query, ascending."""
    view = _view(session)
    try:
        return await session.run_store(session.context.store.search, session.user, view.name, query)
    except SearchError as e:
        raise bad(str(e)) from None


async def _sorted(session: SessionState, query: tuple, keys: tuple[SortKey, ...]) -> list[int]:
    """The UIDs the client knows matching `query`, in the order of `keys`."""
    view = _view(session)
    uids, _ = view.known(await _matching(session, query))
    summaries = await session.run_store(_summaries, session.context.store, session.user, view.name, uids, False)
    return [m.uid for m in sorting.sort(summaries, keys)]


async def _modseqs(session: SessionState, uids: list[int]) -> list[int]:
    view = _view(session)
    session.enable_condstore()
    states = await session.run_store(session.context.store.flags, session.user, view.name, as_ranges(uids))
    by_uid = {s.uid: s.modseq for s in states}
    return [by_uid.get(uid, 0) for uid in uids]


def _summaries(store: Store, account: str, mailbox: str, uids: list[int], references: bool) -> list[sorting.Summary]:
    """What sorting and threading read of each message (in a worker thread: THREAD reads
    each message's header for References)."""
    if not uids:
        return []
    out = []
    for info in store.fetch(account, mailbox, as_ranges(uids)):
        refs: tuple[str, ...] = ()
        if references:
            refs = tuple(threads.message_ids(_references_field(store, info)))
        out.append(sorting.Summary(uid=info.uid, internal_date=info.internal_date, size=info.size, sent=info.sent,
                                   envelope=info.envelope, references=refs))
    return out


def _references_field(store: Store, info) -> str | None:
    """The References field of a message's header (unfolded), None without one."""
    length = min(max(info.structure.header[1], 0), MAX_HEADER_READ)
    try:
        with store.open_message(info) as f:
            head = f.read(length)
    except (StoreError, OSError):  # expunged meanwhile: threaded without its References
        return None
    return threads.header_field(head, "references")


# -- the query --------------------------------------------------------------------------------

def resolve_query(session: SessionState, query: tuple) -> tuple:
    """The store's query tree: sequence numbers, `*`, `$` and \\Recent made UIDs."""
    view = _view(session)
    kind = query[0]
    try:
        if kind == "seq":
            return ("uid", view.seq_ranges(query[1]) or [(0, 0)])
    except ValueError:
        # RFC 3501 asks for BAD on numbers beyond EXISTS in most commands; in SEARCH
        # they simply match nothing (what Dovecot and clients expect).
        # `*` in an empty mailbox is 0 (SequenceSet.resolve): 0 names no message, and
        # uids[0 - 1] failed on the empty array (NO [SERVERBUG] for SEARCH 1:* there).
        spans = [(max(lo, 1), min(hi, view.exists)) for lo, hi in query[1].resolve(view.exists)
                 if max(lo, 1) <= min(hi, view.exists)]
        return ("uid", [(view.uids[lo - 1], view.uids[hi - 1]) for lo, hi in spans] or [(0, 0)])
    if kind == "uidset":
        return ("uid", view.uid_ranges(query[1]) or [(0, 0)])
    if kind == "recent":
        return ("uid", view.recent_ranges() or [(0, 0)])
    if kind == "not":
        return ("not", resolve_query(session, query[1]))
    if kind == "or":
        return ("or", resolve_query(session, query[1]), resolve_query(session, query[2]))
    if kind == "and":
        return ("and", [resolve_query(session, q) for q in query[1]])
    if kind == "modseq":
        session.enable_condstore()
    return query


def _has_modseq(query: tuple) -> bool:
    kind = query[0]
    if kind == "modseq":
        return True
    if kind == "not":
        return _has_modseq(query[1])
    if kind == "or":
        return _has_modseq(query[1]) or _has_modseq(query[2])
    if kind == "and":
        return any(_has_modseq(q) for q in query[1])
    return False
