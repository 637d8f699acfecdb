"""The account commands of the admin CLI: domain, user and alias.

Each function takes the open Accounts, the parsed arguments and the audit log, prints its
result on stdout and returns the exit status; refusals are raised as AccountError /
AddressError and turned into one line on stderr by postroom.cli. List output is one record
per line with tab-separated fields, so that `cut -f1` gives the addresses. Every change is
appended to `<data_dir>/audit.log`, one logfmt line each, never with a password.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from conf.logfmt import format_pairs, timestamp
from conf.values import format_size, parse_size
from storage import AccountError, Accounts


class AuditLog:
    """Who changed which account when: `<data_dir>/audit.log`, appended, mode 0600."""

    def __init__(self, path: Path):
        self._path = path

    def __call__(self, event: str, **fields: object) -> None:
        pairs = [("ts", timestamp(time.time())), ("event", event), *fields.items(), ("uid", os.getuid())]
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (format_pairs(pairs) + "\n").encode())
        finally:
            os.close(fd)


class UsageError(AccountError):
    """Bad arguments that argparse could not see (exit status 2)."""


def domain_add(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    domain = accounts.add_domain(args.domain)
    audit("domain.added", domain=domain.name)
    print(f"added domain {_domain_label(domain.display, domain.name)}")
    return 0


def domain_list(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    for domain in accounts.domains():
        print(_domain_label(domain.display, domain.name))
    return 0


def domain_remove(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    users, aliases = accounts.remove_domain(args.domain, force=args.force)
    audit("domain.removed", domain=args.domain, users=users, aliases=aliases)
    extra = f" with {users} user(s) and {aliases} alias(es)" if users or aliases else ""
    print(f"removed domain {args.domain}{extra}")
    return 0


def user_add(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    quota = _quota(args.quota)
    messages = args.messages or 0
    password = _read_password(args.password_stdin)
    user = accounts.add_user(args.address, password, quota=quota, message_quota=messages)
    audit("user.added", user=user.address, quota=quota, message_quota=messages)
    limit = f", at most {user.message_quota} messages" if user.message_quota else ""
    print(f"added user {user.address.display} (quota {_quota_label(user.quota)}{limit})")
    return 0


def user_list(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    for user in accounts.users(args.domain):
        print(f"{user.address.display}\tquota={_quota_label(user.quota)}\tcreated={user.created}"
              f"\tmessages={_messages_label(user.message_quota)}")
    return 0


def user_remove(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    still_named_by = accounts.remove_user(args.address)
    audit("user.removed", user=args.address)
    print(f"removed user {args.address}")
    for alias in still_named_by:
        print(f"postroom: warning: alias {alias.display} still forwards to {args.address}", file=sys.stderr)
    return 0


def user_passwd(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    if accounts.get_user(args.address) is None:
        raise AccountError(f"no such user: {args.address}")
    accounts.set_password(args.address, _read_password(args.password_stdin))
    audit("user.password_changed", user=args.address)
    print(f"password changed for {args.address}")
    return 0


def user_quota(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    if args.size is None and args.messages is None:
        raise UsageError("give a SIZE, --messages N, or both")
    quota = _quota(args.size) if args.size is not None else None
    accounts.set_quota(args.address, quota, args.messages)
    audit("user.quota_set", user=args.address, quota=quota, message_quota=args.messages)
    if quota is not None:
        print(f"quota of {args.address} set to {_quota_label(quota)}")
    if args.messages is not None:
        print(f"message quota of {args.address} set to {_messages_label(args.messages)}")
    return 0


def alias_add(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    alias = accounts.add_alias(args.alias, _split_targets(args.targets))
    audit("alias.added", alias=alias.display, targets=alias.targets)
    print(f"alias {alias.display} -> {', '.join(alias.targets)}")
    return 0


def alias_list(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    for alias in accounts.aliases(args.domain):
        print(f"{alias.display}\t{','.join(alias.targets)}")
    return 0


def alias_remove(accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    left = accounts.remove_alias(args.alias, _split_targets(args.targets) if args.targets else None)
    audit("alias.removed", alias=args.alias, targets=args.targets or "all")
    if left is None:
        print(f"removed alias {args.alias}")
    else:
        print(f"alias {left.display} -> {', '.join(left.targets)}")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.buffer.readline(4096)
        if not line:
            raise AccountError("no password on standard input")
        try:
            return line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise AccountError("the password on standard input is not UTF-8") from None
    if not sys.stdin.isatty():
        raise UsageError("no password given: use --password-stdin, or run in a terminal to be asked")
    try:
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Repeat password: ")
    except EOFError:
        raise AccountError("no password entered") from None
    if first != second:
        raise AccountError("the two passwords differ")
    return first


def _quota(text: str | None) -> int:
    if text is None:
        return 0
    try:
        return int(parse_size(text))
    except ValueError as e:
        raise UsageError(f"--quota: {e}") from None


def _messages_label(count: int) -> str:
    return str(count) if count else "unlimited"


def _quota_label(quota: int) -> str:
    return "unlimited" if quota == 0 else str(format_size(quota))


def _domain_label(display: str, ascii_name: str) -> str:
    return display if display == ascii_name else f"{display} ({ascii_name})"


def _split_targets(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise UsageError("no target given")
    return targets
