"""How a daemon process (postroom/daemon_process.py) starts each service: builds it from
the config and the collaborators its process shares (Context, Shared), binds its
listeners, and returns something it can stop."""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import ssl
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar

from conf import Config
from conf.tls import ServerTLS, server_tls
from conf.values import parse_listen
from policy.shares import FairShare
from policy.logins import LoginThrottle
from postroom import __version__
from postroom.ports import TwistedListening, listen_asyncio, listen_twisted
from storage import Accounts, DataDir, Store, Watcher
from wire.connections import ConnectionLimit

if TYPE_CHECKING:
    from cluster.follow import Follower
    from conf.values import ListenAddress
    from imapd.session import IMAPContext
    from mtad.agent import AgentContext
    from mtad.outbound.runner import RunnerHandle
    from mtad.routing import Outbound
    from policy.chain import PolicyServices
    from pop3d.session import POP3Context
    from wire.protocol import ServerFactory

T = TypeVar("T")

DELIVERY_THREADS = 32  # messages too big to parse in the event loop, and retries after a failed delivery

STORE_THREADS = 16  # IMAP and POP3 store calls: reads, flag writes, APPEND
STORE_THREADS_PER_ACCOUNT = 4  # of those, what one account's sessions may hold at once
# Password checks have threads of their own: argon2id takes 64 MiB and ~100 ms each, so
# this bounds their memory, and a flood of logins (or of slow searches) never waits on the
# other.
LOGIN_THREADS = 4


class Stopped(ConnectionAbortedError):
    """Work asked of a pool the process's stop has closed: the session it serves has been
    told and let go (a BYE, a -ERR), so it ends as its connection does, without a reply."""


class Threads:
    """A pool of threads as a runner: `await threads(function, *args)` runs function(*args)
    in one of them. Its threads start on first use."""

    def __init__(self, name: str, count: int):
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix=name)
        self._closed = False

    def __call__(self, function: Callable[..., T], *args) -> asyncio.Future[T]:
        if self._closed:
            # A command still running past the stop's grace (a long SEARCH): see Stopped.
            raise Stopped("the process is stopping")
        return asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def close(self) -> None:
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)


