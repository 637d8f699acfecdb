"""NOTIFY (RFC 5465): the client names mailboxes and the events it wants to hear of, and
is told of them as they happen, without polling.

What is supported: the filters SELECTED, SELECTED-DELAYED, INBOXES, PERSONAL, SUBSCRIBED,
SUBTREE and MAILBOXES; the events MessageNew (with fetch attributes for the selected
mailbox), MessageExpunge, FlagChange, MailboxName, SubscriptionChange,
MailboxMetadataChange and ServerMetadataChange. Any other event is NO [BADEVENT (the
supported ones)] (§3.1).

How each is told:
- The selected mailbox, under a SELECTED group with message events: the same EXISTS,
  EXPUNGE and FETCH FLAGS responses a command's end would bring (imapd.selected.sync),
  sent as soon as the store's watcher sees the change, while no command runs. Under
  SELECTED-DELAYED the expunges wait for a command that may report them (§5.1); new
  messages come with a FETCH of MessageNew's attributes when it names any (§5.2).
- Any other mailbox with message events: `* STATUS` with the items those events ask for
  (MessageNew: MESSAGES UIDNEXT UIDVALIDITY; MessageExpunge: MESSAGES; FlagChange:
  UIDVALIDITY HIGHESTMODSEQ, as Dovecot sends them, and HIGHESTMODSEQ with any of them
  once CONDSTORE is enabled, §5.2); `NOTIFY SET STATUS` sends them once at the start for
  every such mailbox (§3.1). The selected mailbox never gets a STATUS.
- MailboxName: `* LIST` for a mailbox created, `* LIST (\\NonExistent)` for one deleted,
  and for one renamed its new name with ("OLDNAME" (old)) (§5.4, RFC 5258 §3.4);
  SubscriptionChange: `* LIST` with or without \\Subscribed (§5.5). Each but the
  deleted one says \\HasChildren or \\HasNoChildren (§5.4).
- MailboxMetadataChange and ServerMetadataChange (required with METADATA, §5.6, §5.7):
  `* METADATA mailbox entry...` naming the entries set, changed or removed, without
  their values (RFC 5464 §4.4.2); "" for the server's. The store's version of the
  account's annotations says that some changed; a checksum of each says which.
Where Dovecot is more lenient than §5, so is this: for mailboxes other than the selected
one, MessageNew, MessageExpunge and FlagChange may each come alone (imaptest's notify
group asks that); for the selected mailbox they are held to §5 (BAD otherwise).
INBOXES is INBOX and the \\Junk mailbox: the two the MX delivers to (§6.3).
A mailbox takes the events of the first group whose filter matches it.

What this client does itself is not told back to it (§5: SHOULD): while one of its
commands that change mailboxes or annotations runs, the watcher's news waits; when it ends,
the account is looked at afresh and what changed is told, but for the mailboxes the command
named (with their parents and children: CREATE makes parents, RENAME moves children).
Another client's change to one of those same mailboxes in that moment goes untold; the
client learns it at its next look, as without NOTIFY.

A client that does not read what it is told (the transport's buffer full) is told once
`* OK [NOTIFICATIONOVERFLOW]` and then nothing more, as after NOTIFY NONE (§5.8): what a
session holds for a client stays bounded whatever changes.

Changes come from the store's watcher (storage/watch.py) watching the whole account, so
changes made by any session in any process are told. Two snapshots of the account's
listing are compared (`changes`, pure) and the differences turned into responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from imapd import responses as r
from imapd import selected
from imapd.answers import no
from imapd.state import SessionState
from imapd.syntax import Fetch, Notify, NotifyGroup, SequenceSet
from storage import INBOX, Mailbox

SUPPORTED = ("MessageNew", "MessageExpunge", "FlagChange", "MailboxName", "SubscriptionChange",
             "MailboxMetadataChange", "ServerMetadataChange")
METADATA_EVENTS = frozenset({"MailboxMetadataChange", "ServerMetadataChange"})
STATUS_FOR = {"MessageNew": ("MESSAGES", "UIDNEXT", "UIDVALIDITY"), "MessageExpunge": ("MESSAGES",),
              "FlagChange": ("UIDVALIDITY", "HIGHESTMODSEQ")}
STATUS_ORDER = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ")
SELECTED_FILTERS = ("SELECTED", "SELECTED-DELAYED")
# The client's own commands whose changes are not told back to it (§5), by the names of
# mailboxes in them (imapd.syntax: `mailbox`, `old`, `new`).
CHANGING = frozenset({"CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "APPEND", "COPY", "UID COPY",
                      "MOVE", "UID MOVE", "SETMETADATA"})


def named_by(command) -> tuple[str, ...]:
    """The mailbox names a command of the client names ("" for the server's annotations)."""
    return tuple(value for value in (getattr(command, a, None) for a in ("mailbox", "old", "new"))
                 if isinstance(value, str))


def covered(name: str, names: tuple[str, ...]) -> bool:
    """`name` is one of `names`, or a parent or child of one."""
    return any(name == n or name.startswith(n + "/") or n.startswith(name + "/") for n in names)


@dataclass(frozen=True)
class Change:
    """One difference between two listings of an account. `kind`: created, deleted,
    renamed, subscription, messages; for messages, `new`, `expunged`, `flags` say which."""

    kind: str
    mailbox: Mailbox  # as it is now (as it was, for deleted)
    old: Mailbox | None = None
    new: bool = False
    expunged: bool = False
    flags: bool = False


def changes(old: Iterable[Mailbox], new: Iterable[Mailbox]) -> list[Change]:
    """What happened between two listings of an account, mailboxes known by id."""
    before = {m.id: m for m in old}
    after = {m.id: m for m in new}
    out: list[Change] = []
    for mailbox_id, was in before.items():
        if mailbox_id not in after:
            out.append(Change("deleted", was))
    for mailbox_id, now in after.items():
        was = before.get(mailbox_id)
        if was is None:
            out.append(Change("created", now))
            continue
        if was.name != now.name:
            out.append(Change("renamed", now, was))
        if was.subscribed != now.subscribed:
            out.append(Change("subscription", now, was))
        arrived = now.uidnext > was.uidnext
        expunged = now.exists < was.exists + (now.uidnext - was.uidnext)
        flags = now.highestmodseq > was.highestmodseq and not arrived and not expunged
        if arrived or expunged or flags:
            out.append(Change("messages", now, was, new=arrived, expunged=expunged, flags=flags))
    return out


def matches(group: NotifyGroup, mailbox: Mailbox) -> bool:
    """Whether a filter other than SELECTED names `mailbox` (RFC 5465 §6)."""
    kind = group.filter
    if kind == "PERSONAL":
        return True
    if kind == "INBOXES":
        return mailbox.name == INBOX or mailbox.special_use == "\\Junk"  # where the MX delivers
    if kind == "SUBSCRIBED":
        return mailbox.subscribed
    if kind == "SUBTREE":
        return any(mailbox.name == n or mailbox.name.startswith(n + "/") for n in group.mailboxes)
    if kind == "MAILBOXES":
        return mailbox.name in group.mailboxes
    return False


def status_items(events: Iterable[str], condstore: bool = False) -> list[str]:
    wanted = {item for event in events for item in STATUS_FOR.get(event, ())}
    if condstore and wanted:
        wanted.add("HIGHESTMODSEQ")  # RFC 5465 §5.2, §5.3
    return [item for item in STATUS_ORDER if item in wanted]


def status_line(mailbox: Mailbox, items: list[str]) -> bytes:
    values = {"MESSAGES": mailbox.exists, "UIDNEXT": mailbox.uidnext, "UIDVALIDITY": mailbox.uidvalidity,
              "HIGHESTMODSEQ": mailbox.highestmodseq}
    shown = " ".join(f"{item} {values[item]}" for item in items)
    return b"STATUS " + r.mailbox(mailbox.name) + f" ({shown})".encode()


def list_line(mailbox: Mailbox, *, gone: bool = False, old_name: str | None = None) -> bytes:
    if gone:
        attrs = "\\NonExistent"
    else:
        attrs = "\\HasChildren" if mailbox.children else "\\HasNoChildren"
        if mailbox.subscribed:
            attrs += " \\Subscribed"
    line = f"LIST ({attrs}) \"/\" ".encode() + r.mailbox(mailbox.name)
    if old_name is not None:
        line += b' ("OLDNAME" (' + r.mailbox(old_name) + b"))"
    return line


class Notifier:
    """A session's NOTIFY SET: its groups, the account's last listing, the watch."""

    def __init__(self, session: SessionState, command: Notify):
        self.session = session
        self.groups = command.groups
        self.selected_group = next((g for g in self.groups if g.filter in SELECTED_FILTERS), None)
        self.listing: list[Mailbox] = []
        self._watch = None
        self._pushing = False
        self.wants_metadata = any(METADATA_EVENTS.intersection(g.events) for g in self.groups)
        self.metadata_version = 0
        self.digests: dict[tuple[int, str], int] = {}
        self._metadata_lock = asyncio.Lock()
        self._own: tuple[str, ...] | None = None  # the names of the client's changing command, while it runs
        self._commit = 0  # the shard's commit id before `listing` was read: older listings are stale
        self._deferred: tuple[list[Mailbox], int, int] | None = None  # the watcher's news during an own command
        self._selected: tuple | None = None  # (view, UIDNEXT, EXISTS) the watcher last told of the selected mailbox
        # (view, UID): MessageNew's FETCH has gone out for the selected mailbox's messages up
        # to that UID; the rest get it at the next push, however their EXISTS was told.
        self._fetched: tuple | None = None
        self._missed = False  # a change came while a push or a command ran: push once they end

    # -- which events a mailbox takes -----------------------------------------------------

    def events_of(self, mailbox: Mailbox, *, status: bool = True) -> tuple[str, ...]:
        """The events of the first non-selected group naming `mailbox`; () for none. For a
        STATUS, () for the selected mailbox too: it is told by EXISTS and EXPUNGE."""
        view = self.session.view
        if status and view is not None and view.uidvalidity == mailbox.id:
            return ()
        group = next((g for g in self.groups if g.filter not in SELECTED_FILTERS and matches(g, mailbox)), None)
        return group.events if group is not None else ()

    def _events(self, mailbox: Mailbox) -> tuple[str, ...]:
        return self.events_of(mailbox, status=False)

    @property
    def pushes_selected(self) -> bool:
        group = self.selected_group
        return group is not None and "MessageNew" in group.events

    # -- starting and stopping ------------------------------------------------------------

    async def start(self, *, status: bool) -> None:
        session = self.session
        loop = asyncio.get_running_loop()

        def changed(listing: list[Mailbox], version: int, commit: int) -> None:  # from the watcher's thread
            loop.call_soon_threadsafe(self._account_changed, listing, version, commit)

        watcher = session.context.watcher
        if self.wants_metadata:  # before the watch: a change in between is then told, not lost
            self.digests = await session.run_store(session.context.store.metadata_digests, session.user)
        self._watch, self.listing, self.metadata_version, self._commit = await session.run_store(
            watcher.watch_account, session.user, changed)
        if session.view is not None:
            self._fetched = (session.view, session.view.max_uid())
        if status:
            for mailbox in self.listing:
                items = status_items(self.events_of(mailbox), session.condstore)
                if items:
                    session.untagged(status_line(mailbox, items))

    def cancel(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    # -- being told -----------------------------------------------------------------------

    def _account_changed(self, listing: list[Mailbox], version: int, commit: int) -> None:
        if self._watch is None or self.session.ended:
            return  # replaced or gone meanwhile
        if self._own is not None:
            # The client's own command runs: command_ended looks afresh, then applies this
            # if it is newer (a change by someone else after that look).
            self._deferred = (listing, version, commit)
            return
        self._apply(listing, version, (), commit)

    def _apply(self, listing: list[Mailbox], version: int, own: tuple[str, ...], commit: int) -> None:
        if commit < self._commit:
            return  # read before the listing we have (command_ended's, read later): stale
        self._commit = commit
        old, self.listing = self.listing, listing
        self._tell(self.lines_for(changes(old, listing), own))
        if self._watch is None:
            return  # overflowed
        if version != self.metadata_version and self.wants_metadata:
            asyncio.get_running_loop().create_task(self._metadata_changed(own))
        self.metadata_version = version

    def _tell(self, lines: list[bytes]) -> None:
        if not lines:
            return
        if not self.session.conn.writable():
            self.overflow()
            return
        for line in lines:
            self.session.untagged(line)

    def overflow(self) -> None:
        """RFC 5465 §5.8: the client does not keep up; say so once and stop telling."""
        session = self.session
        session.untagged("OK [NOTIFICATIONOVERFLOW] notifications stopped: NOTIFY SET to resume")
        self.cancel()
        if session.notifier is self:
            session.notifier = None
        session.log.warning("notify_overflow")

    # -- the client's own commands (§5) ---------------------------------------------------

    def command_started(self, command) -> None:
        if command.name in CHANGING:
            self._own = named_by(command)

    async def command_ended(self) -> None:
        """After a command of the client's (the session's `running` lock still held)."""
        if self._missed:
            self._start_push()  # it waits for the lock, so comes after the tagged answer
        own = self._own
        try:
            if own is not None and self._watch is not None and not self.session.ended:
                # `_own` stays set until the look is applied: the tagged answer has gone out,
                # and news from the watcher meanwhile would tell the client its own change.
                await self._look_after(own)
        finally:
            self._own = None
            deferred, self._deferred = self._deferred, None
        if deferred is not None and self._watch is not None and not self.session.ended:
            self._apply(*deferred[:2], (), deferred[2])

    async def _look_after(self, own: tuple[str, ...]) -> None:
        session = self.session
        store = session.context.store
        try:
            commit = await session.run_store(store.last_commit, session.user)
            listing = await session.run_store(store.mailboxes, session.user)
            version = await session.run_store(store.metadata_version, session.user)
        except Exception:  # noqa: BLE001 - the watcher's next news tells what this missed
            session.log.warning("notify_look_failed", exc_info=True)
            return
        if self._watch is not None and not session.ended:
            self._apply(listing, version, own, commit)

    async def _metadata_changed(self, own: tuple[str, ...] = ()) -> None:
        session = self.session
        try:
            async with self._metadata_lock:  # one comparison at a time, each from the last
                now = await session.run_store(session.context.store.metadata_digests, session.user)
                if self._watch is None or session.ended:
                    return
                old, self.digests = self.digests, now
                self._tell(self.metadata_lines(old, now, own))
        except Exception:  # noqa: BLE001 - a failed look costs this notification, not the session
            session.log.warning("notify_metadata_failed", exc_info=True)

    def metadata_lines(self, old: dict[tuple[int, str], int], new: dict[tuple[int, str], int],
                       own: tuple[str, ...] = ()) -> list[bytes]:
        """`METADATA mailbox entry...` for the entries that differ (RFC 5464 §4.4.2)."""
        changed: dict[int, list[str]] = {}
        for key in sorted(old.keys() ^ new.keys() | {k for k in old.keys() & new.keys() if old[k] != new[k]}):
            changed.setdefault(key[0], []).append(key[1])
        by_id = {m.id: m for m in self.listing}
        out = []
        for mailbox_id, entries in changed.items():
            if mailbox_id == 0:
                wanted = any("ServerMetadataChange" in g.events for g in self.groups)
                name = ""
            else:
                mailbox = by_id.get(mailbox_id)
                wanted = mailbox is not None and "MailboxMetadataChange" in self._events(mailbox)
                name = mailbox.name if mailbox is not None else ""
            if wanted and name not in own:
                out.append(b"METADATA " + r.mailbox(name) + b" " + b" ".join(r.astring(e) for e in entries))
        return out

    def lines_for(self, found: list[Change], own: tuple[str, ...] = ()) -> list[bytes]:
        out = []
        for change in found:
            if own and (covered(change.mailbox.name, own) or (change.old and covered(change.old.name, own))):
                continue  # the client's own doing (§5)
            if change.kind == "messages":
                events = self.events_of(change.mailbox)
                happened = {event for event, yes in (("MessageNew", change.new), ("MessageExpunge", change.expunged),
                                                     ("FlagChange", change.flags)) if yes}
                if happened.intersection(events):
                    out.append(status_line(change.mailbox, status_items(events, self.session.condstore)))
            elif change.kind == "subscription":
                if "SubscriptionChange" in self._events(change.mailbox) + self._events(change.old):
                    out.append(list_line(change.mailbox))
            elif change.kind == "renamed":
                if "MailboxName" in self._events(change.mailbox) + self._events(change.old):
                    out.append(list_line(change.mailbox, old_name=change.old.name))
            elif "MailboxName" in self._events(change.mailbox):  # created, deleted
                out.append(list_line(change.mailbox, gone=change.kind == "deleted"))
        return out

    def selected_changed(self, state: Mailbox | None) -> None:
        """The selected mailbox changed (`state`: as it is now, None if gone): tell the client
        now, unless a command runs (its end tells), a push is under way, or the change is of
        a kind the client did not ask for (only flags, without FlagChange; only expunges,
        under SELECTED-DELAYED)."""
        if not self.pushes_selected:
            return
        view = self.session.view
        if state is not None and view is not None and view.uidvalidity == state.id:
            was = self._selected
            if was is None or was[0] is not view:
                was = (view, view.mailbox.uidnext, view.mailbox.exists)  # as SELECT found it
            self._selected = (view, state.uidnext, state.exists)
            arrived = state.uidnext > was[1]
            expunged = state.exists < was[2] + (state.uidnext - was[1])
            wanted = self.selected_group.events
            if not (arrived or (expunged and self.selected_group.filter == "SELECTED")
                    or (not arrived and not expunged and "FlagChange" in wanted)):
                return
        if self._pushing or self.session.running.locked():
            # Told when the push or the command ends: dropped, the messages that came during
            # a push of big FETCHes got no FETCH at all, and their EXISTS only at a command.
            self._missed = True
            return
        self._start_push()

    def _start_push(self) -> None:
        if self._pushing or self._watch is None or self.session.ended:
            return
        if not self.session.conn.writable():
            self.overflow()
            return
        self._missed = False
        self._pushing = True
        asyncio.get_running_loop().create_task(self._push())

    async def _push(self) -> None:
        session = self.session
        try:
            async with session.running:
                view = session.view
                if view is None or session.ended or session.notifier is not self:
                    return
                session.changed = False
                if self._fetched is None or self._fetched[0] is not view:
                    self._fetched = (view, view.mailbox.uidnext - 1)  # as SELECT found it
                await selected.sync(session, expunges=self.selected_group.filter == "SELECTED")
                last = self._fetched[1]
                fetch = self.selected_group.fetch
                if fetch and session.view is view and view.max_uid() > last:
                    self._fetched = (view, view.max_uid())
                    new = Fetch("*", "UID FETCH", sequence=SequenceSet(((last + 1, view.max_uid()),)), items=fetch,
                                changedsince=None, uid=True)
                    await selected.fetch(session, new)
        except Exception:  # noqa: BLE001 - a failed push costs the push; the next command tells
            session.log.warning("notify_push_failed", exc_info=True)
        finally:
            self._pushing = False
        if self._missed and session.notifier is self:
            self._start_push()


async def notify(session: SessionState, command: Notify):
    """NOTIFY NONE, or NOTIFY SET [STATUS] groups: replaces what was set before."""
    unsupported = [e for g in command.groups for e in g.events if e not in SUPPORTED]
    if unsupported:
        raise no(f"unsupported event {unsupported[0]}", f"BADEVENT ({' '.join(SUPPORTED)})")
    if session.notifier is not None:
        session.notifier.cancel()
        session.notifier = None
    if not command.groups:
        return None
    notifier = Notifier(session, command)
    await notifier.start(status=command.status)
    session.notifier = notifier
    session.log.info("notify", groups=len(command.groups))
    return None
