"""How a daemon process (postroom/daemon_process.py) starts each service: builds it from
the config and the shared collaborators, binds its listeners, and returns something it can
stop."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from conf.reactor import TwistedListening, listen, server_tls
from policy.connections import ConnectionLimit
from policy.shares import FairShare
from policy.logins import LoginThrottle
from postroom import __version__
from storage import Watcher

DELIVERY_THREADS = 32  # messages too big to parse in the event loop, and retries after a failed delivery


class Listening:
    """mtad's listeners, stopped gracefully: see InboundContext.stop_sessions."""

    def __init__(self, servers: list[asyncio.Server], executor: ThreadPoolExecutor, inbound, grace: float):
        self.servers = servers
        self.executor = executor
        self.inbound = inbound
        self.grace = grace

    async def stop(self) -> None:
        # Not Server.wait_closed(): since Python 3.12 it waits for every connection to end,
        # which is the sessions' business (stop_sessions), bounded by the grace period.
        for server in self.servers:
            server.close()
        await self.inbound.stop_sessions(self.grace)
        # Big deliveries run in these threads: stop_sessions has waited for their sessions.
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)


async def start_smtp(context) -> Listening:
    # Imported here: imapd and pop3d never load aiosmtpd.
    from mtad.inbound import InboundContext, start_listeners

    # aiosmtpd logs every connection in its own words: ours are the log.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="deliver")

    def deliver_in_thread(fn, *args):
        return loop.run_in_executor(executor, fn, *args)

    inbound = InboundContext(context.config, context.accounts, context.store, context.tls, deliver_in_thread)
    return Listening(await start_listeners(inbound, context.config.smtp.listen), executor, inbound,
                     float(context.config.server.stop_grace))


STORE_THREADS = 16  # IMAP and POP3 store calls: reads, flag writes, APPEND
STORE_THREADS_PER_ACCOUNT = 4  # of those, what one account's sessions may hold at once
# Password checks have threads of their own: argon2id takes 64 MiB and ~100 ms each, so
# this bounds their memory, and a flood of logins (or of slow searches) never waits on the
# other.
LOGIN_THREADS = 4


def store_runner(context):
    """run(fn, *args) -> awaitable, in the threads the Twisted daemons share for the store."""
    return _threads(context, "store", STORE_THREADS)


def login_runner(context):
    """run(fn, *args) -> awaitable, in the threads that check passwords."""
    return _threads(context, "login", LOGIN_THREADS)


def _threads(context, name: str, count: int):
    """The process's pool `name` (made on first use, closed by close_shared) as a runner."""
    runner = context.shared.get(f"{name}_runner")
    if runner is None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)

        def runner(fn, *args):
            return loop.run_in_executor(executor, fn, *args)

        context.shared[f"{name}_runner"] = runner
        context.shared[f"{name}_executor"] = executor
    return runner


def watcher(context) -> Watcher:
    return context.shared.setdefault("watcher", Watcher(context.store))


def login_throttle(context) -> LoginThrottle:
    return context.shared.setdefault("login_throttle", LoginThrottle())


def _imap_context(context):
    # Imported here: `mtad` alone never loads Twisted or imapd.
    from imapd.recent import RecentClaims
    from imapd.session import IMAPContext
    from imapd.view import Snapshots

    imap = context.shared.get("imap")
    if imap is None:
        tls = server_tls(context.config.tls) if context.tls is not None else None
        imap = IMAPContext(context.config, context.accounts, context.store, watcher(context), login_throttle(context),
                           RecentClaims(), Snapshots(), store_runner(context), tls, __version__,
                           connections=ConnectionLimit(context.config.imap.max_connections,
                                                       context.config.imap.max_connections_per_ip),
                           run_login=login_runner(context), shares=FairShare(STORE_THREADS_PER_ACCOUNT))
        context.shared["imap"] = imap
    return imap


async def start_imap(context) -> TwistedListening:
    """IMAP on [imap] listen: STARTTLS when a certificate is configured."""
    return _listen_twisted("imapd.protocol", "IMAPFactory", _imap_context(context), context.config.imap.listen)


async def start_imaps(context) -> TwistedListening:
    """IMAPS on [imap] listen_tls: TLS from the first byte (RFC 8314)."""
    return _listen_twisted("imapd.protocol", "IMAPFactory", _imap_context(context), context.config.imap.listen_tls,
                           implicit_tls=True)


def _pop3_context(context):
    # Imported here: `mtad` alone never loads Twisted or pop3d.
    from pop3d.session import POP3Context

    pop3 = context.shared.get("pop3")
    if pop3 is None:
        tls = server_tls(context.config.tls) if context.tls is not None else None
        pop3 = POP3Context(context.config, context.accounts, context.store, login_throttle(context),
                           store_runner(context), tls, __version__,
                           connections=ConnectionLimit(context.config.pop3.max_connections,
                                                       context.config.pop3.max_connections_per_ip),
                           run_login=login_runner(context))
        context.shared["pop3"] = pop3
    return pop3


async def start_pop3(context) -> TwistedListening:
    """POP3 on [pop3] listen: STLS when a certificate is configured (RFC 2595)."""
    return _listen_twisted("pop3d.protocol", "POP3Factory", _pop3_context(context), context.config.pop3.listen)


async def start_pop3s(context) -> TwistedListening:
    """POP3S on [pop3] listen_tls: TLS from the first byte (RFC 8314)."""
    return _listen_twisted("pop3d.protocol", "POP3Factory", _pop3_context(context), context.config.pop3.listen_tls,
                           implicit_tls=True)


def _listen_twisted(module: str, factory_name: str, service, addresses, *, implicit_tls: bool = False
                    ) -> TwistedListening:
    # The factory is looked up here: `mtad` alone never imports Twisted, imapd or pop3d.
    factory = getattr(importlib.import_module(module), factory_name)(service, implicit_tls=implicit_tls)
    ports = listen(factory, addresses, service.tls if implicit_tls else None,
                   backlog=service.config.server.listen_backlog)
    return TwistedListening(ports, factory.shutdown)


PRELOAD = {
    "mtad": ("mtad.inbound",),
    "imapd": ("imapd.recent", "imapd.session", "imapd.view", "imapd.protocol", "twisted.internet.asyncioreactor",
              "twisted.protocols.tls"),
    "pop3d": ("pop3d.session", "pop3d.protocol", "twisted.internet.asyncioreactor", "twisted.protocols.tls"),
}


def preload(daemon: str) -> None:
    """Import the modules `daemon`'s start functions import when they run, in a supervisor
    about to fork it: the child starts with its code loaded instead of importing it again
    (a third of a second of CPU for each of imapd and pop3d)."""
    for module in PRELOAD[daemon]:
        importlib.import_module(module)
    # The reactor is installed in each child, on its own event loop: importing one here
    # would install Twisted's default reactor for every child forked afterwards.
    assert "twisted.internet.reactor" not in sys.modules, "a module imported twisted.internet.reactor"


async def close_shared(context) -> None:
    """After every service stopped: the watcher thread, the store and login threads."""
    shared = context.shared
    if "watcher" in shared:
        shared.pop("watcher").close()
    for name in ("store_executor", "login_executor"):
        executor = shared.pop(name, None)
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
    shared.clear()
