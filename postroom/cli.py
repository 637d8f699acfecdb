"""The `postroom` command: serve, config check, and the account administration commands.

Exit status (a stable interface, DESIGN.md "Admin CLI"): 0 on success; 1 on a user error
(bad config, unknown domain, duplicate user, bad address), with one line on stderr and no
traceback; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lmdb

import conf
from conf.tls import TLSSetupError, server_context
from postroom import __version__, admin
from postroom.datadir import DataDirInUseError, become_data_dir_owner, open_accounts, open_queues, open_store
from postroom.services import DAEMONS, ServeError
from storage import AccountError, Accounts, AddressError, DataDirError, StoreError, open_data_dir

PROG = "postroom"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Postroom mail server: run it and administer it.")
    parser.add_argument("--config", type=Path, default=conf.DEFAULT_PATH, metavar="FILE",
                        help=f"config file (default {conf.DEFAULT_PATH})")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="run every enabled daemon, each in a process of its own")
    # How serve starts its children, and mtad its extra MX workers (postroom/supervisor.py).
    p.add_argument("--daemon", choices=DAEMONS, help=argparse.SUPPRESS)
    p.add_argument("--smtp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--smtp-writer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cluster-agent", action="store_true", help=argparse.SUPPRESS)  # postroom/cluster_agent.py

    config = _group(commands, "config", "check the config file")
    config.add_parser("check", help="validate the config and print the effective config")
    # The reference of every key (docs/config.md), from the schema and the example's comments
    # (postroom/configref.py); it reads no config file.
    p = config.add_parser("reference", help="print every config key, its type, default and meaning (Markdown)")
    p.add_argument("--example", metavar="FILE", help="the commented example to read (default: the one installed)")
    p.set_defaults(run=_configref, no_config=True)

    domain = _group(commands, "domain", "manage local domains")
    p = domain.add_parser("add", help="add a local domain")
    p.add_argument("domain")
    p.set_defaults(run=admin.domain_add)
    domain.add_parser("list", help="list local domains").set_defaults(run=admin.domain_list)
    p = domain.add_parser("remove", help="remove a domain")
    p.add_argument("domain")
    p.add_argument("--force", action="store_true", help="also remove its users and aliases")
    p.set_defaults(run=admin.domain_remove)

    user = _group(commands, "user", "manage users (mailboxes)")
    p = user.add_parser("add", help="add a user")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--quota", metavar="SIZE", help='storage quota, e.g. "2G" (default: unlimited)')
    p.add_argument("--messages", metavar="N", type=_count, help="message quota (default: unlimited)")
    p.set_defaults(run=admin.user_add)
    p = user.add_parser("list", help="list users, of one domain or all")
    p.add_argument("domain", nargs="?")
    p.set_defaults(run=admin.user_list)
    p = user.add_parser("remove", help="remove a user")
    p.add_argument("address")
    p.set_defaults(run=admin.user_remove)
    p = user.add_parser("passwd", help="set a user's password")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(run=admin.user_passwd)
    p = user.add_parser("quota", help='set a user\'s quota ("0" for unlimited)')
    p.add_argument("address")
    p.add_argument("size", nargs="?", help='storage quota, e.g. "5G"; omitted: unchanged')
    p.add_argument("--messages", metavar="N", type=_count, help="message quota; 0 for unlimited")
    p.set_defaults(run=admin.user_quota)

    alias = _group(commands, "alias", "manage aliases and catch-alls")
    p = alias.add_parser("add", help="add an alias, or targets to one; ALIAS @domain is the catch-all")
    p.add_argument("alias")
    p.add_argument("targets", metavar="TARGET[,TARGET...]")
    p.set_defaults(run=admin.alias_add)
    p = alias.add_parser("list", help="list aliases, of one domain or all")
    p.add_argument("domain", nargs="?")
    p.set_defaults(run=admin.alias_list)
    p = alias.add_parser("remove", help="remove an alias, or only the targets named")
    p.add_argument("alias")
    p.add_argument("targets", nargs="?", metavar="TARGET[,TARGET...]")
    p.set_defaults(run=admin.alias_remove)

    store = _group(commands, "store", "check or rebuild the message store")
    p = store.add_parser("check", help="compare message files with the index")
    p.add_argument("account", nargs="?", help="one account (default: all)")
    p.add_argument("--repair", action="store_true", help="make files and index agree")
    p.set_defaults(run=_storeadmin("store_check"), needs_store=True)
    p = store.add_parser("rebuild", help="recreate the index from the message files alone")
    p.add_argument("account", nargs="?", help="one account (default: all)")
    p.set_defaults(run=_storeadmin("store_rebuild"), needs_store=True)
    # Mail moved in from another server (postroom/importer.py).
    p = store.add_parser("import", help="import a Maildir, an mbox file or an IMAP account into ACCOUNT; "
                                        "run again, it imports only what is new")
    p.add_argument("account")
    p.add_argument("source", help="a Maildir directory (Dovecot's UIDs kept), an mbox file, or "
                                  "imap://USER@HOST[:PORT] or imaps://... (password on standard input)")
    p.add_argument("--into", metavar="MAILBOX", help="the mailbox an mbox file goes into (default INBOX)")
    p.add_argument("--cafile", metavar="FILE", help="trust the IMAP server's certificate if this CA file "
                                                    "(or the certificate itself) signed it")
    p.set_defaults(run=_importer, needs_store=True)

    # The outbound queue, on a live server too (postroom/queueadmin.py).
    queue = _group(commands, "queue", "inspect and steer the outbound queue")
    p = queue.add_parser("list", help="list queued messages, oldest first")
    p.add_argument("--json", action="store_true", help="print JSON, for scripts")
    p.set_defaults(run=_lazy("queueadmin", "queue_list"), needs_queue=True)
    p = queue.add_parser("show", help="show one message's envelope and each recipient's state")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON, for scripts")
    p.set_defaults(run=_lazy("queueadmin", "queue_show"), needs_queue=True)
    p = queue.add_parser("flush", help="try one message (or every message not held) now")
    p.add_argument("id", metavar="ID", nargs="?")
    p.set_defaults(run=_lazy("queueadmin", "queue_flush"), needs_queue=True)
    for action, help in (("remove", "delete a message, without a report to its sender"),
                         ("hold", "keep a message from delivery until released"),
                         ("release", "let a held message go, now")):
        p = queue.add_parser(action, help=help)
        p.add_argument("id", metavar="ID")
        p.set_defaults(run=_lazy("queueadmin", f"queue_{action}"), needs_queue=True)
    # DKIM keys and the DNS records to publish (postroom/dkimadmin.py).
    dkim = _group(commands, "dkim", "manage DKIM signing keys")
    p = dkim.add_parser("keygen", help="make a signing key for a domain and print its TXT record")
    p.add_argument("domain")
    p.add_argument("--selector", help="the key's DNS name under _domainkey (default: rsaYYYYMM or edYYYYMM)")
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (2048-bit, rsa-sha256; the default) or ed25519 (RFC 8463)")
    p.add_argument("--force", action="store_true", help="replace the key of that selector")
    p.set_defaults(run=_dkimadmin("dkim_keygen"), needs_config=True)
    p = commands.add_parser("dns-records", help="print the MX, SPF, DKIM, DMARC and SRV records of a domain")
    p.add_argument("domain")
    p.set_defaults(run=_dkimadmin("dns_records"), needs_config=True)

    # Backups and the state at a glance (postroom/backup.py, postroom/status.py).
    p = commands.add_parser("backup", help="copy the live data dir, config and certificates into a new DIR")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.set_defaults(run=_lazy("backup", "backup"), needs_config=True)
    p = commands.add_parser("status", help="what runs, the queue, the store, certificates and DNS records")
    p.add_argument("--no-dns", action="store_true", help="skip the DNS checks (no network)")
    p.set_defaults(run=_lazy("status", "status"), needs_config=True)
    # The cluster (postroom/clusteradmin.py): status, drain, undrain, and the node agent.
    from postroom.clusteradmin import add_commands as add_cluster_commands

    add_cluster_commands(commands)
    # Reload of what runs: config and certificates (postroom/reload.py).
    p = commands.add_parser("reload", help="make the running daemons read the config and certificates again")
    p.add_argument("--if-running", action="store_true",
                   help="nothing running is not an error (a certificate hook run before the first start)")
    p.set_defaults(run=_lazy("reload", "run_reload"), needs_config=True)
    return parser


def _lazy(module: str, name: str):
    """A command of postroom/<module>.py, imported when it runs (as _storeadmin)."""
    def run(*args):
        import importlib

        return getattr(importlib.import_module(f"postroom.{module}"), name)(*args)

    return run


def _dkimadmin(name: str):
    """A DKIM command, imported when it runs (dkimpy and cryptography are not every
    command's business); a key it cannot make or read is a user error (exit 1)."""
    def run(*args):
        from policy.dkim import DKIMKeyError
        from postroom import dkimadmin

        try:
            return getattr(dkimadmin, name)(*args)
        except DKIMKeyError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1

    return run


def _configref(args: argparse.Namespace) -> int:
    from postroom import configref

    return configref.config_reference(args)


def _storeadmin(name: str):
    """A `store` command, imported when it runs: storage.check is a tenth of a second of
    imports that every daemon process would otherwise pay at start."""
    def run(*args):
        from postroom import storeadmin

        return getattr(storeadmin, name)(*args)

    return run


def _importer(*args):
    """`store import`, imported when it runs (the IMAP client, the source readers)."""
    from postroom import importer

    return importer.store_import(*args)


def _count(text: str) -> int:
    """A whole number >= 0, for argparse (its error names the option)."""
    if not text.isdigit() or len(text) > 12:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def _group(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    parser = commands.add_parser(name, help=help)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def _in_cluster(config: conf.Config, accounts: Accounts) -> Accounts:
    """With [cluster] etcd the account commands write to etcd, with the single-node checks,
    and read this node's mirrored copy (cluster/accounts_writer.py); otherwise they write
    the local database, as ever."""
    if not config.cluster.enabled:
        return accounts
    from cluster.accounts_writer import ClusterAccounts  # etcd's client only on a cluster's node

    return ClusterAccounts(accounts, list(config.cluster.etcd), config.cluster.prefix)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.cluster_agent:
        from postroom import cluster_agent as process

        return process.main(PROG, args.config)
    if args.command == "serve" and args.smtp_writer:
        from postroom import writer_process

        return writer_process.main(PROG, args.config)
    if args.command == "serve" and (args.daemon or args.smtp_worker):
        from postroom import daemon_process

        return daemon_process.main(PROG, args.config, args.daemon or "mtad", worker=args.smtp_worker)
    if getattr(args, "no_config", False):
        return args.run(args)
    try:
        config = conf.load(args.config)
        if args.command == "config":
            return config_check(config)
        become_data_dir_owner(config.server.data_dir)
        if args.command == "serve":
            from postroom.serve import serve  # the admin commands never load the supervisor

            return serve(config)
        if getattr(args, "own_config", False):
            return args.run(config, args)
        if getattr(args, "needs_queue", False):
            return _with_queues(config, args)
        data_dir, accounts = open_accounts(config)
        accounts = _in_cluster(config, accounts)
        audit = admin.AuditLog(data_dir.audit_log_path)
        with accounts:
            if getattr(args, "needs_config", False):
                return args.run(config, data_dir, accounts, args, audit)
            if getattr(args, "needs_store", False):
                with open_store(data_dir, accounts, config) as store:  # fenced in a cluster
                    return args.run(store, accounts, args, audit)
            return args.run(accounts, args, audit)
    except admin.UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (conf.ConfigError, TLSSetupError, DataDirError, DataDirInUseError, AccountError, AddressError,
            ServeError, StoreError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except lmdb.Error as e:
        print(f"{PROG}: {config.server.data_dir}: database error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`postroom user list | head`): not an error worth a word.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _with_queues(config: conf.Config, args: argparse.Namespace) -> int:
    """A `queue` command over the data dir's queue; in a cluster, over every shard's queue
    on disk, its changes fenced as the store's are (only the shards this node holds)."""
    if not config.cluster.enabled:
        data_dir = open_data_dir(config.server.data_dir, config.storage.shards)
        with open_queues(config, data_dir) as queues:
            return args.run(queues, args, admin.AuditLog(data_dir.audit_log_path))
    data_dir, accounts = open_accounts(config)
    with accounts, open_store(data_dir, accounts, config) as store, \
            open_queues(config, data_dir, store, on_disk=True) as queues:
        queues.refresh()
        return args.run(queues, args, admin.AuditLog(data_dir.audit_log_path))


def mtad_main(argv: list[str] | None = None) -> int:
    """`mtad --config FILE`: the SMTP daemons (MX, submission) of `postroom serve`, with
    their [smtp] workers (this process and workers - 1 it starts)."""
    return _daemon_main("mtad", "Postroom's SMTP agents.", argv)


def imapd_main(argv: list[str] | None = None) -> int:
    """`imapd --config FILE`: only the IMAP listeners of `postroom serve`."""
    return _daemon_main("imapd", "Postroom's IMAP server.", argv)


def pop3d_main(argv: list[str] | None = None) -> int:
    """`pop3d --config FILE`: only the POP3 listeners of `postroom serve`."""
    return _daemon_main("pop3d", "Postroom's POP3 server.", argv)


def _daemon_main(prog: str, description: str, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=conf.DEFAULT_PATH, metavar="FILE")
    args = parser.parse_args(argv)
    # Imported here: the admin commands never load a daemon.
    from postroom import daemon_process

    return daemon_process.main(prog, args.config, prog)


def config_check(config: conf.Config) -> int:
    tls = config.tls
    generated_later = tls.self_signed and tls.cert is not None and not tls.cert.exists()
    if not generated_later:
        server_context(tls)
    sys.stdout.write(conf.dump(config))
    note = " (self-signed certificate will be generated on first start)" if generated_later else ""
    print(f"{PROG}: {config.source}: config OK{note}", file=sys.stderr)
    return 0
