"""The IMAP commands on the selected mailbox (RFC 3501 §6.4): CHECK, CLOSE, UNSELECT
(RFC 3691), EXPUNGE and UID EXPUNGE (RFC 4315), FETCH, STORE (RFC 7162 CONDSTORE),
COPY and MOVE (RFC 6851), their UID forms; IDLE (RFC 2177); and `sync`, which keeps the
client in step with the store after every command (SEARCH, SORT and THREAD, and the
live searches `sync` keeps up to date, are imapd.searching's).

Sequence numbers are the session's (imapd.view); the store speaks UIDs, so every set is
made UID ranges before a store call. Expunges by others wait until the client may hear
them: never during FETCH, STORE, SEARCH or COPY (RFC 3501 §7.4.1).

Handlers are called as in imapd.mailboxes: `(session, command)`, returning the tagged OK's
text, `(code, text)` or None, raising `imapd.answers.Answer` for NO and BAD.
"""

from __future__ import annotations

import asyncio
import functools
from bisect import bisect_left
from collections.abc import Iterable
from imapd import fetch as fetching
from imapd import qresync, searching
from imapd.decoding import UnknownEncodingError
from imapd.answers import Answer, as_ranges, bad, no, set_text, try_create
from imapd.mailboxes import SYSTEM_FLAGS
from imapd.syntax import Command, Copy, Expunge, Fetch, FetchItem, Move, Store
from imapd.state import SessionState
from imapd.view import View
import storage
from storage import ExpungedError

FETCH_BATCH = 256  # messages per store read while answering FETCH
INDEX_BATCH = 2048  # the same when no item needs the message file (fetch.index_only)
FLAGS_BATCH = 8192  # the same when only UID, FLAGS and MODSEQ are asked
FETCH_BYTES = 4 << 20  # of responses rendered before they are written and the client reads
LAZY_PREVIEWS = 100  # previews made after a FETCH PREVIEW (LAZY) answered NIL, at most
NO_EXPUNGE_DURING = {"FETCH", "STORE", "SEARCH", "COPY", "SORT", "THREAD"}  # and RFC 5256 §3, §4


def require_view(session: SessionState) -> View:
    if session.view is None:
        raise bad("no mailbox selected")
    return session.view


def require_writable(session: SessionState) -> View:
    view = require_view(session)
    if view.readonly:
        raise no("mailbox is read-only (EXAMINE)", "READ-ONLY")
    return view


def ranges(session: SessionState, command: Fetch | Store | Copy | Move) -> list[tuple[int, int]]:
    """The command's sequence set as UID ranges; BAD for a sequence number beyond EXISTS."""
    view = require_view(session)
    if command.uid:
        return view.uid_ranges(command.sequence)
    try:
        return view.seq_ranges(command.sequence)
    except ValueError:
        raise bad("invalid message sequence number") from None


# -- CHECK, CLOSE, UNSELECT, EXPUNGE --------------------------------------------------------------

async def check(session: SessionState, command: Command):
    return None


async def close(session: SessionState, command: Command):
    view = require_view(session)
    if not view.readonly:
        await session.run_store(session.context.store.expunge, session.user, view.name)
    session.close_view()


async def unselect(session: SessionState, command: Command):
    session.close_view()


async def expunge(session: SessionState, command: Expunge):
    """EXPUNGE, and UID EXPUNGE: only the messages in its set (RFC 4315 §2.1)."""
    view = require_writable(session)
    uid_ranges = None
    if command.sequence is not None:
        uid_ranges = view.uid_ranges(command.sequence)
        if not uid_ranges:
            return None
    args = (session.user, view.name) + ((uid_ranges,) if uid_ranges is not None else ())
    removed = await session.run_store(session.context.store.expunge, *args)
    announce_expunged(session, removed)
    session.log.info("expunge", mailbox=view.name, count=len(removed))
    if session.condstore:
        # RFC 7162 §3.2.10: the MODSEQ the expunge reached, for the client's next QRESYNC
        mailbox = await session.run_store(session.context.store.mailbox, session.user, view.name)
        return f"HIGHESTMODSEQ {mailbox.highestmodseq}", f"{command.name} completed"
    return None


