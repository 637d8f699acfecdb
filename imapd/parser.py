"""The IMAP command parser: a Frame's bytes in, a typed `Command` out (RFC 3501 §6, §9 and
the extensions imapd speaks). Sans-IO: no Twisted, no asyncio.

    framer = Framer(max_line=..., max_literal=...)   # imapd.framer: bytes -> frames
    command = parse_command(frame)                    # -> Command, or raises ParseError

A ParseError carries the tag whenever it could be read (answer `tag BAD ...`; None means
`* BAD ...`), an optional response code, and its status ("NO" only for BADCHARSET).
Limits (imapd.tokens, imapd.search_keys): lists nest 16 deep, 100,000 tokens a command,
16,384 sequence-set elements, NOT/OR/parentheses 256 deep, 18 SORT criteria; past one,
ParseError code "LIMIT".
Not parsed: nothing of the extensions advertised is left out.

Each verb parses into its own frozen dataclass in imapd.syntax (`Login`, `Select`, `List`,
`Append`, `Fetch`, `Store`, `Search`, ...; a command without arguments is a plain
`Command`); the UID form of a verb is the same class with `uid=True` and the name
"UID FETCH" etc., which is what the session's state table is keyed by.

Mailbox names are decoded from modified UTF-7 (imapd.utf7) and INBOX, in any case and as
the first level of a path ("inbox/x"), becomes "INBOX"; the separator is "/". System
flags are given their standard case (\\seen -> \\Seen); keywords are kept as written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from imapd import tokens as t
from imapd import urls
from imapd.framer import Close, Continue, Frame, Framer, Reject, read_tag
from imapd.search_keys import parse_charset, parse_criteria, parse_search
from imapd import syntax as c
from imapd.syntax import Command, FetchItem, ParseError, Section

__all__ = ["Close", "Continue", "Frame", "Framer", "Reject", "parse_command"]

STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE",
                          "DELETED", "APPENDLIMIT", "MAILBOXID"})
USE_ATTRIBUTES = {a.upper(): a for a in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent",
                                         "\\Trash")}
LIST_SELECT = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
LIST_SELECT_BASE = frozenset({"SUBSCRIBED", "SPECIAL-USE"})
LIST_RETURN = {"SUBSCRIBED": "subscribed", "CHILDREN": "children", "SPECIAL-USE": "special_use"}  # and STATUS
FETCH_ATTRIBUTES = frozenset({"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
                              "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID", "MODSEQ",
                              "EMAILID", "THREADID", "SAVEDATE", "PREVIEW"})
FETCH_MACROS = {
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SECTION_PREFIXES = frozenset({"BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"})
SECTION_TEXTS = frozenset({"", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})
STORE_MODES = {"": "set", "+": "add", "-": "remove"}
MAX_APPEND_MESSAGES = 100  # in one MULTIAPPEND: each holds a delivery open until the command ends
MAX_CATENATE_PARTS = 100  # in one CATENATE message
ID_MAX_PAIRS, ID_MAX_KEY, ID_MAX_VALUE = 30, 30, 1024  # RFC 2971 §3.3
RESULT_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})
# Each criterion is a pass over every message found: 9 kinds, each once (and its REVERSE),
# is all a client can mean; more is only cost.
MAX_SORT_KEYS = 18
SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"})
THREAD_ALGORITHMS = frozenset({"REFERENCES", "ORDEREDSUBJECT"})
_FIELD_CHARS = frozenset(range(33, 127)) - {ord(":")}  # RFC 5322 ftext


def parse_command(frame: Frame, *, partial: bool = False) -> Command:
    """The command in `frame`; ParseError (with the tag when it could be read) if malformed.
    `partial`: the frame is a command's head, cut where a literal begins (imapd.tokens)."""
    line = frame.parts[0] if frame.parts else b""
    tag = read_tag(line)
    try:
        if tag is None:
            raise ParseError("missing or invalid tag" if line.strip() else "empty command line")
        pos = len(tag)
        name, pos = _word(line, pos)
        if name == "UID":
            sub, pos = _word(line, pos)
            name = f"UID {sub}"
        parser = _COMMANDS.get(name)
        if parser is None:
            raise ParseError("unknown command")
        args = t.Args(t.tokenize(frame.parts, pos, partial=partial))
        command = parser(tag, name, args)
        args.done()
        return command
    except ParseError as exc:
        exc.tag = tag
        raise


def _word(line: bytes, pos: int) -> tuple[str, int]:
    """SP and a command-name word from `pos`, upper case."""
    if line[pos:pos + 1] != b" ":
        raise ParseError("missing command name")
    end = line.find(b" ", pos + 1)
    end = len(line) if end < 0 else end
    word = line[pos + 1:end]
    if not word.isalpha() or not word.isascii():
        raise ParseError("unknown command")
    return word.decode("ascii").upper(), end


# -- commands -------------------------------------------------------------------------------

def _no_args(tag: str, name: str, args: t.Args) -> Command:
    return Command(tag, name)


def _login(tag: str, name: str, args: t.Args) -> c.Login:
    return c.Login(tag, name, user=t.text(args.take("user name"), "user name"),
                   password=t.text(args.take("password"), "password"))


