"""APPEND in all its forms (RFC 3501 §6.3.11): one message or several (RFC 3502 MULTIAPPEND),
each a literal, a literal8 (RFC 3516 §4.4), `UTF8 (~{n})` (RFC 6855 §4) or CATENATE's TEXT
and URL parts (RFC 4469), with APPENDUID (RFC 4315) and APPENDLIMIT (RFC 7889).

Every literal is streamed into the store as it arrives (imapd/append.py, imapd/catenate.py):
`AppendSinks.sink` is what the framer asks as each literal of an APPEND begins. It parses the
command's head so far (imapd.parser, `partial=True`: a CATENATE list may still be open) with
a stand-in for the literal, and answers with the sink for the message it belongs to.

All or nothing (RFC 3502 §6.3.11, RFC 4469 §5): every message is checked first (its
mailbox, its size, its URLs resolved), then the deliveries are committed in order; if one
fails after others were committed (a full disk, a quota reached meanwhile), those are
removed again before the NO. A session watching the mailbox may then see them come and go,
as it would see another client's APPEND and EXPUNGE: none is left.
"""

from __future__ import annotations

from imapd.answers import Answer, bad, no, try_create
from imapd.append import AppendLiteral, DroppedLiteral, LiteralStandIn
from imapd.catenate import BadUrlError, CatenateMessage, TextPart
from imapd.parser import MAX_APPEND_MESSAGES, Frame, parse_command
from imapd.syntax import Append, AppendMessage, CatenateUrl, ParseError

Builder = AppendLiteral | CatenateMessage


class AppendSinks:
    """The messages of the APPEND being read, streaming into the store: a session has one.
    They belong to it until the command runs (`take`) or is dropped (`close`)."""

    def __init__(self, store, account_of, limit_of):
        self._store = store
        self._account_of = account_of  # () -> the session's user
        self._limit_of = limit_of  # () -> APPENDLIMIT
        self._open: list[Builder] = []
        self._mailbox = ""
        # Where the next head parse starts, so that each parses only what came since the
        # last literal (a parse from the command's start each time made 100 messages with
        # long flag lists cost 4.5 s of CPU): (index of the line after that literal, the
        # CATENATE message it left open or None).
        self._resume: tuple[int, CatenateMessage | None] | None = None
        self._dropping = False  # the command being read is refused already (its head, a LIMIT)

    def sink(self, parts: list, size: int) -> AppendLiteral | TextPart | DroppedLiteral | None:
        if not any(not isinstance(p, bytes) for p in parts):
            self.close()  # the first literal streamed of a new command: leftovers go
            self._resume, self._dropping = None, False
        if self._dropping:
            return DroppedLiteral()  # the command is refused already: its literals are read, not parsed
        stand_in = LiteralStandIn(size)
        open_message = None
        if self._resume is None:
            frame = [*parts, stand_in, b""]
        else:
            index, open_message = self._resume
            # The command as if it began at that line: a stand-in mailbox, and, inside a
            # CATENATE list, an empty TEXT part standing for the parts already taken.
            head = [b"x APPEND X CATENATE (TEXT {0}", b"", parts[index]] if open_message else \
                [b"x APPEND X" + parts[index]]
            frame = [*head, *parts[index + 1:], stand_in, b""]
        try:
            command = parse_command(Frame(frame), partial=True)
        except ParseError:
            self.close()
            self._dropping = True
            return DroppedLiteral()  # the command will be refused for its head: read and drop
        if not isinstance(command, Append) or not command.messages:
            return None
        if self._resume is None:
            self._mailbox = command.mailbox
        message = command.messages[-1]
        follows = len(parts) + 1  # the line after this literal
        continues = open_message is not None and len(command.messages) == 1 and message.catenate is not None
        if not continues and len(self._open) >= MAX_APPEND_MESSAGES:
            self.close()
            self._dropping = True
            return DroppedLiteral()  # the command's parse refuses it (LIMIT): nothing more is opened
        if message.message is stand_in:
            literal = AppendLiteral(self._store, self._account_of(), self._mailbox, binary=message.binary,
                                    **self._options(message))
            self._open.append(literal)
            self._resume = (follows, None)
            return literal
        if message.catenate and message.catenate[-1] is stand_in:
            new = message.catenate[:-1]
            if continues:
                building, new = open_message, new[1:]  # the same message: its stand-in TEXT off
            else:
                building = CatenateMessage(self._store, self._account_of(), self._mailbox, **self._options(message))
                self._open.append(building)
            self._resume = (follows, building)
            return building.text(new, size)
        return None  # not a message's literal: held, and the command answered for it

    def _options(self, message: AppendMessage) -> dict:
        return {"flags": message.flags, "limit": self._limit_of(),
                "internal_date": message.date.timestamp() if message.date else None}

    def take(self, command: Append) -> list[Builder]:
        """The command runs: a builder for each of its messages, which it owns from now on
        (made here for what was not streamed: URL-only CATENATE, a literal held)."""
        builders: list[Builder] = []
        try:
            for message in command.messages:
                builders.append(self._builder(command.mailbox, message))
        except BaseException:
            for builder in builders:
                builder.close()
            raise
        finally:
            self.close()
        return builders

    def _builder(self, mailbox: str, message: AppendMessage) -> Builder:
        if isinstance(message.message, AppendLiteral):
            self._open.remove(message.message)
            return message.message
        if message.catenate is not None:
            if any(not isinstance(p, (bytes, CatenateUrl, TextPart)) for p in message.catenate):
                raise bad("APPEND could not be read")  # a literal dropped on the way (a LIMIT)
            building = next((p.message for p in message.catenate if isinstance(p, TextPart)), None)
            if building is None:
                building = CatenateMessage(self._store, self._account_of(), mailbox, **self._options(message))
            else:
                self._open.remove(building)
            building.parts(message.catenate)
            return building
        if not isinstance(message.message, bytes):
            raise bad("APPEND could not be read")
        literal = AppendLiteral(self._store, self._account_of(), mailbox, binary=message.binary,
                                **self._options(message))
        literal.write(message.message)
        return literal

    def close(self) -> None:
        for builder in self._open:
            builder.close()
        self._open = []