def announce_expunged(session: SessionState, uids: Iterable[int]) -> None:
    """EXPUNGE for each message removed, or one VANISHED of their UIDs once QRESYNC is
    enabled (RFC 7162 §3.2.10: sequence numbers shift all the same)."""
    view = require_view(session)
    uids = list(uids)
    searching.before_expunge(session, uids)  # RFC 5267 §4.3: REMOVEFROM before the EXPUNGEs
    if session.qresync:
        gone = [uid for uid in uids if view.seq_of(uid) is not None]
        view.expunge_now(uids)
        for line in qresync.vanished_lines(qresync.as_ranges(gone), earlier=False):
            session.untagged(line)
        return
    for seq in view.expunge_now(uids):
        session.untagged(f"{seq} EXPUNGE")


# -- FETCH ------------------------------------------------------------------------------------

async def fetch(session: SessionState, command: Fetch):
    view = require_view(session)
    items: list[FetchItem] = list(command.items)
    changedsince = command.changedsince
    if changedsince is not None or any(i.name == "MODSEQ" for i in items):
        session.enable_condstore()
    if command.uid and not any(i.name == "UID" for i in items):
        items.insert(0, FetchItem("UID"))
    if session.condstore and changedsince is not None and not any(i.name == "MODSEQ" for i in items):
        items.append(FetchItem("MODSEQ"))
    if command.vanished:
        qresync.require_enabled(session)
        await qresync.on_fetch(session, view, command.sequence, changedsince)
    uids = view.uids_in(ranges(session, command))
    if not uids:
        return None
    mark_seen = not view.readonly and fetching.sets_seen(items)
    if mark_seen and not any(i.name == "FLAGS" for i in items):
        items.append(FetchItem("FLAGS"))
    if session.condstore and mark_seen:
        # RFC 7162 §3.1: FETCH responses that report a change carry UID and MODSEQ.
        if not any(i.name == "MODSEQ" for i in items):
            items.append(FetchItem("MODSEQ"))
        if not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
    flags_only = all(i.name in ("UID", "FLAGS", "MODSEQ") for i in items)
    store = session.context.store
    # Flags come from fixed-size records: big batches. Message data is rendered until
    # FETCH_BYTES are pending, written, and the next part waits for the client to read.
    # Each batch is a hop to a store thread and back, which costs more than rendering a few
    # hundred envelopes: items from the index alone go in bigger ones.
    batch = FLAGS_BATCH if flags_only else INDEX_BATCH if fetching.index_only(items) else FETCH_BATCH
    recent = frozenset(view.recent)
    listing = None
    previews = _previews_wanted(items)
    position = 0
    gone = 0  # messages of the view expunged in the store meanwhile (by another session)
    while position < len(uids):
        chunk = uids[position:position + batch]
        chunk_ranges = as_ranges(chunk)
        if mark_seen:
            changed, _ = await session.run_store(store.store_flags, session.user, view.name, chunk_ranges, "add",
                                                 ["\\Seen"])
            view.mark_told(changed)
        if flags_only:
            if listing is None:  # one store call for the whole FETCH, however many batches
                listing = await session.run_store(store.flag_listing, session.user, view.name)
                shown = {k for raw in set(listing.keywords.values()) for k in raw.decode().split(" ") if k}
                if not shown <= view.keywords:  # set by another session: FLAGS first
                    await announce_keywords(session, view)
            # Flags of a message expunged meanwhile are left out, with no NO: a client's
            # `UID FETCH 1:* (FLAGS)` sync names no message in particular, and hears the
            # EXPUNGE at its next NOOP.
            lines = [listing_fetch_lines(session, listing, chunk, items, changedsince)]
            done, missing = len(chunk), 0
        else:
            try:
                lines, done, missing, keywords = await session.run_store(
                    _render_batch, store, session.user, view.name, chunk, items, changedsince, view.seq_of, recent,
                    previews)
            except UnknownEncodingError as e:
                raise no(f"cannot decode content transfer encoding {str(e)[:40]!r}", "UNKNOWN-CTE") from None
            if not keywords <= view.keywords:
                await announce_keywords(session, view)
        # One write for the batch: a write per response line costs the transport more than
        # rendering the line (UID FETCH 1:* (FLAGS), bench/imap.py).
        session.conn.write(b"".join(line for line in lines if line))
        position += done
        gone += missing
        await session.conn.drain()
    if previews is not None and previews.later:
        # RFC 8970 §3.1: LAZY answered NIL for these; made now, in the background, so a
        # later FETCH finds them (the command does not wait)
        asyncio.ensure_future(session.context.run(_make_previews, store, previews.later[:LAZY_PREVIEWS]))
    if gone:
        # RFC 2180 §4.1.2: the others are answered, the command ends NO; the client hears the
        # EXPUNGE when it may (a NOOP), RFC 5530's code says why. Not a fault of ours.
        raise no("some of the requested messages no longer exist", "EXPUNGEISSUED")
    return None