def _authenticate(tag: str, name: str, args: t.Args) -> c.Authenticate:
    mechanism = t.atom(args.take("mechanism"), "mechanism").upper()
    initial = None
    if args.more():
        initial = t.astring(args.take("initial response"), "initial response").decode("ascii", "replace")
        if initial == "=":
            initial = ""
    return c.Authenticate(tag, name, mechanism=mechanism, initial=initial)


def _select(tag: str, name: str, args: t.Args) -> c.Select:
    mailbox = t.mailbox(args.take("mailbox name"))
    condstore = False
    qresync = None
    if args.more():
        params = t.Args(t.group(args.take("select parameters"), "select parameters"))
        if not params.more():
            raise ParseError("empty select parameters")
        while params.more():
            param = t.atom(params.take("select parameter"), "select parameter").upper()
            if param == "CONDSTORE":
                condstore = True
            elif param == "QRESYNC" and qresync is None:
                qresync = _qresync(params.take("QRESYNC parameters"))
            else:
                raise ParseError("unknown select parameter")
    return c.Select(tag, name, mailbox=mailbox, condstore=condstore, qresync=qresync)


def _qresync(tok: t.Token) -> c.QResync:
    """(uidvalidity mod-sequence-value [known-uids [(known-sequence-set known-uid-set)]]),
    RFC 7162 §7."""
    items = t.Args(t.group(tok, "QRESYNC parameters"))
    uidvalidity = t.number(items.take("UIDVALIDITY"), "UIDVALIDITY", 1)
    modseq = t.number(items.take("mod-sequence"), "mod-sequence", 1, t.MAX_NUMBER64)
    known = seqs = seq_uids = None
    if items.more() and not isinstance(items.peek(), t.Group):
        known = t.sequence_set(items.take("known UIDs"), "known UIDs")
    if items.more():
        match = t.Args(t.group(items.take("sequence match data"), "sequence match data"))
        seqs = t.sequence_set(match.take("known sequence set"), "known sequence set")
        seq_uids = t.sequence_set(match.take("known UID set"), "known UID set")
        match.done()
        if any(None in r for r in seqs.ranges + seq_uids.ranges):
            raise ParseError("sequence match data cannot hold *")
        if _count(seqs) != _count(seq_uids):
            raise ParseError("sequence match data: the two sets differ in size")  # RFC 7162 §3.2.5.2
    items.done()
    return c.QResync(uidvalidity, modseq, known, seqs, seq_uids)


def _count(sequence: c.SequenceSet) -> int:
    return sum(abs(high - low) + 1 for low, high in sequence.ranges)


def _create(tag: str, name: str, args: t.Args) -> c.Create:
    mailbox = t.mailbox(args.take("mailbox name"))
    uses: list[str] = []
    if args.more():
        params = t.Args(t.group(args.take("create parameters"), "create parameters"))
        if not params.more():
            raise ParseError("empty create parameters")
        while params.more():
            if t.atom(params.take("create parameter"), "create parameter").upper() != "USE":
                raise ParseError("unknown create parameter")
            attrs = t.group(params.take("USE attributes"), "USE attributes")
            if not attrs:
                raise ParseError("empty USE attributes")
            for attr in attrs:
                flag = t.flag(attr, "special-use attribute")
                if not flag.startswith("\\"):
                    raise ParseError("invalid special-use attribute")
                uses.append(USE_ATTRIBUTES.get(flag.upper(), flag))
    return c.Create(tag, name, mailbox=mailbox, special_use=tuple(uses))


def _mailbox_only(kind: type) -> Callable[[str, str, t.Args], Command]:
    """The parser of a command whose one argument is a mailbox name."""
    def parse(tag: str, name: str, args: t.Args) -> Command:
        return kind(tag, name, mailbox=t.mailbox(args.take("mailbox name")))
    return parse


def _rename(tag: str, name: str, args: t.Args) -> c.Rename:
    return c.Rename(tag, name, old=t.mailbox(args.take("mailbox name")), new=t.mailbox(args.take("new mailbox name")))


def _list(tag: str, name: str, args: t.Args) -> c.List:
    select: list[str] = []
    if isinstance(args.peek(), t.Group):
        for opt in args.take("selection options").items:
            option = t.atom(opt, "selection option").upper()
            if option not in LIST_SELECT:
                raise ParseError(f"unknown selection option {option}")
            select.append(option)
        if "RECURSIVEMATCH" in select and not LIST_SELECT_BASE.intersection(select):
            raise ParseError("RECURSIVEMATCH needs another selection option")  # RFC 5258 §3.1
    reference = _reference(args.take("reference name"))
    patterns_tok = args.take("mailbox pattern")
    if isinstance(patterns_tok, t.Group):
        if not patterns_tok.items:
            raise ParseError("empty pattern list")
        patterns = tuple(t.list_mailbox(p) for p in patterns_tok.items)
    else:
        patterns = (t.list_mailbox(patterns_tok),)
    returns = c.ListReturn()
    if args.more():
        if t.atom(args.take("RETURN"), "RETURN").upper() != "RETURN":
            raise ParseError("expected RETURN")
        opts = t.Args(t.group(args.take("return options"), "return options"))
        while opts.more():
            option = t.atom(opts.take("return option"), "return option").upper()
            if option == "STATUS":
                returns = replace(returns, status=_status_items(opts.take("status items")))
            elif option in LIST_RETURN:
                returns = replace(returns, **{LIST_RETURN[option]: True})
            else:
                raise ParseError(f"unknown return option {option}")
    return c.List(tag, name, reference=reference, patterns=patterns, select=tuple(select), returns=returns)


