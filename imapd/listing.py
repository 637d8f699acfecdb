"""LIST and LSUB matching (RFC 3501 §6.3.8, RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE).

`*` matches anything, `%` anything but the hierarchy separator "/". Parents that do not
exist themselves (left by a DELETE of a parent, or implied by a subscription) still list
where a pattern reaches them, as \\Noselect (\\NonExistent for LIST-EXTENDED selections),
so a client walking the tree with `%` finds their children.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from storage.mailboxes import Mailbox


@dataclass
class ListedMailbox:
    name: str
    selectable: bool
    special_use: str | None = None
    children: bool = False
    subscribed: bool = False
    child_info: bool = False  # RECURSIVEMATCH: a descendant is subscribed (CHILDINFO "SUBSCRIBED")
    extended: bool = False  # a LIST-EXTENDED selection: \NonExistent instead of \Noselect

    def attributes(self, *, subscribed: bool) -> Iterable[str]:
        if not self.selectable:
            yield "\\NonExistent" if self.extended else "\\Noselect"
        if self.selectable or self.children:
            yield "\\HasChildren" if self.children else "\\HasNoChildren"
        if self.special_use:
            yield self.special_use
        if subscribed and self.subscribed:
            yield "\\Subscribed"


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def matches(pattern: str, name: str) -> bool:
    if _pattern(pattern).fullmatch(name) is not None:
        return True
    # INBOX is case-insensitive (RFC 3501 §5.1): "In%" finds it too.
    return name == "INBOX" and _pattern(pattern.upper()).fullmatch(name) is not None


def _parents(name: str) -> list[str]:
    levels = name.split("/")
    return ["/".join(levels[:i]) for i in range(1, len(levels))]


def list_mailboxes(boxes: list[Mailbox], subscribed: set[str], reference: str, patterns: list[str], *,
                   subscribed_only: bool = False, special_use_only: bool = False,
                   recursive: bool = False) -> list[ListedMailbox]:
    existing = {box.name: box for box in boxes}
    names = set(existing) | subscribed if subscribed_only else set(existing)
    universe: dict[str, ListedMailbox] = {}
    extended = subscribed_only or special_use_only or recursive
    for name in sorted(names):
        box = existing.get(name)
        universe[name] = ListedMailbox(name, box is not None, box.special_use if box else None,
                                       subscribed=name in subscribed, extended=extended)
        for parent in _parents(name):
            if parent not in universe and parent not in existing:
                universe[parent] = ListedMailbox(parent, False, subscribed=parent in subscribed, extended=extended)
    for name in universe:
        for parent in _parents(name):
            if parent in universe and (name in existing or name in subscribed):
                universe[parent].children = True
    full_patterns = [reference + pattern for pattern in patterns]
    out = []
    for name, item in universe.items():
        if not any(matches(p, name) for p in full_patterns):
            continue
        if special_use_only and not item.special_use:
            continue
        if subscribed_only:
            if not item.subscribed:
                if recursive and any(n.startswith(name + "/") and n in subscribed for n in universe):
                    item.child_info = True
                else:
                    continue
        elif not item.selectable and not item.children:
            continue
        out.append(item)
    out.sort(key=lambda i: (i.name != "INBOX", i.name))
    return out