class _Previews:
    """What FETCH PREVIEW asks: `lazy`, and the messages LAZY left without one (`later`)."""

    def __init__(self, lazy: bool):
        self.lazy = lazy
        self.later: list[storage.MessageInfo] = []


def _previews_wanted(items: list[FetchItem]) -> _Previews | None:
    asked = [item for item in items if item.name == "PREVIEW"]
    return _Previews(all(item.lazy for item in asked)) if asked else None


def _make_previews(store: storage.Store, infos: list[storage.MessageInfo]) -> None:
    for info in infos:
        try:
            store.preview(info)
        except Exception:  # noqa: BLE001 - expunged meanwhile, or unreadable: made next time
            pass


def flags_fetch_line(session: SessionState, state, items: list[FetchItem], changedsince: int | None) -> bytes | None:
    """`* n FETCH (UID FLAGS MODSEQ)` from a flag record, None if the client does not know
    the message or it did not change since `changedsince`."""
    return flags_fetch_lines(session, [state], items, changedsince) or None


def flags_fetch_lines(session: SessionState, states: list, items: list[FetchItem], changedsince: int | None) -> bytes:
    """flags_fetch_line of each of `states` (ascending UIDs), joined: one walk along the
    view's UIDs for their sequence numbers, and `* n FETCH (UID n FLAGS (...))`, what
    FETCH 1:* (UID FLAGS) is made of, in one formatting step a line."""
    view = require_view(session)
    mine, recent, told_upto = view.uids, view.recent, view.modseq
    count = len(mine)
    names = [item.name for item in items]
    plain = names == ["UID", "FLAGS"]
    out = []
    position = 0
    for state in states:
        uid = state.uid
        position = bisect_left(mine, uid, position)
        if position >= count or mine[position] != uid:
            continue  # not the client's (yet)
        if changedsince is not None and state.modseq <= changedsince:
            continue
        if state.modseq > told_upto:
            view.mark_told([state])
        if plain and uid not in recent:
            out.append(b"* %d FETCH (UID %d %b)\r\n" % (position + 1, uid, _flags_item(state.flags)))
            continue
        parts = []
        for name in names:
            if name == "UID":
                parts.append(b"UID %d" % uid)
            elif name == "FLAGS":
                parts.append(_flags_item(state.flags) if uid not in recent
                             else _flags_item((*state.flags, "\\Recent")))
            elif name == "MODSEQ":
                parts.append(b"MODSEQ (%d)" % state.modseq)
        out.append(b"* %d FETCH (%b)\r\n" % (position + 1, b" ".join(parts)))
    return b"".join(out)