def _reference(tok: t.Token) -> str:
    """LIST's reference is a mailbox name ("" for none), decoded like one."""
    return t.mailbox(tok, "reference name")


def _lsub(tag: str, name: str, args: t.Args) -> c.Lsub:
    return c.Lsub(tag, name, reference=_reference(args.take("reference name")),
                  pattern=t.list_mailbox(args.take("mailbox pattern")))


def _status(tag: str, name: str, args: t.Args) -> c.Status:
    return c.Status(tag, name, mailbox=t.mailbox(args.take("mailbox name")),
                    items=_status_items(args.take("status items")))


def _status_items(tok: t.Token) -> tuple[str, ...]:
    items = tuple(t.atom(item, "status item").upper() for item in t.group(tok, "status items"))
    if not items:
        raise ParseError("empty status item list")
    for item in items:
        if item not in STATUS_ITEMS:
            raise ParseError(f"unknown status item {item}")
    return items


def _append(tag: str, name: str, args: t.Args) -> c.Append:
    """APPEND mailbox, then messages (RFC 3502 MULTIAPPEND: one or more), each
    [flag-list] [date-time] and one of: a literal, a literal8 (RFC 3516 §4.4),
    `UTF8 (literal8)` (RFC 6855 §4), `CATENATE (parts)` (RFC 4469)."""
    mailbox = t.mailbox(args.take("mailbox name"))
    messages = []
    while True:
        if len(messages) >= MAX_APPEND_MESSAGES:
            raise ParseError(f"more than {MAX_APPEND_MESSAGES} messages in one APPEND", code="LIMIT")
        messages.append(_append_message(args))
        if not args.more():
            return c.Append(tag, name, mailbox=mailbox, messages=tuple(messages))


def _append_message(args: t.Args) -> c.AppendMessage:
    flags: tuple[str, ...] = ()
    date = None
    if isinstance(args.peek(), t.Group):
        flags = t.flag_list(args.take("flag list"))
    nxt = args.peek()
    if isinstance(nxt, t.String) and not nxt.literal:
        date = t.date_time(args.take("date-time"))
    message = args.take("message literal")
    if isinstance(message, t.Atom) and message.text.upper() in ("CATENATE", "UTF8"):
        word = message.text.upper()
        inner = t.group(args.take(f"{word} parts"), f"{word} parts")
        if word == "UTF8":
            if len(inner) != 1 or not isinstance(inner[0], t.String) or not inner[0].binary:
                raise ParseError("UTF8 takes one literal8")
            return c.AppendMessage(flags, date, message=inner[0].data, binary=True, utf8=True)
        return c.AppendMessage(flags, date, catenate=_catenate(inner))
    if not isinstance(message, t.String) or not message.literal:
        raise ParseError("the message must be a literal")
    return c.AppendMessage(flags, date, message=message.data, binary=message.binary)


def _catenate(items: tuple) -> tuple:
    """CATENATE's parts (RFC 4469 §5): `TEXT literal` and `URL url`, in order."""
    if not items:
        raise ParseError("empty CATENATE list")
    if len(items) > 2 * MAX_CATENATE_PARTS:
        raise ParseError(f"more than {MAX_CATENATE_PARTS} CATENATE parts", code="LIMIT")
    parts: list = []
    pairs = t.Args(items)
    while pairs.more():
        kind = t.atom(pairs.take("CATENATE part"), "CATENATE part").upper()
        value = pairs.take("CATENATE part value")
        if kind == "TEXT":
            if not isinstance(value, t.String) or not value.literal:
                raise ParseError("a CATENATE TEXT part must be a literal")
            parts.append(value.data)
        elif kind == "URL":
            url = t.astring(value, "CATENATE URL")
            if not url.isascii():
                raise ParseError("a URL is ASCII")
            parts.append(c.CatenateUrl(url.decode("ascii")))
        else:
            raise ParseError(f"unknown CATENATE part {kind}")
    return tuple(parts)


def parse_section(spec: bytes) -> Section:
    """A section as written inside BODY[...] (and in an IMAP URL's ;SECTION=, RFC 5092)."""
    tokens = t.tokenize([b"BODY[" + spec + b"]"])
    if len(tokens) != 1 or not isinstance(tokens[0], t.Bracketed) or tokens[0].suffix:
        raise ParseError("invalid section")
    return _section(tokens[0].inner)


