"""THREAD's two algorithms (RFC 5256 §4): ORDEREDSUBJECT and REFERENCES, and the
`(1 (2 3)(4))` form of their answer. Sans-IO: message summaries (imapd.sort.Summary,
References included) in, a forest of message numbers out.

REFERENCES follows the RFC's steps with the choices Dovecot makes where the RFC leaves
room (imaptest's thread groups hold servers to them):
  - a duplicate Message-ID, or none, makes a message a node of its own (§4 (1)(A));
  - a link from References that would make a loop is not made, and a child keeps the
    parent it has; a message's own parent is the last reference, which replaces an
    earlier parent unless the new link would make a loop (then it has none);
  - a message with a dummy parent is attached to its nearest real ancestor, or under the
    topmost dummy when it has none (§4 (3)); a dummy root with one child gives way to it;
  - dates are the sent date, the internal date without one; ties go by UID; a dummy root
    sorts by its oldest child (§4 (4));
  - threads whose roots share a non-empty base subject merge as §4 (5) says.
All of it is iterative: a reply chain thousands deep costs no Python stack; and bounded:
the loop checks of one THREAD take at most MAX_LOOP_STEPS steps (see there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from imapd.sort import Summary, ascii_casemap, base_subject

# The last this many References are linked: the nearest ancestors, which decide where a
# message goes; a header of thousands costs no more than this.
MAX_REFERENCES = 100
# Steps of the loop check (_link) one THREAD may take: a real mailbox needs a few per
# message, while a crafted one (deep chains of References, many linked roots hung under
# their ends) made it quadratic: 2,400 messages took 2.8 s, 10,000 would take 48. Past
# the budget a link that needs the check is not made: the child starts a thread of its own.
MAX_LOOP_STEPS = 1_000_000
_MSGID = re.compile(r"<([^<>]*)>")


def message_ids(header: str | None) -> list[str]:
    """The msg-ids of a References or In-Reply-To value, in order, without their brackets."""
    return [m.strip() for m in _MSGID.findall(header or "") if m.strip()]


def header_field(head: bytes, name: str) -> str | None:
    """The first `name` field of a raw header, unfolded (RFC 5322 §2.2.3), None without one."""
    text = head.decode("latin-1")
    wanted = name.lower() + ":"
    found: list[str] | None = None
    for line in text.splitlines():
        if found is not None:
            if line[:1] in (" ", "\t"):
                found.append(line)
                continue
            break
        if line.lower().startswith(wanted):
            found = [line[len(wanted):]]
        elif not line:
            break
    return " ".join(part.strip() for part in found) if found is not None else None


class _Node:
    __slots__ = ("message", "parent", "children", "dummy", "reply", "merged_into", "ignore", "linked")

    def __init__(self, message: Summary | None = None):
        self.message = message
        self.parent: _Node | None = None
        self.children: list[_Node] = []
        self.dummy = message is None
        self.reply = False
        self.merged_into: _Node | None = None
        self.ignore = False
        self.linked = False  # some node has had this one as its parent

    def sort_key(self) -> tuple[float, int]:
        if self.message is not None:
            return (self.message.date, self.message.uid)
        first = min(self.children, key=_Node.sort_key)
        return first.sort_key()


class _Budget:
    """What is left of MAX_LOOP_STEPS for one THREAD."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps = MAX_LOOP_STEPS


def _has_ancestor(node: _Node, ancestor: _Node, budget: _Budget) -> bool | None:
    """Whether `ancestor` is `node` or above it; None when the budget ran out first."""
    while node is not ancestor:
        if node.parent is None:
            return False
        if budget.steps <= 0:
            return None
        budget.steps -= 1
        node = node.parent
    return True


def _link(parent: _Node, child: _Node, budget: _Budget) -> None:
    """parent -> child, unless it would make a loop (or the check is over budget); a child
    keeps the parent it has. The cheap tests first: only a node that is the parent of
    some other can close a loop."""
    if child.parent is not None or parent is child:
        return
    if child.linked and _has_ancestor(parent, child, budget) is not False:
        return
    child.parent = parent
    parent.linked = True


def references(messages: Iterable[Summary]) -> list[_Node]:
    """THREAD=REFERENCES: the sorted root nodes of the forest."""
    by_id: dict[str, _Node] = {}
    nodes: list[_Node] = []
    budget = _Budget()
    for message in sorted(messages, key=lambda m: m.uid):
        ids = message_ids(message.envelope.message_id)
        own = ids[0] if ids else None
        node = by_id.get(own) if own is not None else None
        if node is None or not node.dummy:  # (1)(A): a new node; a duplicate id gets its own
            node = _Node(message)
            nodes.append(node)
            if own is not None and own not in by_id:
                by_id[own] = node
        else:
            node.message, node.dummy = message, False
        refs = list(message.references[-MAX_REFERENCES:]) or message_ids(message.envelope.in_reply_to)[:1]
        chain = []
        for ref in refs:
            if ref not in by_id:
                by_id[ref] = _Node()
                nodes.append(by_id[ref])
            chain.append(by_id[ref])
        for parent, child in zip(chain, chain[1:], strict=False):
            if parent is not child:
                _link(parent, child, budget)
        parent = chain[-1] if chain else None
        if node.parent is not None and node.parent is not parent:
            node.parent = None  # (1)(C): the last reference wins over an earlier parent
        if parent is not None and parent is not node:
            _link(parent, node, budget)
    return _finish(nodes)


