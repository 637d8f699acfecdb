"""How an IMAP command ends: the tagged OK/NO/BAD line, the untagged lines before it, and
the one table that turns store errors into response codes (RFC 3501 §7.1, RFC 5530).

A handler ends a command with a tagged NO or BAD by raising `Answer` (built with `no()` or
`bad()`); a store error becomes an `Answer` in one place, `store_answer`, so every command
answers the same failure with the same code. Anything else a handler raises is a bug on
our side: the session logs it and answers `NO [SERVERBUG]`, never echoing its text.

Lines are built here as bytes and written by the session; nothing here writes.
"""

from __future__ import annotations

from storage import (
    DiskFullError,
    FlagError,
    MailboxError,
    MailboxExistsError,
    MailboxLimitError,
    MailboxNameError,
    MailboxNotFoundError,
    MetadataLimitError,
    NoOwnerError,
    NotOwnerError,
    QuotaExceededError,
)


class Answer(Exception):
    """Ends a command with a tagged NO or BAD: `status`, optional response `code`, text."""

    def __init__(self, status: str, text: str, code: str | None = None):
        super().__init__(text)
        self.status, self.text, self.code = status, text, code


class AnsweredItself(Exception):
    """The command has written its own tagged response (STARTTLS answers OK before the
    handshake): the session writes nothing more for it."""


def no(text: str, code: str | None = None) -> Answer:
    return Answer("NO", text, code)


def bad(text: str, code: str | None = None) -> Answer:
    return Answer("BAD", text, code)


# The store's errors as IMAP answers, most specific first; str() of each is safe to show.
# Any other StoreError is a fault on our side: logged, and answered NO [UNAVAILABLE].
STORE_ANSWERS: dict[type[Exception], tuple[str, str | None]] = {
    MailboxNotFoundError: ("NO", "NONEXISTENT"),
    MailboxExistsError: ("NO", "ALREADYEXISTS"),
    MailboxLimitError: ("NO", "LIMIT"),
    QuotaExceededError: ("NO", "OVERQUOTA"),
    DiskFullError: ("NO", "OVERQUOTA"),  # as Dovecot answers "Not enough disk space"
    MetadataLimitError: ("NO", None),  # its own code: METADATA MAXSIZE n or TOOMANY (RFC 5464 §4.3)
    FlagError: ("BAD", None),
    MailboxNameError: ("NO", "CANNOT"),
    MailboxError: ("NO", "CANNOT"),
    # A cluster's: the shard is not this node's now (released, or between owners); the
    # session ends as it is let go (cluster/follow.py), and a new one finds the owner.
    NotOwnerError: ("NO", "UNAVAILABLE"),
    NoOwnerError: ("NO", "UNAVAILABLE"),
}
STORE_ERRORS = tuple(STORE_ANSWERS)


def store_answer(error: Exception) -> Answer:
    """The answer to a store error of one of the STORE_ERRORS kinds."""
    status, code = next(answer for kind, answer in STORE_ANSWERS.items() if isinstance(error, kind))
    return Answer(status, str(error), getattr(error, "code", None) or code)


def unavailable() -> Answer:
    """The answer to any other store failure (the cause is logged, not shown)."""
    return no("temporary failure, try again", "UNAVAILABLE")


def try_create(answer: Answer) -> Answer:
    """APPEND, COPY and MOVE to a mailbox that does not exist answer NO [TRYCREATE]
    (RFC 3501 §6.3.11, §6.4.7), so the client can create it and try again."""
    if answer.code == "NONEXISTENT":
        answer.code = "TRYCREATE"
    return answer


def untagged_line(line: bytes | str) -> bytes:
    return b"* " + (line.encode() if isinstance(line, str) else line) + b"\r\n"


def tagged_line(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    coded = f"[{code}] " if code else ""
    return f"{tag} {status} {coded}{text}\r\n".encode()


def set_text(numbers: list[int]) -> str:
    """Numbers as an IMAP sequence set, ascending: `1:3,7` (COPYUID, MODIFIED)."""
    return ",".join(f"{a}:{b}" if a != b else str(a) for a, b in as_ranges(sorted(numbers)))


def as_ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """Ascending numbers as (low, high) runs of consecutive ones, as the store takes UIDs."""
    out: list[tuple[int, int]] = []
    for number in numbers:
        if out and number == out[-1][1] + 1:
            out[-1] = (out[-1][0], number)
        else:
            out.append((number, number))
    return out