def _fetch(tag: str, name: str, args: t.Args) -> c.Fetch:
    sequence = t.sequence_set(args.take("sequence set"))
    what = args.take("fetch items")
    if isinstance(what, t.Atom) and what.text.upper() in FETCH_MACROS:
        items = tuple(FetchItem(item) for item in FETCH_MACROS[what.text.upper()])
    elif isinstance(what, t.Group):
        if not what.items:
            raise ParseError("empty fetch item list")
        items = _fetch_items(what.items)
    else:
        items = (_fetch_item(what),)
    changedsince = None
    vanished = False
    if args.more():
        modifiers = t.Args(t.group(args.take("fetch modifiers"), "fetch modifiers"))
        if not modifiers.more():
            raise ParseError("empty fetch modifier list")
        while modifiers.more():
            modifier = t.atom(modifiers.take("fetch modifier"), "fetch modifier").upper()
            if modifier == "CHANGEDSINCE":
                changedsince = t.number(modifiers.take("CHANGEDSINCE value"), "CHANGEDSINCE value", 1,
                                        t.MAX_NUMBER64)
            elif modifier == "VANISHED":
                vanished = True
            else:
                raise ParseError(f"unknown fetch modifier {modifier}")
        # RFC 7162 §3.2.6: VANISHED only in UID FETCH, and only with CHANGEDSINCE
        if vanished and (changedsince is None or not _is_uid(name)):
            raise ParseError("VANISHED needs UID FETCH and CHANGEDSINCE")
    return c.Fetch(tag, name, sequence=sequence, items=items, changedsince=changedsince, vanished=vanished,
                   uid=_is_uid(name))


def _fetch_items(tokens: tuple) -> tuple[FetchItem, ...]:
    """The items of a parenthesized FETCH list; PREVIEW may be followed by its modifiers,
    `PREVIEW (LAZY)` (RFC 8970 §3)."""
    items: list[FetchItem] = []
    tokens = t.Args(tokens)
    while tokens.more():
        item = _fetch_item(tokens.take("fetch item"))
        if item.name == "PREVIEW" and isinstance(tokens.peek(), t.Group):
            modifiers = t.group(tokens.take("PREVIEW modifiers"), "PREVIEW modifiers")
            if not modifiers:
                raise ParseError("empty PREVIEW modifier list")
            for modifier in modifiers:
                if t.atom(modifier, "PREVIEW modifier").upper() != "LAZY":
                    raise ParseError("unknown PREVIEW modifier")
            item = FetchItem("PREVIEW", lazy=True)
        items.append(item)
    return tuple(items)


def _modifiers(tok: t.Token, what: str) -> list[tuple[str, t.Token]]:
    """`(NAME value ...)` pairs, as in RFC 4466 fetch and store modifiers."""
    items = t.Args(t.group(tok, f"{what}s"))
    if not items.more():
        raise ParseError(f"empty {what} list")
    pairs = []
    while items.more():
        pairs.append((t.atom(items.take(what), what).upper(), items.take(f"{what} value")))
    return pairs


def _fetch_item(tok: t.Token) -> FetchItem:
    if isinstance(tok, t.Atom):
        name = tok.text.upper()
        if name not in FETCH_ATTRIBUTES:
            raise ParseError(f"unknown fetch item {tok.text}")
        return FetchItem(name)
    if not isinstance(tok, t.Bracketed) or tok.prefix not in _SECTION_PREFIXES:
        raise ParseError("unknown fetch item")
    partial = None
    if tok.suffix and tok.prefix == "BINARY.SIZE":
        raise ParseError("BINARY.SIZE takes no partial range")
    if tok.suffix:
        origin, dot, count = tok.suffix[1:-1].partition(".")
        if tok.suffix[0] != "<" or tok.suffix[-1] != ">" or not dot:
            raise ParseError("invalid partial range")
        partial = (t.number(t.Atom(origin), "partial origin"), t.number(t.Atom(count), "partial count", 1))
    if tok.prefix.startswith("BINARY"):
        return FetchItem("BINARY.SIZE" if tok.prefix == "BINARY.SIZE" else "BINARY[]",
                         section=_binary_section(tok.inner), peek=tok.prefix == "BINARY.PEEK", partial=partial)
    return FetchItem("BODY[]", section=_section(tok.inner), peek=tok.prefix == "BODY.PEEK", partial=partial)


def _binary_section(inner: tuple) -> Section:
    """The inside of BINARY[...] and BINARY.SIZE[...]: part numbers only (RFC 3516 §6
    `section-binary`)."""
    section = _section(inner)
    if section.text:
        raise ParseError("a BINARY section is part numbers only")
    return section


