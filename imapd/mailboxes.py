"""The IMAP commands about mailboxes as a whole, in the authenticated state (RFC 3501 §6.3):
SELECT and EXAMINE, CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST (RFC 5258 LIST
extended, RFC 5819 LIST-STATUS, RFC 6154 special-use), LSUB, NAMESPACE (RFC 2342), STATUS,
APPEND (RFC 4315 APPENDUID, RFC 7889 APPENDLIMIT) and QUOTA (RFC 9208).

Each handler takes the session and its parsed command, writes its untagged responses
through the session and returns the tagged OK's text, or `(code, text)`, or None for
"<NAME> completed"; a NO or BAD is raised as `imapd.answers.Answer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from imapd import qresync
from imapd import responses as r
from imapd import appending
from imapd.answers import Answer, no
from imapd.listing import list_mailboxes
from imapd.syntax import (
    Append,
    Command,
    Create,
    Delete,
    GetQuota,
    GetQuotaRoot,
    List,
    Lsub,
    Rename,
    Select,
    Status,
    Subscribe,
    Unsubscribe,
)
from imapd.view import View
from imapd.state import SessionState
from storage import SEEN

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


async def select(session: SessionState, command: Select):
    """SELECT, and EXAMINE: the same, read-only (RFC 3501 §6.3.1, §6.3.2)."""
    readonly = command.readonly
    if command.qresync is not None:
        qresync.require_enabled(session)
    if session.view is not None:
        session.close_view()
        session.untagged("OK [CLOSED] previous mailbox closed")
    if command.condstore:
        session.condstore = True
    name = command.mailbox
    mailbox, uids, bits = await session.run_store(session.context.store.uids, session.user, name)
    claims = session.context.recent
    # RFC 3501 §6.3.2: EXAMINE must not take \Recent away from anyone. An IMAP4rev2 session
    # neither shows nor claims it (RFC 9051 Appendix E, item 12): a rev1 session still gets it.
    if session.rev2:
        recent = ()
    else:
        recent = claims.unclaimed(mailbox, uids) if readonly else await session.run_store(claims.claim, mailbox, uids)
    listed = await _select_list(session, mailbox.name) if session.rev2 else None
    view = View(mailbox, uids, readonly=readonly, recent=recent, snapshots=session.context.snapshots)
    session.open_view(view)
    keywords = " ".join(mailbox.keywords)
    flags = " ".join(SYSTEM_FLAGS) + (" " + keywords if keywords else "")
    session.untagged(f"FLAGS ({flags})")
    session.untagged(f"{view.exists} EXISTS")
    if listed is not None:
        session.untagged(listed)
    else:
        session.untagged(f"{len(view.recent)} RECENT")
    first_unseen = next((i + 1 for i, b in enumerate(bits) if not b & SEEN), None)
    if first_unseen:
        session.untagged(f"OK [UNSEEN {first_unseen}] first unseen")
    session.untagged(f"OK [UIDVALIDITY {mailbox.uidvalidity}] UIDs valid")
    session.untagged(f"OK [UIDNEXT {mailbox.uidnext}] predicted next UID")
    session.untagged(f"OK [HIGHESTMODSEQ {mailbox.highestmodseq}] modseq")
    session.untagged(f"OK [MAILBOXID ({mailbox.object_id})] mailbox id")  # RFC 8474 §4.2
    if readonly:
        session.untagged("OK [PERMANENTFLAGS ()] read-only")
    else:
        session.untagged(f"OK [PERMANENTFLAGS ({flags} \\*)] flags allowed")
    session.watch(mailbox.name)
    if command.qresync is not None:
        await qresync.on_select(session, view, command.qresync)
    session.log.info("select", mailbox=mailbox.name, exists=view.exists, readonly=readonly)
    return ("READ-ONLY" if readonly else "READ-WRITE"), f"{command.name} completed"


async def _select_list(session: SessionState, name: str) -> bytes | None:
    """RFC 9051 §6.3.2: SELECT and EXAMINE answer the mailbox's LIST response, its
    attributes accurate (children, special use, subscription). Only for an IMAP4rev2
    session: two more index reads a SELECT that IMAP4rev1 clients do not need."""
    store = session.context.store
    boxes = await session.run_store(store.mailboxes, session.user)
    subscribed = set(await session.run_store(store.subscriptions, session.user))
    for item in list_mailboxes(boxes, subscribed, "", [name]):
        if item.name == name:  # a name with a wildcard in it matches others too
            return _list_line(item, subscribed=True)
    return b"LIST () \"/\" " + r.mailbox(name)  # deleted meanwhile: SELECT saw it, so it is listed


def _list_line(item, *, subscribed: bool) -> bytes:
    attrs = list(item.attributes(subscribed=subscribed))
    return f"LIST ({' '.join(attrs)}) \"/\" ".encode() + r.mailbox(item.name)


async def create(session: SessionState, command: Create):
    name = command.mailbox.rstrip("/")  # RFC 3501: a trailing separator is a hint only
    uses = command.special_use
    if len(uses) > 1:
        raise no("one special-use attribute per mailbox", "USEATTR")
    try:
        created = await session.run_store(session.context.store.create_mailbox, session.user, name,
                                          uses[0] if uses else None)
    except Answer as answer:
        if uses and "special-use" in answer.text:
            answer.code = "USEATTR"  # RFC 6154 §3: the special use is what failed
        raise
    session.log.info("create", mailbox=name)
    return f"MAILBOXID ({created.object_id})", "CREATE completed"  # RFC 8474 §4.1


async def delete(session: SessionState, command: Delete):
    name = command.mailbox
    if session.view is not None and session.view.name == name:
        raise no("close the mailbox before deleting it", "INUSE")
    await session.run_store(session.context.store.delete_mailbox, session.user, name)
    session.log.info("delete", mailbox=name)


async def rename(session: SessionState, command: Rename):
    old, new = command.old, command.new
    await session.run_store(session.context.store.rename_mailbox, session.user, old, new)
    session.log.info("rename", mailbox=old, to=new)


async def subscribe(session: SessionState, command: Subscribe):
    name = command.mailbox
    await session.run_store(session.context.store.mailbox, session.user, name)  # NONEXISTENT if not there
    await session.run_store(session.context.store.subscribe, session.user, name, True)


async def unsubscribe(session: SessionState, command: Unsubscribe):
    await session.run_store(session.context.store.subscribe, session.user, command.mailbox, False)


async def list_(session: SessionState, command: List):
    select = set(command.select)
    returns = command.returns
    reference, patterns = command.reference, command.patterns
    if patterns == ("",) and not select:
        # RFC 3501 §6.3.8: the hierarchy delimiter and the root of the reference
        session.untagged('LIST (\\Noselect) "/" ""')
        return None
    store = session.context.store
    boxes = await session.run_store(store.mailboxes, session.user)
    subscribed = set(await session.run_store(store.subscriptions, session.user))
    listed = list_mailboxes(boxes, subscribed, reference, patterns,
                            subscribed_only="SUBSCRIBED" in select,
                            special_use_only="SPECIAL-USE" in select,
                            recursive="RECURSIVEMATCH" in select)
    status_items = returns.status
    show_subscribed = returns.subscribed or "SUBSCRIBED" in select
    for item in listed:
        line = _list_line(item, subscribed=show_subscribed)
        if item.child_info:
            line += b" (" + b'"CHILDINFO" (' + b'"SUBSCRIBED"' + b"))"
        session.untagged(line)
        if status_items and item.selectable:
            await status_lines(session, item.name, status_items, quiet=True)


async def lsub(session: SessionState, command: Lsub):
    store = session.context.store
    boxes = await session.run_store(store.mailboxes, session.user)
    subscribed = set(await session.run_store(store.subscriptions, session.user))
    # RFC 3501 §6.3.9: "%" reaching only a subscribed child lists its parent as \Noselect.
    listed = list_mailboxes(boxes, subscribed, command.reference, [command.pattern], subscribed_only=True,
                            recursive=True)
    for item in listed:
        attrs = "" if item.subscribed and item.selectable else "\\Noselect"
        session.untagged(f"LSUB ({attrs}) \"/\" ".encode() + r.mailbox(item.name))


async def namespace(session: SessionState, command: Command):
    session.untagged('NAMESPACE (("" "/")) NIL NIL')


async def status(session: SessionState, command: Status):
    await status_lines(session, command.mailbox, command.items, quiet=False)


async def status_lines(session: SessionState, name: str, items: Iterable[str], *, quiet: bool) -> None:
    """One STATUS response; `quiet` (LIST-STATUS) skips a mailbox gone meanwhile."""
    store = session.context.store
    try:
        mailbox = await session.run_store(store.mailbox, session.user, name)
    except Answer:
        if quiet:
            return
        raise
    deleted = recent = 0
    if "RECENT" in items:
        recent = await session.run_store(session.context.recent.count, session.user, mailbox.name)
    if "DELETED" in items:
        deleted = len(await session.run_store(store.search, session.user, mailbox.name, ("flag", "\\Deleted", True)))
    values = {"DELETED": deleted, "MESSAGES": mailbox.exists, "UIDNEXT": mailbox.uidnext,
              "UIDVALIDITY": mailbox.uidvalidity, "UNSEEN": mailbox.unseen,
              "HIGHESTMODSEQ": mailbox.highestmodseq, "SIZE": mailbox.size,
              "RECENT": recent,
              "APPENDLIMIT": session.max_message_size(), "MAILBOXID": f"({mailbox.object_id})"}
    shown = " ".join(f"{item} {values[item]}" for item in items if item in values)
    if "HIGHESTMODSEQ" in items:
        session.condstore = True
    session.untagged(b"STATUS " + r.mailbox(mailbox.name) + f" ({shown})".encode())


# -- APPEND ------------------------------------------------------------------------------------
# One unit, kept as it was in the session: the delivery path (issue 12, item 3) rewrites it to
# stream the literal into the store.

async def append(session: SessionState, command: Append):
    return await appending.append(session, command)  # every form of APPEND: imapd/appending.py


# -- QUOTA (RFC 9208) --------------------------------------------------------------------------

async def getquotaroot(session: SessionState, command: GetQuotaRoot):
    # One quota root, "", for the whole account, when it has a quota (RFC 9208 §4.3: a
    # mailbox without a quota root gets a QUOTAROOT response naming none).
    store = session.context.store
    mailbox = await session.run_store(store.mailbox, session.user, command.mailbox)
    quota = await session.run_store(store.quota, session.user)
    limited = bool(quota.bytes or quota.messages)
    session.untagged(b"QUOTAROOT " + r.mailbox(mailbox.name) + (b' ""' if limited else b""))
    if limited:
        await quota_line(session, quota)


async def getquota(session: SessionState, command: GetQuota):
    quota = await session.run_store(session.context.store.quota, session.user)
    if command.root != "" or not (quota.bytes or quota.messages):
        raise no("no such quota root", "NONEXISTENT")
    await quota_line(session, quota)


async def quota_line(session: SessionState, quota) -> None:
    """RFC 9208 §5.1, 5.2: STORAGE in KiB, MESSAGE in messages; the limited ones only."""
    usage = await session.run_store(session.context.store.usage, session.user)
    resources = []
    if quota.bytes:
        resources.append(f"STORAGE {(usage.used + 1023) // 1024} {quota.bytes // 1024}")
    if quota.messages:
        resources.append(f"MESSAGE {usage.messages} {quota.messages}")
    session.untagged(f'QUOTA "" ({" ".join(resources)})')


async def setquota(session: SessionState, command: Command):
    raise no("quotas are set by the administrator (postroom user quota)", "NOPERM")