def _finish(nodes: list[_Node]) -> list[_Node]:
    # (2), (3): real messages hang under their nearest real ancestor, or the topmost dummy.
    # Each dummy's answer is kept once found: many messages under one deep chain of dummies
    # walked all of it each (quadratic).
    roots = []
    above: dict[int, _Node] = {}  # id(dummy) -> where a message under it hangs
    for node in nodes:
        if node.parent is None:
            roots.append(node)
            continue
        if node.dummy:
            continue
        _hang_under(node.parent, above).children.append(node)
    for node in nodes:
        node.parent = None
    roots = _sort_roots([r for r in roots if not r.dummy or r.children])
    # (5): threads with the same base subject come together.
    table: dict[str, _Node] = {}
    for root in roots:
        subject_of = root.message if not root.dummy else min(root.children, key=_Node.sort_key).message
        subject, reply = base_subject(subject_of.envelope.subject_text)
        if not subject:
            continue
        key = ascii_casemap(subject)
        held = table.get(key)
        if held is None:
            table[key] = root
        elif not held.dummy and (root.dummy or (held.reply and not reply)):
            held.merged_into = root
            table[key] = root
        else:
            root.merged_into = held
        root.reply = reply
    changed = False
    for root in list(roots):
        if root.merged_into is None or root.ignore:
            continue
        changed = True
        top = root.merged_into
        while top.merged_into is not None:
            top = top.merged_into
        if root.dummy:  # both dummies: the children become siblings
            top.children.extend(root.children)
            root.children = []
            root.ignore = True
        elif top.dummy or (root.reply and not top.reply):
            top.children.append(root)
            root.ignore = True
        else:
            dummy = _Node()
            dummy.children = [top, root]
            top.merged_into = dummy
            top.ignore = root.ignore = True
            roots.append(dummy)
    if changed:
        roots = _sort_roots([r for r in roots if not r.ignore and (not r.dummy or r.children)])
    return roots


def _hang_under(parent: _Node, above: dict[int, _Node]) -> _Node:
    """`parent` if real, else its nearest real ancestor or the topmost dummy above it."""
    path = []
    while parent.dummy and parent.parent is not None and id(parent) not in above:
        path.append(parent)
        parent = parent.parent
    found = above.get(id(parent), parent) if parent.dummy else parent
    for dummy in path:
        above[id(dummy)] = found
    return found


def _sort_roots(roots: list[_Node]) -> list[_Node]:
    """(4): by date; a dummy root with one child gives its place to the child (3)(B)."""
    out = []
    for root in roots:
        if root.dummy and len(root.children) == 1:
            root = root.children[0]
        out.append(root)
    return sorted(out, key=_Node.sort_key)


def ordered_subject(messages: Iterable[Summary]) -> list[_Node]:
    """THREAD=ORDEREDSUBJECT (§4): messages grouped by base subject, each group by date; the
    first of a group is the root and the others its children; threads by their root's date."""
    groups: dict[str, list[Summary]] = {}
    for message in messages:
        groups.setdefault(ascii_casemap(base_subject(message.envelope.subject_text)[0]), []).append(message)
    roots = []
    for group in groups.values():
        group.sort(key=lambda m: (m.date, m.uid))
        root = _Node(group[0])
        root.children = [_Node(m) for m in group[1:]]
        roots.append(root)
    return sorted(roots, key=_Node.sort_key)


def render(roots: list[_Node], number_of) -> str:
    """`(1 (2 3)(4))(5)`: each thread in parentheses, one child follows its parent after a
    space, several are each parenthesized (RFC 5256 §4 `thread-list`). `number_of` maps a
    message to what the client is told (its sequence number or UID). Iterative."""
    out: list[str] = []
    # A stack of pending text and nodes; a node expands to its number and its children.
    stack: list[object] = []
    for root in reversed(roots):
        stack += [")", root, "("]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        node: _Node = item  # type: ignore[assignment]
        children = sorted(node.children, key=_Node.sort_key)
        if not node.dummy:
            out.append(str(number_of(node.message)))
        if len(children) == 1:
            stack += [children[0], " "]
        elif children:
            for child in reversed(children):
                stack += [")", child, "("]
            if not node.dummy:
                stack.append(" ")
    return "".join(out)