def _section(inner: tuple) -> Section:
    """The inside of BODY[...]: part numbers, then HEADER, HEADER.FIELDS[.NOT] (names),
    TEXT or (after a part number) MIME."""
    if not inner:
        return Section()
    spec = t.atom(inner[0], "section").upper()
    words = spec.split(".")
    if not all(words):
        raise ParseError(f"invalid section {spec}")
    digits = 0  # words are walked by index: pop(0) made 1.1.1...1.TEXT cost O(n^2)
    while digits < len(words) and words[digits][:1].isdigit():
        digits += 1
    part = [_part_number(word) for word in words[:digits]]
    text = ".".join(words[digits:])
    if text not in SECTION_TEXTS or (text == "MIME" and not part):
        raise ParseError(f"invalid section {spec}")
    fields: tuple[str, ...] = ()
    if text.startswith("HEADER.FIELDS"):
        if len(inner) != 2:
            raise ParseError(f"{text} needs a list of field names")
        names = t.group(inner[1], "header field list")
        if not names:
            raise ParseError("empty header field list")
        fields = tuple(_field_name(name) for name in names)
    elif len(inner) != 1:
        raise ParseError("unexpected arguments in section")
    return Section(part=tuple(part), text=text, fields=fields)


def _part_number(word: str) -> int:
    # The length first: int() of a long digit string is slow, and over 4300 digits raises.
    if not word.isdigit() or word[0] == "0" or len(word) > 10 or int(word) > t.MAX_NUMBER:
        raise ParseError("invalid part number")
    return int(word)


def _field_name(tok: t.Token) -> str:
    data = t.astring(tok, "header field name")
    if not data or not all(b in _FIELD_CHARS for b in data):
        raise ParseError("invalid header field name")
    return data.decode("ascii")


def _store(tag: str, name: str, args: t.Args) -> c.Store:
    sequence = t.sequence_set(args.take("sequence set"))
    unchangedsince = None
    if isinstance(args.peek(), t.Group):
        for modifier, value in _modifiers(args.take("store modifiers"), "store modifier"):
            if modifier != "UNCHANGEDSINCE":
                raise ParseError(f"unknown store modifier {modifier}")
            unchangedsince = t.number(value, "UNCHANGEDSINCE value", 0, t.MAX_NUMBER64)
    item = t.atom(args.take("store item"), "store item").upper()
    sign = item[:1] if item[:1] in "+-" else ""
    base = item[len(sign):]
    if base not in ("FLAGS", "FLAGS.SILENT"):
        raise ParseError(f"unknown store item {item}")
    rest = args.rest()
    if len(rest) == 1 and isinstance(rest[0], t.Group):
        flags = t.flag_list(rest[0])
    elif rest:
        flags = tuple(t.flag(tok) for tok in rest)
    else:
        raise ParseError("missing flags")
    return c.Store(tag, name, sequence=sequence, mode=STORE_MODES[sign], silent=base == "FLAGS.SILENT",
                   flags=flags, unchangedsince=unchangedsince, uid=_is_uid(name))


def _copy(tag: str, name: str, args: t.Args) -> c.Copy | c.Move:
    kind = c.Move if name.endswith("MOVE") else c.Copy
    return kind(tag, name, sequence=t.sequence_set(args.take("sequence set")),
                mailbox=t.mailbox(args.take("mailbox name")), uid=_is_uid(name))


def _expunge(tag: str, name: str, args: t.Args) -> c.Expunge:
    if not _is_uid(name):
        return c.Expunge(tag, name)
    return c.Expunge(tag, name, sequence=t.sequence_set(args.take("sequence set")), uid=True)


def _search(tag: str, name: str, args: t.Args) -> c.Search:
    returns = _search_return(args)
    charset, query = parse_search(args)
    return c.Search(tag, name, charset=charset, query=query, uid=_is_uid(name), returns=returns)


def _search_return(args: t.Args) -> c.SearchReturn | None:
    """`RETURN (option ...)` before the criteria (RFC 4731 §3.1, RFC 5182 SAVE, RFC 5267
    PARTIAL, UPDATE, CONTEXT); None when absent. No result option at all means ALL."""
    first = args.peek()
    if not (isinstance(first, t.Atom) and first.text.upper() == "RETURN"):
        return None
    args.take("RETURN")
    options = t.Args(t.group(args.take("return options"), "return options"))
    found: dict = {}
    while options.more():
        option = t.atom(options.take("return option"), "return option").upper()
        if option in RESULT_OPTIONS:
            found[option.lower()] = True
        elif option == "PARTIAL":
            found["partial"] = _partial_range(options.take("partial range"))
        elif option == "UPDATE":
            found["update"] = True
        elif option != "CONTEXT":  # a hint (RFC 5267 §4.2): nothing to do for it here
            raise ParseError(f"unknown return option {option}")
    if not any(k in found for k in ("min", "max", "all", "count", "save", "partial")):
        found["all"] = True
    return c.SearchReturn(**found)


def _partial_range(tok: t.Token) -> tuple[int, int]:
    """PARTIAL's `low:high` (RFC 5267 §4.4): two numbers, in either order."""
    text = tok.text if isinstance(tok, t.Atom) else ""
    low, colon, high = text.partition(":")
    if not colon:
        raise ParseError("invalid partial range")
    a = t.number(t.Atom(low), "partial range", 1)
    b = t.number(t.Atom(high), "partial range", 1)
    return min(a, b), max(a, b)