class Shared:
    """What the services of one process share, built once with its Context and closed
    after every service has stopped: the store, delivery and login threads, the mailbox
    watcher, the login throttle (shared with every other process of the data dir through
    its file, policy/logins.py), the outbound queue, DKIM and SRS (mtad/routing.py), and
    each service's context (IMAP on 143 and 993 share their \\Recent claims, snapshots and
    connection limit; POP3 on 110 and 995 theirs; submission on 587 and 465 theirs).

    Nothing costs before it is used: the pools and the watcher start their threads then,
    and a service context is made when its first listener starts (mtad never imports imapd
    or pop3d)."""

    def __init__(self, config: Config, data_dir: DataDir, accounts: Accounts, store: Store,
                 tls: ssl.SSLContext | None):
        self._config, self._data_dir, self._accounts, self._store, self._tls = config, data_dir, accounts, store, tls
        self.store_threads = Threads("store", STORE_THREADS)
        self.login_threads = Threads("login", LOGIN_THREADS)
        self.delivery_threads = Threads("deliver", DELIVERY_THREADS)
        self.watcher = Watcher(store)
        self.login_throttle = LoginThrottle(data_dir.logins_path)

    @cached_property
    def outbound(self) -> Outbound:
        from mtad.routing import Outbound
        from postroom.datadir import open_queues

        # In a cluster, the queues of the shards this node holds, fenced as the store is.
        return Outbound(self._config, self._data_dir,
                        functools.partial(open_queues, self._config, self._data_dir, self._store))

    @cached_property
    def policy(self) -> PolicyServices:
        """The policy chain's resolver, tables, scanner and threads (policy/chain.py)."""
        from policy.chain import PolicyServices

        return PolicyServices(self._config, rates_path=self._data_dir.rates_path,
                              greylist_path=self._data_dir.greylist_path)

    @cached_property
    def submission(self) -> AgentContext:
        """Submission on 587 and 465: one connection limit, one set of sessions."""
        from mtad.agent import AgentContext

        config = self._config
        agent = AgentContext(config, self._accounts, self._store, self._tls, self.delivery_threads,
                             ConnectionLimit(config.submission.max_connections,
                                             config.submission.max_connections_per_ip),
                             outbound=self.outbound, policy=self.policy, router=self.router, writer=self.writer)
        if self.follower is not None:  # a cluster's: messages coming in let go of a released shard
            self.follower.listeners.append(agent.let_go)
        return agent

    @cached_property
    def writer(self):
        """[smtp] writer: this process's connection to mtad's writer process (mtad/writer.py),
        made at the first commit; None: the shards' committers here commit."""
        if not self._config.smtp.writer or self._config.cluster.enabled:
            return None
        from mtad.writer import WriterClient, socket_path

        return WriterClient(socket_path(self._data_dir.path))

    @cached_property
    def router(self):
        """Cluster mode: which node owns an account's shard (mtad/cluster_router.py); None
        on a single node, which owns every shard."""
        from cluster.view import open_view

        view = open_view(self._config, self._data_dir)
        if view is None:
            return None
        from mtad.cluster_router import ViewRouter

        return ViewRouter(view, self._store)

    @cached_property
    def follower(self) -> Follower | None:
        """Cluster mode: what lets go of the shards this node releases, and ends their
        sessions here (cluster/follow.py); None on a single node."""
        if not self._config.cluster.enabled:
            return None
        from cluster.follow import Follower
        from cluster.local import open_node_table

        return Follower(self._store, open_node_table(self._config, self._data_dir))

    @cached_property
    def proxy_tls(self) -> ssl.SSLContext:
        """A cluster's proxies check the owner node's certificate: the system's authorities,
        and this node's own certificate (a cluster's nodes serve one name, and may share a
        self-signed one)."""
        context = ssl.create_default_context()
        if self._config.tls.cert:
            context.load_verify_locations(cafile=str(self._config.tls.cert))
        return context

    @cached_property
    def imap(self) -> IMAPContext:
        # Imported here: `mtad` alone never loads Twisted or imapd.
        from imapd.recent import RecentClaims
        from imapd.session import IMAPContext
        from imapd.view import Snapshots

        config = self._config
        return IMAPContext(config, self._accounts, self._store, self.watcher, self.login_throttle,
                           RecentClaims(self._store), Snapshots(), self.store_threads, self._twisted_tls(), __version__,
                           connections=ConnectionLimit(config.imap.max_connections, config.imap.max_connections_per_ip),
                           run_login=self.login_threads, shares=FairShare(STORE_THREADS_PER_ACCOUNT),
                           owner=functools.partial(self.router.owner, service="imap") if self.router else None,
                           is_peer=self.router.is_peer if self.router else None,
                           secret=self.router.secret if self.router else None,
                           node=self.router.node if self.router else None,
                           proxy_tls=self.proxy_tls if self.router else None)

    @cached_property
    def pop3(self) -> POP3Context:
        # Imported here: `mtad` alone never loads Twisted or pop3d.
        from pop3d.session import POP3Context

        config = self._config
        return POP3Context(config, self._accounts, self._store, self.login_throttle, self.store_threads,
                           self._twisted_tls(), __version__,
                           connections=ConnectionLimit(config.pop3.max_connections, config.pop3.max_connections_per_ip),
                           run_login=self.login_threads,
                           owner=functools.partial(self.router.owner, service="pop3") if self.router else None,
                           is_peer=self.router.is_peer if self.router else None,
                           secret=self.router.secret if self.router else None,
                           node=self.router.node if self.router else None,
                           proxy_tls=self.proxy_tls if self.router else None)

    def _twisted_tls(self) -> ServerTLS | None:
        # From the same files as the asyncio context, which has checked them.
        return server_tls(self._config.tls) if self._tls is not None else None

    async def close(self) -> None:
        """After every service stopped: the watcher thread, the store, delivery and login
        threads, the login throttle's table."""
        self.watcher.close()
        await self.store_threads.close()
        await self.login_threads.close()
        # Big deliveries run in these threads: the services' stops have waited for them.
        await self.delivery_threads.close()
        self.login_throttle.close()
        if "policy" in self.__dict__:  # made only by mtad
            self.policy.close()
        if self.__dict__.get("follower") is not None:
            self.follower.table.close()
        if self.__dict__.get("writer") is not None:
            self.writer.close()


@dataclass(frozen=True)
class Context:
    """What a service is built from: config and collaborators, `shared` by the services of
    this process."""

    config: Config
    data_dir: DataDir
    accounts: Accounts
    store: Store
    tls: ssl.SSLContext | None
    shared: Shared


def build_context(config: Config, data_dir: DataDir, accounts: Accounts, store: Store,
                  tls: ssl.SSLContext | None) -> Context:
    """The process's Context, with what its services share built once."""
    return Context(config, data_dir, accounts, store, tls, Shared(config, data_dir, accounts, store, tls))


class Listening:
    """An SMTP agent's listeners, stopped gracefully: see AgentContext.stop_sessions."""

    def __init__(self, servers: list[asyncio.Server], agent: AgentContext, grace: float,
                 runner: RunnerHandle | None = None):
        self.servers = servers
        self.agent = agent
        self.grace = grace
        self.runner = runner  # the MX's: the delivery runner, if this process holds its lock

    async def stop(self) -> None:
        # Not Server.wait_closed(): since Python 3.12 it waits for every connection to end,
        # which is the sessions' business (stop_sessions), bounded by the grace period.
        for server in self.servers:
            server.close()
        # The delivery runner finishes its transactions meanwhile (mtad/outbound/runner.py).
        await asyncio.gather(self.agent.stop_sessions(self.grace),
                             self.runner.stop() if self.runner is not None else asyncio.sleep(0))


