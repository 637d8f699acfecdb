"""The `store` commands of the admin CLI: check (and repair) and rebuild the message store.

`store check` prints one line per difference between files and index and exits 1 if there
is any (so cron can mail it); `--repair` makes them agree and exits 0. `store rebuild`
recreates an account's index from its Maildir files alone.
"""

from __future__ import annotations

import argparse

from storage import Accounts, Store, parse_address
from storage.check import accounts_on_disk, check, rebuild


def store_check(store: Store, accounts: Accounts, args: argparse.Namespace, audit) -> int:
    account = str(parse_address(args.account)) if args.account else None
    problems = check(store, account, repair=args.repair)
    for problem in problems:
        print(problem)
    if args.repair:
        audit("store.repaired", account=account or "all", problems=len(problems))
        print(f"{len(problems)} problem(s) found and repaired")
        return 0
    print(f"{len(problems)} problem(s)" + (": run 'postroom store check --repair'" if problems else ""))
    return 1 if problems else 0


def store_rebuild(store: Store, accounts: Accounts, args: argparse.Namespace, audit) -> int:
    targets = [str(parse_address(args.account))] if args.account else accounts_on_disk(store)
    for account in targets:
        summary = rebuild(store, account)
        audit("store.rebuilt", account=account, **summary)
        renumbered = summary["renumbered"]
        print(f"{account}: {summary['mailboxes']} mailbox(es), {summary['messages']} message(s) indexed"
              + (f", {renumbered} mailbox(es) renumbered (new UIDVALIDITY)" if renumbered else ""))
    return 0