def _sort(tag: str, name: str, args: t.Args) -> c.Sort:
    """`SORT [RETURN (...)] (criteria) charset keys` (RFC 5256 §3, RFC 5267 ESORT)."""
    returns = _search_return(args)
    items = t.Args(t.group(args.take("sort criteria"), "sort criteria"))
    if not items.more():
        raise ParseError("empty sort criteria")
    keys = []
    while items.more():
        word = t.atom(items.take("sort criterion"), "sort criterion").upper()
        reverse = word == "REVERSE"
        if reverse:
            word = t.atom(items.take("sort criterion"), "sort criterion").upper()
        if word not in SORT_KEYS:
            raise ParseError(f"unknown sort criterion {word}")
        keys.append(c.SortKey(word.lower(), reverse))
        if len(keys) > MAX_SORT_KEYS:
            raise ParseError(f"more than {MAX_SORT_KEYS} sort criteria", code="LIMIT")
    charset = parse_charset(args.take("charset"))
    return c.Sort(tag, name, keys=tuple(keys), charset=charset, query=parse_criteria(args, charset),
                  uid=_is_uid(name), returns=returns)


def _thread(tag: str, name: str, args: t.Args) -> c.Thread:
    algorithm = t.atom(args.take("threading algorithm"), "threading algorithm").upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise ParseError(f"unknown threading algorithm {algorithm}")
    charset = parse_charset(args.take("charset"))
    return c.Thread(tag, name, algorithm=algorithm, charset=charset, query=parse_criteria(args, charset),
                    uid=_is_uid(name))


def _cancelupdate(tag: str, name: str, args: t.Args) -> c.CancelUpdate:
    tags = tuple(t.text(tok, "tag") for tok in args.rest())
    if not tags:
        raise ParseError("missing tag")
    return c.CancelUpdate(tag, name, tags=tags)


def _is_uid(name: str) -> bool:
    return name.startswith("UID ")


def _enable(tag: str, name: str, args: t.Args) -> c.Enable:
    caps = tuple(t.atom(tok, "capability").upper() for tok in args.rest())
    if not caps:
        raise ParseError("missing capability")
    return c.Enable(tag, name, capabilities=caps)


def _id(tag: str, name: str, args: t.Args) -> c.Id:
    tok = args.take("ID parameters")
    if isinstance(tok, t.Atom) and tok.text.upper() == "NIL":
        return c.Id(tag, name, params=None)
    items = t.group(tok, "ID parameters")
    if len(items) % 2:
        raise ParseError("ID parameters must come in pairs")
    if len(items) > 2 * ID_MAX_PAIRS:
        raise ParseError("too many ID parameters", code="LIMIT")
    params: dict[str, str | None] = {}
    for key, value in zip(items[::2], items[1::2], strict=True):
        field = _id_string(key, "ID field name")
        if len(field) > ID_MAX_KEY:
            raise ParseError("ID field name too long")
        is_nil = isinstance(value, t.Atom) and value.text.upper() == "NIL"
        params[field] = None if is_nil else _id_string(value, "ID field value")
        if params[field] is not None and len(params[field]) > ID_MAX_VALUE:
            raise ParseError("ID field value too long")
    return c.Id(tag, name, params=params)


def _id_string(tok: t.Token, what: str) -> str:
    if not isinstance(tok, t.String):
        raise ParseError(f"{what} must be a string")
    return t.text(tok, what)


def _compress(tag: str, name: str, args: t.Args) -> c.Compress:
    return c.Compress(tag, name, mechanism=t.atom(args.take("compression mechanism"), "compression mechanism").upper())


def _getquota(tag: str, name: str, args: t.Args) -> c.GetQuota:
    return c.GetQuota(tag, name, root=t.text(args.take("quota root"), "quota root"))


def _setquota(tag: str, name: str, args: t.Args) -> c.SetQuota:
    root = t.text(args.take("quota root"), "quota root")
    items = t.Args(t.group(args.take("resource limits"), "resource limits"))
    limits = {}
    while items.more():
        resource = t.atom(items.take("resource name"), "resource name").upper()
        limits[resource] = t.number(items.take("resource limit"), "resource limit", 0, t.MAX_NUMBER64)
    return c.SetQuota(tag, name, root=root, limits=limits)


# -- METADATA (RFC 5464) --------------------------------------------------------------------------

METADATA_DEPTHS = {"0": "0", "1": "1", "INFINITY": "infinity"}  # RFC 5464 §4.2.2
MAX_METADATA_ENTRIES = 1000  # names in one command: an account holds no more (storage/metadata.py)