async def append(session, command: Append):
    builders = session.appending.take(command)
    try:
        if not session.utf8 and any(m.utf8 for m in command.messages):
            raise bad("APPEND's UTF8 data item needs ENABLE UTF8=ACCEPT first")  # RFC 6855 §4
        try:  # the target first: TRYCREATE says more than a bad URL or size (RFC 4469 §5)
            await session.run_store(session.context.store.mailbox, session.user, command.mailbox)
        except Answer as answer:
            raise try_create(answer) from None
        for builder in builders:
            await _check(session, builder)
        delivered = []
        try:
            for builder in builders:
                literal = _literal(builder)
                delivered.append(await session.run_store(literal.commit))
                session.log.info("append", mailbox=delivered[-1].mailbox, uid=delivered[-1].uid, size=literal.size)
        except Answer as answer:
            if delivered:  # all or nothing: those committed go again
                await session.run_store(session.context.store.remove, session.user, delivered[0].mailbox,
                                        [d.uid for d in delivered])
                session.log.warning("append_withdrawn", mailbox=delivered[0].mailbox, count=len(delivered))
            raise try_create(answer) from None
    finally:
        for builder in builders:
            builder.close()
    uids = ",".join(str(d.uid) for d in delivered)
    return f"APPENDUID {delivered[0].uidvalidity} {uids}", "APPEND completed"


async def _check(session, builder: Builder) -> None:
    """A message's failures that need no commit: its mailbox, its size, its URLs."""
    literal = _literal(builder)
    if literal.error is not None:
        try:
            await session.run_store(literal.commit)  # raises the error, as an answer
        except Answer as answer:
            raise try_create(answer) from None
    if isinstance(builder, CatenateMessage):
        try:
            await session.run_store(builder.resolve, session.context.store, session.user, session.context.accounts)
        except BadUrlError as e:
            raise no("CATENATE URL names nothing here", f"BADURL {e.url[:200]}") from None
    literal.finish()
    if literal.too_big:
        raise no("message is larger than APPENDLIMIT", "TOOBIG")
    if not literal.size:
        raise bad("empty message")


def _literal(builder: Builder) -> AppendLiteral:
    return builder.literal if isinstance(builder, CatenateMessage) else builder