async def start_smtp(context: Context) -> Listening:
    """The MX on [smtp] listen."""
    # Imported here: imapd and pop3d never load aiosmtpd.
    from mtad.agent import AgentContext
    from mtad.inbound import InboundSMTP
    from mtad.outbound.runner import start_runner

    # aiosmtpd logs every connection in its own words: ours are the log.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    config, shared = context.config, context.shared
    inbound = AgentContext(config, context.accounts, context.store, context.tls, shared.delivery_threads,
                           ConnectionLimit(config.smtp.max_connections, config.smtp.max_connections_per_ip),
                           outbound=shared.outbound, policy=shared.policy, router=shared.router,
                           writer=shared.writer)
    servers = await listen_asyncio(lambda: InboundSMTP(inbound), config.smtp.listen, tls=None,
                                   backlog=config.server.listen_backlog)
    lmtp_listen = config.smtp.lmtp_listen
    if not lmtp_listen and config.cluster.enabled:
        # A cluster node takes its shards' mail where the others are told to hand it over.
        lmtp_listen = (parse_listen(f"{_bracketed(config.cluster.address)}:{config.cluster.lmtp_port}"),)
    if lmtp_listen:
        from mtad.lmtp import LMTPAgent

        # The cluster's hand-off from other nodes (mtad/lmtp.py): the MX's context (store,
        # threads, stop, reload), its sessions among the MX's; LMTPAgent runs no checks.
        limit = config.smtp.lmtp_max_connections  # all the nodes together: no per-address share
        lmtp_connections = ConnectionLimit(limit, limit)
        servers += await listen_asyncio(lambda: LMTPAgent(inbound, lmtp_connections), lmtp_listen, tls=None,
                                        backlog=config.server.listen_backlog)
    if shared.follower is not None:  # a cluster's: messages coming in let go of a released shard
        shared.follower.listeners.append(inbound.let_go)
        shared.follower.releasers.append(shared.outbound.queue.release_gone)
    # Every mtad process tries for the runner lock (in a cluster, its node's); its holder delivers.
    runner = start_runner(context, shared.outbound.queue)
    return Listening(servers, inbound, float(config.server.stop_grace), runner)


async def start_submission(context: Context) -> Listening:
    """Submission on [submission] listen: STARTTLS, then AUTH (RFC 6409, 4954)."""
    return await _start_submission(context, implicit_tls=False)


async def start_submissions(context: Context) -> Listening:
    """Submission on [submission] listen_tls: TLS from the first byte (RFC 8314)."""
    return await _start_submission(context, implicit_tls=True)


async def _start_submission(context: Context, *, implicit_tls: bool) -> Listening:
    from mtad.submission import SubmissionSMTP

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    config, agent = context.config, context.shared.submission
    throttle, run_login = context.shared.login_throttle, context.shared.login_threads
    addresses = config.submission.listen_tls if implicit_tls else config.submission.listen
    servers = await listen_asyncio(lambda: SubmissionSMTP(agent, throttle, run_login, implicit_tls=implicit_tls),
                                   addresses, tls=context.tls if implicit_tls else None,
                                   backlog=config.server.listen_backlog)
    return Listening(servers, agent, float(config.server.stop_grace))


async def start_imap(context: Context) -> TwistedListening:
    """IMAP on [imap] listen: STARTTLS when a certificate is configured."""
    return _listen_twisted(context, "imapd.protocol", "IMAPFactory", context.shared.imap, context.config.imap.listen)


async def start_imaps(context: Context) -> TwistedListening:
    """IMAPS on [imap] listen_tls: TLS from the first byte (RFC 8314)."""
    return _listen_twisted(context, "imapd.protocol", "IMAPFactory", context.shared.imap,
                           context.config.imap.listen_tls, implicit_tls=True)


async def start_pop3(context: Context) -> TwistedListening:
    """POP3 on [pop3] listen: STLS when a certificate is configured (RFC 2595)."""
    return _listen_twisted(context, "pop3d.protocol", "POP3Factory", context.shared.pop3, context.config.pop3.listen)


async def start_pop3s(context: Context) -> TwistedListening:
    """POP3S on [pop3] listen_tls: TLS from the first byte (RFC 8314)."""
    return _listen_twisted(context, "pop3d.protocol", "POP3Factory", context.shared.pop3,
                           context.config.pop3.listen_tls, implicit_tls=True)


def _listen_twisted(context: Context, module: str, factory_name: str, service: IMAPContext | POP3Context,
                    addresses: tuple[ListenAddress, ...], *, implicit_tls: bool = False) -> TwistedListening:
    # The factory is looked up here: `mtad` alone never imports Twisted, imapd or pop3d.
    factory: ServerFactory = getattr(importlib.import_module(module), factory_name)(service, implicit_tls=implicit_tls)
    ports = listen_twisted(factory, addresses, factory.tls if implicit_tls else None,
                           backlog=service.config.server.listen_backlog)
    follower = context.shared.follower
    if follower is not None:  # a cluster's: its sessions end when their shard is released
        follower.listeners.append(factory.end_released)
    # As mtad's sessions: a command under way (a SEARCH, an APPEND, POP3's \Seen writes)
    # gets [server] stop_grace to end.
    return TwistedListening(ports, functools.partial(factory.shutdown, float(service.config.server.stop_grace)))


PRELOAD = {
    "mtad": ("mtad.inbound", "mtad.submission"),
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


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