def _getmetadata(tag: str, name: str, args: t.Args) -> c.GetMetadata:
    """`GETMETADATA [(options)] mailbox entries`; the options are taken after the mailbox
    too, where clients following the RFC's examples put them."""
    options: tuple = ()
    if isinstance(args.peek(), t.Group):
        options = args.take("options").items
    mailbox = t.mailbox(args.take("mailbox name"))
    if not options and isinstance(args.peek(), t.Group) and len(args.items) - args.i == 2:
        options = args.take("options").items
    maxsize, depth = None, "0"
    opts = t.Args(options)
    while opts.more():
        option = t.atom(opts.take("option"), "option").upper()
        if option == "MAXSIZE":
            maxsize = t.number(opts.take("MAXSIZE value"), "MAXSIZE value")
        elif option == "DEPTH":
            value = t.astring(opts.take("DEPTH value"), "DEPTH value").decode("ascii").upper()
            if value not in METADATA_DEPTHS:
                raise ParseError("DEPTH is 0, 1 or infinity")
            depth = METADATA_DEPTHS[value]
        else:
            raise ParseError(f"unknown GETMETADATA option {option}")
    what = args.take("entries")
    tokens = t.group(what, "entries") if isinstance(what, t.Group) else (what,)
    if not tokens:
        raise ParseError("empty entry list")
    if len(tokens) > MAX_METADATA_ENTRIES:
        raise ParseError("too many entries", code="LIMIT")
    entries = tuple(t.astring(tok, "entry name").decode("ascii", "replace") for tok in tokens)
    return c.GetMetadata(tag, name, mailbox=mailbox, entries=entries, maxsize=maxsize, depth=depth)


def _setmetadata(tag: str, name: str, args: t.Args) -> c.SetMetadata:
    mailbox = t.mailbox(args.take("mailbox name"))
    pairs = t.Args(t.group(args.take("entry values"), "entry values"))
    if not pairs.more():
        raise ParseError("empty entry value list")
    if len(pairs.items) > 2 * MAX_METADATA_ENTRIES:
        raise ParseError("too many entries", code="LIMIT")
    items = []
    while pairs.more():
        entry = t.astring(pairs.take("entry name"), "entry name").decode("ascii", "replace")
        value = pairs.take("entry value")
        if isinstance(value, t.Atom) and value.text.upper() == "NIL":
            items.append((entry, None))
        elif isinstance(value, t.String):
            items.append((entry, value.data))
        else:
            raise ParseError("an entry value is a string or NIL")
    return c.SetMetadata(tag, name, mailbox=mailbox, items=tuple(items))


# -- NOTIFY (RFC 5465 §8) -------------------------------------------------------------------------

NOTIFY_FILTERS = frozenset({"SELECTED", "SELECTED-DELAYED", "INBOXES", "PERSONAL", "SUBSCRIBED", "SUBTREE",
                            "MAILBOXES"})
NOTIFY_EVENTS = {e.upper(): e for e in ("MessageNew", "MessageExpunge", "FlagChange", "AnnotationChange",
                                        "MailboxName", "SubscriptionChange", "MailboxMetadataChange",
                                        "ServerMetadataChange")}
MESSAGE_EVENTS = frozenset({"MessageNew", "MessageExpunge", "FlagChange", "AnnotationChange"})
MAX_NOTIFY_GROUPS = 64
MAX_NOTIFY_MAILBOXES = 1000  # names over all of a command's groups


def _notify(tag: str, name: str, args: t.Args) -> c.Notify:
    verb = t.atom(args.take("NONE or SET"), "NOTIFY argument").upper()
    if verb == "NONE":
        return c.Notify(tag, name)
    if verb != "SET":
        raise ParseError("NOTIFY NONE or NOTIFY SET")
    status = isinstance(args.peek(), t.Atom) and args.peek().text.upper() == "STATUS"
    if status:
        args.take("STATUS")
    tokens = args.rest()
    if not tokens:
        raise ParseError("missing event groups")
    if len(tokens) > MAX_NOTIFY_GROUPS:
        raise ParseError("too many event groups", code="LIMIT")
    groups = tuple(_notify_group(tok) for tok in tokens)
    if sum(g.filter.startswith("SELECTED") for g in groups) > 1:
        raise ParseError("one event group for the selected mailbox")  # RFC 5465 §6
    if sum(len(g.mailboxes) for g in groups) > MAX_NOTIFY_MAILBOXES:
        raise ParseError("too many mailboxes", code="LIMIT")
    return c.Notify(tag, name, groups=groups, status=status)


def _notify_group(tok: t.Token) -> c.NotifyGroup:
    parts = t.Args(t.group(tok, "event group"))
    kind = t.atom(parts.take("mailbox filter"), "mailbox filter").upper()
    if kind not in NOTIFY_FILTERS:
        raise ParseError(f"unknown mailbox filter {kind}")
    mailboxes: tuple[str, ...] = ()
    if kind in ("SUBTREE", "MAILBOXES"):
        names = parts.take("mailboxes")
        tokens = t.group(names, "mailboxes") if isinstance(names, t.Group) else (names,)
        if not tokens:
            raise ParseError("empty mailbox list")
        mailboxes = tuple(t.mailbox(n) for n in tokens)
    selected = kind.startswith("SELECTED")
    what = parts.take("events")
    parts.done()
    if isinstance(what, t.Atom) and what.text.upper() == "NONE":
        return c.NotifyGroup(kind, mailboxes)
    items = t.group(what, "events")
    if not items:
        raise ParseError("empty event list")
    events: list[str] = []
    fetch: tuple[FetchItem, ...] = ()
    for item in items:
        if isinstance(item, t.Group):
            if not events or events[-1] != "MessageNew" or fetch or not selected:
                raise ParseError("fetch attributes follow MessageNew, for the selected mailbox only")
            if not item.items:
                raise ParseError("empty fetch attribute list")
            fetch = tuple(_fetch_item(att) for att in item.items)
            continue
        word = t.atom(item, "event")
        events.append(NOTIFY_EVENTS.get(word.upper(), word))
    chosen = set(events)
    if selected:
        # RFC 5465 §5: the selected mailbox takes message events only; MessageNew and
        # MessageExpunge go together, and FlagChange and AnnotationChange need them.
        if chosen - MESSAGE_EVENTS:
            raise ParseError("only message events apply to the selected mailbox")
        has_new, has_expunge = "MessageNew" in chosen, "MessageExpunge" in chosen
        if has_new != has_expunge or (chosen & {"FlagChange", "AnnotationChange"} and not has_new):
            raise ParseError("MessageNew and MessageExpunge go together, and with FlagChange")
    return c.NotifyGroup(kind, mailboxes, tuple(dict.fromkeys(events)), fetch)


