"""GETMETADATA and SETMETADATA (RFC 5464): annotations on the server (mailbox "") and on
each mailbox, private and shared alike (one user per mailbox: both are the user's own,
kept apart by their names). The store keeps them (storage/metadata.py): it follows a
mailbox's renames, drops them with the mailbox, and enforces the limits this module
answers with `[METADATA MAXSIZE n]` and `[METADATA TOOMANY]`.
"""

from __future__ import annotations

from imapd import responses as r
from imapd.answers import bad, no
from imapd.state import SessionState
from imapd.syntax import GetMetadata, SetMetadata
from storage import METADATA_MAX_VALUE, MetadataNameError, metadata_entry_name

READ_ONLY = frozenset({"/shared/admin"})  # RFC 5464 §3.2.1.1: set by the server alone


def _entries(names) -> list[str]:
    try:
        return [metadata_entry_name(name) for name in names]
    except MetadataNameError as e:
        raise bad(str(e)) from None  # RFC 5464 §3.2: an invalid entry name is BAD


async def getmetadata(session: SessionState, command: GetMetadata):
    entries = _entries(command.entries)
    found = await session.run_store(session.context.store.get_metadata, session.user, command.mailbox, entries,
                                    command.depth)
    longest = 0
    shown = []
    for name, value in found:
        if command.maxsize is not None and len(value) > command.maxsize:
            longest = max(longest, len(value))  # RFC 5464 §4.2.1
            continue
        shown += [r.astring(name), r.string(value)]
    if shown:
        session.untagged(b"METADATA " + r.mailbox(command.mailbox) + b" " + r.plist(shown))
    if longest:
        return f"METADATA LONGENTRIES {longest}", "GETMETADATA completed"
    return None


async def setmetadata(session: SessionState, command: SetMetadata):
    entries = _entries(name for name, _ in command.items)
    if command.mailbox == "" and READ_ONLY.intersection(entries):
        raise no("/shared/admin is set by the server", "NOPERM")
    for _, value in command.items:
        if value is not None and len(value) > METADATA_MAX_VALUE:
            raise no("value too large", f"METADATA MAXSIZE {METADATA_MAX_VALUE}")
    items = list(zip(entries, (value for _, value in command.items), strict=True))
    await session.run_store(session.context.store.set_metadata, session.user, command.mailbox, items)
    session.log.info("setmetadata", mailbox=command.mailbox, entries=len(items))