def listing_fetch_lines(session: SessionState, listing, uids: list[int], items: list[FetchItem],
                        changedsince: int | None) -> bytes:
    """The `* n FETCH (UID FLAGS MODSEQ)` lines of `uids` (ascending) from the store's flag
    listing (Store.flag_listing): what flags_fetch_lines does from FlagStates, without one
    a message. A UID the listing lacks (expunged, not yet announced) is left out."""
    view = require_view(session)
    mine, recent, told_upto = view.uids, view.recent, view.modseq
    listed, modseqs = listing.uids, listing.modseqs
    count, listed_count = len(mine), len(listed)
    names = [item.name for item in items]
    plain = names == ["UID", "FLAGS"]
    out = []
    position = at = 0
    for uid in uids:
        at = bisect_left(listed, uid, at)
        if at >= listed_count or listed[at] != uid:
            continue
        position = bisect_left(mine, uid, position)
        if position >= count or mine[position] != uid:
            continue
        modseq = modseqs[at]
        if changedsince is not None and modseq <= changedsince:
            continue
        flags = listing.flags_at(at)
        if modseq > told_upto:
            view.mark_told([storage.FlagState(uid, modseq, flags)])
        if plain and uid not in recent:
            out.append(b"* %d FETCH (UID %d %b)\r\n" % (position + 1, uid, _flags_item(flags)))
            continue
        parts = []
        for name in names:
            if name == "UID":
                parts.append(b"UID %d" % uid)
            elif name == "FLAGS":
                parts.append(_flags_item(flags) if uid not in recent else _flags_item((*flags, "\\Recent")))
            elif name == "MODSEQ":
                parts.append(b"MODSEQ (%d)" % modseq)
        out.append(b"* %d FETCH (%b)\r\n" % (position + 1, b" ".join(parts)))
    return b"".join(out)


@functools.lru_cache(maxsize=1024)
def _flags_item(flags: tuple[str, ...]) -> bytes:
    """`FLAGS (...)`: a mailbox has few distinct flag sets, and a listing repeats them."""
    return f"FLAGS ({' '.join(flags)})".encode()


def flags_with_recent(session: SessionState, uid: int, flags: Iterable[str]) -> list[str]:
    out = list(flags)
    if session.view is not None and uid in session.view.recent:
        out.append("\\Recent")
    return out


def _render_batch(store: storage.Store, account: str, mailbox: str, uids: list[int], items, changedsince, seq_of,
                  recent: frozenset[int], previews: _Previews | None = None
                  ) -> tuple[list[bytes], int, int, set[str]]:
    """FETCH responses for the first of `uids` (in a worker thread: reads files), until
    about FETCH_BYTES are rendered; also how many of `uids` they answer, how many of
    those the store no longer has (expunged before the index was read, or before the
    message's file was opened), and the keywords their FLAGS show."""
    lines: list[bytes] = []
    pending = found = expunged = 0
    keywords: set[str] = set()
    shows_flags = any(item.name == "FLAGS" for item in items)
    for info in store.fetch(account, mailbox, as_ranges(uids)):
        if pending >= FETCH_BYTES:
            done = uids.index(info.uid)
            return lines, done, done - found + expunged, keywords
        found += 1
        if shows_flags:
            keywords.update(f for f in info.flags if not f.startswith("\\"))
        if changedsince is not None and info.modseq <= changedsince:
            continue
        seq = seq_of(info.uid)
        if seq is None:
            continue
        if previews is not None and info.preview is None:  # a record from before previews were kept
            if previews.lazy:
                previews.later.append(info)
            else:
                info.preview = store.preview(info)
        try:
            body = fetching.render(info, items, lambda info=info: store.open_message(info),
                                   recent=info.uid in recent)
        except ExpungedError:
            expunged += 1
            continue
        lines.append(b"* %d FETCH (" % seq + body + b")\r\n")
        pending += len(lines[-1])
    return lines, len(uids), len(uids) - found + expunged, keywords


# -- STORE ------------------------------------------------------------------------------------