# -- URLAUTH (RFC 4467 §9, RFC 5524 §5) ---------------------------------------------------------

MAX_URLS = 100  # URLs in one GENURLAUTH or URLFETCH
URLFETCH_PARAMS = ("BODYPARTSTRUCTURE", "BINARY", "BODY")


def _url(tok: t.Token | None) -> str:
    data = t.astring(tok, "URL")
    if len(data) > urls.MAX_URL:
        raise ParseError("URL too long", code="LIMIT")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("URL is not UTF-8") from None


def _genurlauth(tag: str, name: str, args: t.Args) -> c.GenUrlAuth:
    items = []
    while True:
        url = _url(args.take("URL"))
        items.append((url, t.atom(args.take("mechanism"), "mechanism")))
        if not args.more():
            break
        if len(items) >= MAX_URLS:
            raise ParseError("too many URLs", code="LIMIT")
    return c.GenUrlAuth(tag, name, items=tuple(items))


def _resetkey(tag: str, name: str, args: t.Args) -> c.ResetKey:
    if not args.more():
        return c.ResetKey(tag, name)
    mailbox = t.mailbox(args.take("mailbox name"))
    mechanisms = []
    while args.more():
        if len(mechanisms) >= MAX_URLS:
            raise ParseError("too many mechanisms", code="LIMIT")
        mechanisms.append(t.atom(args.take("mechanism"), "mechanism"))
    return c.ResetKey(tag, name, mailbox=mailbox, mechanisms=tuple(mechanisms))


def _urlfetch(tag: str, name: str, args: t.Args) -> c.UrlFetch:
    items = []
    while True:
        tok = args.take("URL")
        if isinstance(tok, t.Group):  # RFC 5524 §5: "(" url *(SP param) ")"
            inner = t.Args(tok.items)
            url = _url(inner.take("URL"))
            params: dict[str, bool] = {}
            while inner.more():
                param = t.atom(inner.take("URLFETCH parameter"), "URLFETCH parameter").upper()
                if param not in URLFETCH_PARAMS or param in params:
                    raise ParseError(f"unknown or repeated URLFETCH parameter {param}")
                params[param] = True
            items.append(c.UrlFetchItem(url, True, "BODYPARTSTRUCTURE" in params, "BINARY" in params,
                                        "BODY" in params))
        else:
            items.append(c.UrlFetchItem(_url(tok)))
        if not args.more():
            break
        if len(items) >= MAX_URLS:
            raise ParseError("too many URLs", code="LIMIT")
    return c.UrlFetch(tag, name, items=tuple(items))


_COMMANDS = {
    **{name: _no_args for name in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT",
                                   "IDLE", "NAMESPACE")},
    "LOGIN": _login,
    "AUTHENTICATE": _authenticate,
    "SELECT": _select,
    "EXAMINE": _select,
    "CREATE": _create,
    "DELETE": _mailbox_only(c.Delete),
    "SUBSCRIBE": _mailbox_only(c.Subscribe),
    "UNSUBSCRIBE": _mailbox_only(c.Unsubscribe),
    "GETQUOTAROOT": _mailbox_only(c.GetQuotaRoot),
    "RENAME": _rename,
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "FETCH": _fetch,
    "UID FETCH": _fetch,
    "STORE": _store,
    "UID STORE": _store,
    "COPY": _copy,
    "MOVE": _copy,
    "UID COPY": _copy,
    "UID MOVE": _copy,
    "EXPUNGE": _expunge,
    "UID EXPUNGE": _expunge,
    "SEARCH": _search,
    "UID SEARCH": _search,
    "SORT": _sort,
    "UID SORT": _sort,
    "THREAD": _thread,
    "UID THREAD": _thread,
    "CANCELUPDATE": _cancelupdate,
    "ENABLE": _enable,
    "ID": _id,
    "GETQUOTA": _getquota,
    "SETQUOTA": _setquota,
    "GETMETADATA": _getmetadata,
    "SETMETADATA": _setmetadata,
    "NOTIFY": _notify,
    "COMPRESS": _compress,
    "GENURLAUTH": _genurlauth,
    "RESETKEY": _resetkey,
    "URLFETCH": _urlfetch,
}
