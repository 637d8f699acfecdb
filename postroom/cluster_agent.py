"""The node agent's process: a child of `postroom serve` when [cluster] etcd is set, or
`postroom cluster agent` in the foreground (a systemd unit of its own beside the daemons).

It holds the data dir's cluster-<node>.lock (one agent a node), opens the store for the
agent's own few writes (fences, flushes), says READY=1 to its manager once the agent has
registered and made its first round of claims (or after START_WAIT, etcd unreachable: the
daemons then answer 4xx for every shard until it is back), and on SIGTERM or SIGINT hands
every shard over (cluster/agent.py) and exits 0.

Watched like the daemons (postroom/watchdog.py: serve's child watchdog, or systemd's
WatchdogSec= for `postroom cluster agent`): its main thread, which waits on the agent's
thread, says WATCHDOG=1 every half interval while that thread lives. The agent has no event
loop of its own to ping from, and a silent agent was killed as stuck each interval: SIGABRT,
a new lease, every shard claimed again (some by other nodes for a moment).
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
from pathlib import Path

import conf
from cluster.agent import Agent
from cluster.local import node_name
from conf import Config
from conf.logfmt import EventLogger, setup_logging
from postroom import supervisor
from postroom.datadir import DataDirInUseError, become_data_dir_owner, lock, password_hasher
from postroom.notify import notify
from postroom.watchdog import take_interval
from storage import DataDirError, Store, open_data_dir

START_WAIT_TTLS = 3  # lease TTLs to wait for a first round before READY=1 all the same


def main(prog: str, config_path: Path) -> int:
    """The supervised child's whole life (as daemon_process.main is a daemon's)."""
    supervised = supervisor.supervised()
    try:
        config = conf.load(config_path)
        become_data_dir_owner(config.server.data_dir)
        supervisor.become_child()
        return run(config, supervised=supervised)
    except (conf.ConfigError, DataDirError, DataDirInUseError) as e:
        notify(f"STATUS={e}")
        if not supervised:
            print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run(config: Config, *, supervised: bool = False) -> int:
    from postroom.daemon_process import name_this_process

    name_this_process("cluster-agent")
    setup_logging(config.server.log_level)
    log = EventLogger("cluster.agent")
    data_dir = open_data_dir(config.server.data_dir, config.storage.shards)
    node = node_name(config)
    lock(data_dir.path, f"cluster-{node}", f"the cluster agent of node {node}")  # held until exit
    stopping = threading.Event()
    # The node's copy of the cluster's accounts (cluster/accounts_mirror.py), kept here, in
    # the one process a node has for the cluster: its daemons read the local copy alone.
    from cluster.accounts_mirror import AccountsMirror
    from storage import Accounts

    accounts = Accounts(data_dir.accounts_path, recipient_delimiter=config.accounts.recipient_delimiter,
                        hasher=password_hasher(config.accounts))
    mirror = AccountsMirror(accounts, list(config.cluster.etcd), config.cluster.prefix).start()
    try:
        return _run_agent(config, data_dir, node, log, stopping)
    finally:
        mirror.stop()
        accounts.close()


def _run_agent(config: Config, data_dir, node: str, log: EventLogger, stopping: threading.Event) -> int:
    watchdog = take_interval()  # serve's or systemd's
    if watchdog:
        faulthandler.enable()  # SIGABRT from the manager: the stuck stacks go to the log
    with Store(data_dir) as store:
        agent = Agent(config, data_dir, store, log)

        def on_signal(signum, frame) -> None:
            stopping.set()
            agent.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        thread = agent.start()
        if not agent.ready.wait(agent.ttl * START_WAIT_TTLS) and not stopping.is_set():
            log.warning("not_ready", node=node, waited=agent.ttl * START_WAIT_TTLS)
        notify(f"READY=1\nSTATUS=node {node}: {len(agent.claims)} shard(s)")
        pinged = time.monotonic()
        while thread.is_alive():
            thread.join(0.5)  # wakes for signals
            if watchdog and time.monotonic() - pinged >= watchdog / 2:
                notify("WATCHDOG=1", drop_when_full=True)
                pinged = time.monotonic()
    return 0 if stopping.is_set() else 1  # else the agent died: the supervisor starts it again