async def store(session: SessionState, command: Store):
    view = require_writable(session)
    unchanged = command.unchangedsince
    if unchanged is not None:
        session.enable_condstore()
    uids = view.uids_in(ranges(session, command))
    if not uids:
        return None
    flags = [f for f in command.flags if f.lower() != "\\recent"]
    changed, modified = await session.run_store(session.context.store.store_flags, session.user, view.name,
                                                as_ranges(uids), command.mode, flags, unchanged)
    view.mark_told(changed)
    if unannounced(view, flags):
        await announce_keywords(session, view)
    if not command.silent:
        states = await session.run_store(session.context.store.flags, session.user, view.name, as_ranges(uids))
        if any(unannounced(view, s.flags) for s in states):  # set by another session meanwhile
            await announce_keywords(session, view)
        refused = set(modified)
        shown = [FetchItem("FLAGS"), FetchItem("UID")] + ([FetchItem("MODSEQ")] if session.condstore else [])
        for state in states:
            if state.uid not in refused and state.uid not in view.pending:
                session.conn.write(flags_fetch_line(session, state, shown, None) or b"")
    elif session.condstore and unchanged is not None:
        # RFC 7162 §3.1.3: with UNCHANGEDSINCE the new MODSEQ is reported even when silent
        for state in changed:
            seq = view.seq_of(state.uid)
            if seq is not None:
                session.untagged(f"{seq} FETCH (UID {state.uid} MODSEQ ({state.modseq}))")
    if modified:
        numbers = modified if command.uid else [view.seq_of(u) for u in modified]
        return f"MODIFIED {set_text([n for n in numbers if n])}", "conditional STORE failed"
    return None


def unannounced(view: View, flags: Iterable[str]) -> bool:
    """Whether `flags` hold a keyword the session has not told the client of."""
    return any(not f.startswith("\\") and f not in view.keywords for f in flags)


async def announce_keywords(session: SessionState, view: View, mailbox: storage.Mailbox | None = None) -> None:
    """FLAGS and PERMANENTFLAGS again, with the mailbox's keywords now, before a FETCH shows
    a new one, whichever session set it (RFC 3501 §7.2.6: a client learns the flags a
    mailbox has from FLAGS). `mailbox` is its state if the caller has just read it."""
    if mailbox is None:
        mailbox = await session.run_store(session.context.store.mailbox, session.user, view.name)
    view.keywords = set(mailbox.keywords)
    flags = " ".join(SYSTEM_FLAGS + tuple(mailbox.keywords))
    session.untagged(f"FLAGS ({flags})")
    if view.readonly:
        session.untagged("OK [PERMANENTFLAGS ()] read-only")
    else:
        session.untagged(f"OK [PERMANENTFLAGS ({flags} \\*)] flags allowed")


# -- COPY, MOVE -------------------------------------------------------------------------------

async def copy(session: SessionState, command: Copy | Move):
    """COPY and MOVE, and their UID forms (RFC 4315 COPYUID, RFC 6851 MOVE)."""
    view = require_view(session)
    move = isinstance(command, Move)
    if move:
        require_writable(session)
    uids = view.uids_in(ranges(session, command))
    if not uids:
        return None
    target = command.mailbox
    operation = session.context.store.move if move else session.context.store.copy
    try:
        uidvalidity, pairs = await session.run_store(operation, session.user, view.name, as_ranges(uids), target)
    except Answer as answer:
        raise try_create(answer) from None
    code = None
    if pairs:
        code = f"COPYUID {uidvalidity} {set_text([a for a, _ in pairs])} {set_text([b for _, b in pairs])}"
    session.log.info("move" if move else "copy", mailbox=view.name, to=target, count=len(pairs))
    if move:
        if code:
            session.untagged(f"OK [{code}] moved")
        announce_expunged(session, [a for a, _ in pairs])
        return None
    return code, "COPY completed"


# -- IDLE, and keeping the client in step -------------------------------------------------------

