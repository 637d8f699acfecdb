"""LIST and LSUB matching (RFC 3501 §6.3.8, RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE).

`*` matches anything, `%` anything but the hierarchy separator "/". Parents that do not
exist themselves (left by a DELETE of a parent, or implied by a subscription) still list
where a pattern reaches them, as \\Noselect (\\NonExistent for LIST-EXTENDED selections),
so a client walking the tree with `%` finds their children.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from storage import Mailbox


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


MAX_NAME = 1024  # characters: longer than any mailbox name the store allows (500 bytes)


@dataclass(frozen=True)
class _Pattern:
    """A LIST pattern as bit masks over its positions, for a matcher whose time is linear in
    the name whatever the pattern holds: a regex of `.*` and `[^/]*` backtracks, and five
    wildcards against a 200-character name took 72 s."""

    size: int  # positions; bit `size` is the accepting state
    wild: int  # positions of `*` and `%` (each may match nothing)
    star: int  # `*`: stays on any character
    percent: int  # `%`: stays on any character but "/"
    literals: dict[str, int]  # character -> positions that take it
    impossible: bool  # more literal characters than any name has


@lru_cache(maxsize=256)
def _compile(pattern: str) -> _Pattern:
    collapsed: list[str] = []
    for char in pattern:
        if char in "*%" and collapsed and collapsed[-1] in "*%":
            collapsed[-1] = "*" if "*" in (char, collapsed[-1]) else "%"  # "**", "*%", "%*": "*"
        else:
            collapsed.append(char)
    star = percent = 0
    literals: dict[str, int] = {}
    for position, char in enumerate(collapsed):
        if char == "*":
            star |= 1 << position
        elif char == "%":
            percent |= 1 << position
        else:
            literals[char] = literals.get(char, 0) | 1 << position
    count = sum(bin(mask).count("1") for mask in literals.values())
    return _Pattern(len(collapsed), star | percent, star, percent, literals, count > MAX_NAME)


def _fullmatch(pattern: _Pattern, name: str) -> bool:
    """Thompson's simulation of the pattern on `name`: the set of positions it may be at, as
    an int, one step per character. A wildcard may match nothing: the set always includes
    the position after each wildcard it includes (one shift: no two wildcards are adjacent)."""
    if pattern.impossible:
        return False
    states = 1
    states |= (states & pattern.wild) << 1
    for char in name:
        stay = states & (pattern.star if char == "/" else pattern.wild)
        states = stay | (states & pattern.literals.get(char, 0)) << 1
        if not states:
            return False
        states |= (states & pattern.wild) << 1
    return bool(states >> pattern.size & 1)


def matches(pattern: str, name: str) -> bool:
    if _fullmatch(_compile(pattern), name):
        return True
    # INBOX is case-insensitive (RFC 3501 §5.1): "In%" finds it too.
    return name == "INBOX" and _fullmatch(_compile(pattern.upper()), name)


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
    matched = {name for name in universe if any(matches(p, name) for p in full_patterns)}
    # RFC 5258 §3.5: CHILDINFO tells of a subscribed descendant the client would not see
    # otherwise; one the patterns list anyway needs no parent to tell of it ("SHOULD ONLY
    # return a non-matching mailbox name along with CHILDINFO if at least one matching child
    # is not also being returned"). One walk up from each such descendant.
    hidden_below: set[str] = set()
    if subscribed_only and recursive:
        for name, item in universe.items():
            if item.subscribed and name not in matched:
                hidden_below.update(_parents(name))
    out = []
    for name, item in universe.items():
        if name not in matched:
            continue
        if special_use_only and not item.special_use:
            continue
        if subscribed_only:
            if not item.subscribed:
                if name in hidden_below:
                    item.child_info = True
                else:
                    continue
        elif not item.selectable and not item.children:
            continue
        out.append(item)
    out.sort(key=lambda i: (i.name != "INBOX", i.name))
    return out
