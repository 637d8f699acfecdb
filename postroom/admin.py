"""The account commands of the admin CLI: domain, user and alias.

Each function takes the open Accounts and the parsed arguments, prints its result on stdout
and returns the exit status; refusals are raised as AccountError / AddressError and turned
into one line on stderr by postroom.cli. List output is one record per line with
tab-separated fields, so that `cut -f1` gives the addresses.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from conf.values import format_size, parse_size
from storage import Accounts, AccountError


class UsageError(AccountError):
    """Bad arguments that argparse could not see (exit status 2)."""


def domain_add(accounts: Accounts, args: argparse.Namespace) -> int:
    domain = accounts.add_domain(args.domain)
    print(f"added domain {_domain_label(domain.display, domain.name)}")
    return 0


def domain_list(accounts: Accounts, args: argparse.Namespace) -> int:
    for domain in accounts.domains():
        print(_domain_label(domain.display, domain.name))
    return 0


def domain_remove(accounts: Accounts, args: argparse.Namespace) -> int:
    users, aliases = accounts.remove_domain(args.domain, force=args.force)
    extra = f" with {users} user(s) and {aliases} alias(es)" if users or aliases else ""
    print(f"removed domain {args.domain}{extra}")
    return 0


def user_add(accounts: Accounts, args: argparse.Namespace) -> int:
    quota = _quota(args.quota)
    password = _read_password(args.password_stdin)
    user = accounts.add_user(args.address, password, quota=quota)
    print(f"added user {user.address.display} (quota {_quota_label(user.quota)})")
    return 0


def user_list(accounts: Accounts, args: argparse.Namespace) -> int:
    for user in accounts.users(args.domain):
        print(f"{user.address.display}\tquota={_quota_label(user.quota)}\tcreated={user.created}")
    return 0


def user_remove(accounts: Accounts, args: argparse.Namespace) -> int:
    still_named_by = accounts.remove_user(args.address)
    print(f"removed user {args.address}")
    for alias in still_named_by:
        print(f"postroom: warning: alias {alias.display} still forwards to {args.address}", file=sys.stderr)
    return 0


def user_passwd(accounts: Accounts, args: argparse.Namespace) -> int:
    if accounts.get_user(args.address) is None:
        raise AccountError(f"no such user: {args.address}")
    accounts.set_password(args.address, _read_password(args.password_stdin))
    print(f"password changed for {args.address}")
    return 0


def user_quota(accounts: Accounts, args: argparse.Namespace) -> int:
    quota = _quota(args.size)
    accounts.set_quota(args.address, quota)
    print(f"quota of {args.address} set to {_quota_label(quota)}")
    return 0


def alias_add(accounts: Accounts, args: argparse.Namespace) -> int:
    alias = accounts.add_alias(args.alias, _split_targets(args.targets))
    print(f"alias {alias.display} -> {', '.join(alias.targets)}")
    return 0


def alias_list(accounts: Accounts, args: argparse.Namespace) -> int:
    for alias in accounts.aliases(args.domain):
        print(f"{alias.display}\t{','.join(alias.targets)}")
    return 0


def alias_remove(accounts: Accounts, args: argparse.Namespace) -> int:
    left = accounts.remove_alias(args.alias, _split_targets(args.targets) if args.targets else None)
    if left is None:
        print(f"removed alias {args.alias}")
    else:
        print(f"alias {left.display} -> {', '.join(left.targets)}")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise AccountError("no password on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsageError("no password given: use --password-stdin, or run in a terminal to be asked")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("Repeat password: "):
        raise AccountError("the two passwords differ")
    return first


def _quota(text: str | None) -> int:
    if text is None:
        return 0
    try:
        return int(parse_size(text))
    except ValueError as e:
        raise UsageError(f"--quota: {e}") from None


def _quota_label(quota: int) -> str:
    return "unlimited" if quota == 0 else str(format_size(quota))


def _domain_label(display: str, ascii_name: str) -> str:
    return display if display == ascii_name else f"{display} ({ascii_name})"


def _split_targets(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise UsageError("no target given")
    return targets