async def idle(session: SessionState, command: Command):
    # What changed before IDLE began is told at once, before the continuation: the
    # watcher's signal may have come and gone already, and a client that reads "+"
    # and then waits on its socket can miss lines that came in the same packet.
    session.changed = False
    if session.view is not None:
        await sync(session, expunges=True)
    session.conn.write(b"+ idling\r\n")
    line = session.conn.next_line()
    loop = asyncio.get_running_loop()
    try:
        while not line.done():
            if session.changed:
                session.changed = False
                if session.view is not None:
                    await sync(session, expunges=True)
                continue
            session.change_waiter = loop.create_future()
            await asyncio.wait((line, session.change_waiter), return_when=asyncio.FIRST_COMPLETED)
            session.change_waiter = None
    finally:
        session.change_waiter = None
        if not line.done():
            line.cancel()
    line = line.result().strip()
    if line.upper() != b"DONE":
        raise bad("expected DONE")
    return "IDLE terminated"


async def sync(session: SessionState, *, expunges: bool) -> None:
    """Tell the client what changed in the selected mailbox since it was last told."""
    view = session.view
    if view is None:
        return
    store = session.context.store
    try:
        mailbox, changed, expunged = await session.run_store(store.changes_since, session.user, view.name,
                                                             view.modseq)
    except Answer as answer:
        # Renamed (here, by another session, or a parent of it): follow it by its id.
        new_name = await session.run_store(store.mailbox_name, session.user, view.uidvalidity) \
            if answer.code == "NONEXISTENT" else None
        if new_name is None:
            if answer.code == "NONEXISTENT":
                session.say_bye("the selected mailbox was deleted")
                session.log.info("closed", reason="mailbox_deleted", mailbox=view.name)
            return
        session.log.info("selected_renamed", mailbox=view.name, to=new_name)
        view.name = new_name
        session.watch(new_name)
        mailbox, changed, expunged = await session.run_store(store.changes_since, session.user, view.name,
                                                             view.modseq)
    if mailbox.uidvalidity != view.uidvalidity:
        session.say_bye("the selected mailbox was replaced")
        return
    if unannounced(view, mailbox.keywords):  # another session brought a keyword in
        await announce_keywords(session, view, mailbox)
    if view.modseq < mailbox.expunged_floor:
        # The bounded expunge history forgot part of what this session missed: what it
        # holds and the store does not is what vanished (storage/vanished.py).
        _, current, _ = await session.run_store(store.uids, session.user, view.name)
        there = set(current)
        expunged = [uid for uid in view.uids if uid not in there]
    waiting = [uid for uid in expunged if view.seq_of(uid) is not None and uid not in view.pending]
    if waiting and not view.pending:
        view.pending_since = view.modseq  # told so far: below any of these expunges' MODSEQ
    view.pending.update(waiting)
    if expunges and view.pending:
        announce_expunged(session, list(view.pending))
    new = sorted(s.uid for s in changed if s.uid > view.max_uid())
    if view.add(new):
        if not view.readonly and not session.rev2:  # as SELECT: rev2 neither claims nor shows \Recent
            view.recent.update(await session.run_store(session.context.recent.claim_new, session.user,
                                                       view.uidvalidity, new))
        session.untagged(f"{view.exists} EXISTS")
        if not session.rev2:
            session.untagged(f"{len(view.recent)} RECENT")  # RFC 9051 Appendix E, item 12: gone in rev2
    for state in view.flag_updates(s for s in changed if s.uid not in new):
        seq = view.seq_of(state.uid)
        modseq = f" MODSEQ ({state.modseq})" if session.condstore else ""
        flags = " ".join(flags_with_recent(session, state.uid, state.flags))
        session.untagged(f"{seq} FETCH (UID {state.uid} FLAGS ({flags}){modseq})")
    if view.updates and (changed or expunged):
        await searching.refresh(session)
    view.in_step(max(view.modseq, mailbox.highestmodseq))
    view.told = {uid: m for uid, m in view.told.items() if m > view.modseq}
    if view.pending and session.condstore:
        # RFC 7162 §3.2: MODSEQs were shown while expunges wait to be told; a client that
        # resynchronizes from the last HIGHESTMODSEQ it saw must not skip them.
        session.untagged(f"OK [HIGHESTMODSEQ {view.pending_since}] expunges are still to be told")
