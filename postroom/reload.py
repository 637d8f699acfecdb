"""Reload: SIGHUP (systemd's ExecReload, `postroom reload`) makes a running process read its
config file and its certificate again, without dropping a connection.

What a reload does in each daemon process (mtad and its MX workers, imapd, pop3d):
- The config file is loaded and the certificate and key checked (conf.load,
  conf.tls.server_context) before anything changes. A file that does not load, or a
  certificate that does not, is refused: one `reload.refused` line with the reason, and
  the process goes on with what it had.
- Keys that only a start can apply (RESTART_NEEDED: listen addresses, the data dir, shards,
  workers, what long-lived objects such as the queue runner and the DNS resolver were built
  from) keep their running values; each one that changed is logged as
  `reload.restart_needed key=<section.key>`. conf/postroom.toml lists them at its top.
- Everything else takes effect for new sessions: the services' contexts (mtad's agents,
  imapd's and pop3d's contexts, the policy services) get the new config object, which a
  session reads when it starts (SMTP's size and recipient limits, POP3's settings), and
  the connection limits their new numbers. A session in flight keeps its TLS connection
  and the limits it started with; an IMAP or POP3 idle timer takes the new value at the
  client's next command.
- Certificates: the listeners and STARTTLS keep the context they were started with (the
  "front" one); its servername callback, which OpenSSL calls in every ClientHello whether
  or not the client sends SNI (RFC 6066 §3), hands the handshake to the newest context.
  That is the one hook both sides have for a new handshake: asyncio's servers (mtad, 465
  and STARTTLS on 587) hold their ssl.SSLContext for good, and Twisted's (imapd, pop3d)
  ask our ServerTLS for its one pyOpenSSL context. Handshakes already done are untouched.

`postroom serve` on SIGHUP checks the file the same way and, if it loads, passes the signal
on to each of its children; if it does not, it logs `reload.refused` and they keep theirs.
mtad passes the signal on to its MX workers. A SIGHUP that arrives while a process is still
starting is ignored (its default action would end the process); the config it is reading
then is the one it runs with.

`postroom reload` (`run_reload`) checks the file, then finds what runs from the data dir's
lock files (postroom/datadir.py; each holds its holder's pid): serve if it runs, else each
of mtad, imapd and pop3d that runs alone (under their own systemd units).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import conf
from conf import Config
from conf.logfmt import LEVELS, EventLogger
from conf.tls import TLSSetupError, server_context, server_tls
from postroom.datadir import running_processes

# Keys a reload does not apply (a section name: every key of it). A change is logged and the
# running value kept until the next start.
RESTART_NEEDED: tuple[str, ...] = (
    "server.data_dir", "server.listen_backlog", "server.stop_grace",  # bound or held since start
    "tls.self_signed",  # a self-signed certificate is only made at start
    "smtp.listen", "smtp.workers", "smtp.writer", "smtp.lmtp_listen", "smtp.lmtp_max_connections",
    "submission.listen", "submission.listen_tls",
    "imap.listen", "imap.listen_tls",
    "pop3.listen", "pop3.listen_tls",
    # Built into long-lived objects at start: the queue and its runner, the outbound routes,
    # SRS and DKIM signers, the resolver, the clamd scanner, the greylist table, the store,
    # the accounts' address parsing.
    "queue", "outbound", "srs", "dkim", "dns", "clamav", "greylist", "storage", "accounts",
    "metrics",  # its listener is bound at start (postroom/metrics.py)
    "cluster",  # the node agent's lease, name and volumes (cluster/agent.py)
)


class ReloadError(Exception):
    """The new config or certificate cannot be used; str() is one line."""


def ignore_until_ready() -> None:
    """SIGHUP's default action ends the process: until the event loop handles it (`Reloader`,
    `forward_on_signal`), a reload sent to a starting process is ignored instead. Inherited
    by forked and spawned children alike."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def ignore_from_now() -> None:
    """The process stops: SIGHUP is ignored from here to its end, and passed on to no child.
    Left to the event loop, whose close puts back the default action, a reload racing the
    stop would kill the process after its loop (serve's exit status, a daemon still closing
    its store)."""
    try:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    except RuntimeError:
        pass  # no loop: nothing of it to take back
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def merge(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload applies: `new`, except RESTART_NEEDED keys, which keep their
    running values; and the keys among those that changed, "section.key"."""
    kept: list[str] = []
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        old_part, new_part = getattr(running, section.name), getattr(new, section.name)
        keep = {}
        for key in dataclasses.fields(old_part):
            dotted = f"{section.name}.{key.name}"
            old_value, new_value = getattr(old_part, key.name), getattr(new_part, key.name)
            if (section.name in RESTART_NEEDED or dotted in RESTART_NEEDED) and old_value != new_value:
                kept.append(dotted)
                keep[key.name] = old_value
        sections[section.name] = dataclasses.replace(new_part, **keep) if keep else new_part
    if running.tls.enabled != new.tls.enabled:
        # No TLS listener runs without a certificate, and no STARTTLS is offered: turning
        # TLS on or off is a start's business.
        kept.append("tls.cert")
        sections["tls"] = running.tls
    return dataclasses.replace(new, **sections), kept


def check(path: Path) -> tuple[Config, ssl.SSLContext | None]:
    """The config at `path` and a context of its certificate, or ReloadError."""
    try:
        config = conf.load(path)
        return config, server_context(config.tls)
    except (conf.ConfigError, TLSSetupError) as e:
        raise ReloadError(str(e)) from None


class CurrentTLS:
    """The newest certificate, handed to each new handshake by the front contexts' servername
    callbacks (see the module): `front` is the asyncio context the listeners and STARTTLS
    hold, `twisted` the ServerTLS objects of imapd's and pop3d's contexts."""

    def __init__(self, front: ssl.SSLContext | None, twisted: list):
        self.front = front
        self.current = front
        self.twisted_current = None  # a pyOpenSSL context once reloaded; None: the front's own
        if front is not None:
            front.sni_callback = self._asyncio_hello
        for server in twisted:
            server.getContext().set_tlsext_servername_callback(self._twisted_hello)
        self.has_twisted = bool(twisted)

    def swap(self, context: ssl.SSLContext | None, tls_config) -> None:
        """From the next handshake on, `context` (checked by `check`) and its twin for Twisted."""
        if self.front is None or context is None:
            return
        twisted = None
        if self.has_twisted:
            from OpenSSL import SSL

            try:
                twisted = server_tls(tls_config).getContext()
            except SSL.Error as e:
                raise ReloadError(f"{tls_config.cert}: {e}") from None
        self.current, self.twisted_current = context, twisted

    def _asyncio_hello(self, connection: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        if self.current is not front:
            connection.context = self.current

    def _twisted_hello(self, connection) -> None:
        if self.twisted_current is not None:
            connection.set_context(self.twisted_current)


class Reloader:
    """A daemon process's reload: its services' contexts (built by postroom/daemons.py), what
    they were started with, and the MX workers it passes SIGHUP on to."""

    def __init__(self, daemon: str, context, running: list, workers, log: EventLogger):
        self.daemon = daemon
        self.path = context.config.source
        self.config = context.config
        self.shared = context.shared
        self.workers = workers
        self.log = log
        built = self.shared.__dict__  # the services' contexts this process made (cached properties)
        self.agents = [r.agent for r in running if hasattr(r, "agent")]  # the MX's and submission's
        self.accessors = [built[name] for name in ("imap", "pop3") if name in built]
        self.policy = built.get("policy")
        self.tls = CurrentTLS(context.tls, [a.tls for a in self.accessors if a.tls is not None])

    def install(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> None:
        if self.workers is not None:
            for child in self.workers.children:
                if child.running:
                    os.kill(child.pid, signal.SIGHUP)
        try:
            new, context = check(self.path)
            config, kept = merge(self.config, new)
            self.tls.swap(context if config.tls.enabled else None, config.tls)
        except ReloadError as e:
            self.log.error("reload.refused", daemon=self.daemon, config=self.path, error=str(e))
            return
        for key in kept:
            self.log.warning("reload.restart_needed", daemon=self.daemon, key=key)
        self.apply(config)
        changed = [f"{s}.{k}" for s, k in _differences(self.config, config)]
        self.config = config
        self.log.info("reload.done", daemon=self.daemon, changed=changed or "-", certificate=config.tls.cert or "-")

    def apply(self, config: Config) -> None:
        """New sessions see `config` (its RESTART_NEEDED keys are the running ones)."""
        logging.getLogger().setLevel(LEVELS[config.server.log_level])
        submission = self.shared.__dict__.get("submission")
        for agent in self.agents:
            section = config.submission if agent is submission else config.smtp
            agent.config = config
            _limit(agent.connections, section)
        for accessor in self.accessors:
            accessor.config = config
            _limit(accessor.connections, config.imap if accessor is self.shared.__dict__.get("imap") else config.pop3)
        if self.policy is not None:
            self.policy.reconfigure(config)


def _limit(connections, section) -> None:
    # Connections already counted stay; the new numbers decide who comes in next.
    connections.max_total, connections.max_per_ip = section.max_connections, section.max_connections_per_ip


def _differences(old: Config, new: Config) -> list[tuple[str, str]]:
    return [(s.name, k.name) for s in dataclasses.fields(Config) if not s.metadata.get("internal")
            for k in dataclasses.fields(getattr(old, s.name))
            if getattr(getattr(old, s.name), k.name) != getattr(getattr(new, s.name), k.name)]


# -- postroom serve -------------------------------------------------------------------------

def forward_on_signal(path: Path, supervisor, log: EventLogger) -> None:
    """In serve's event loop: on SIGHUP, check the file, then pass the signal to every child
    (each reloads itself); a file that does not load is refused here, once."""
    def forward() -> None:
        try:
            check(path)
        except ReloadError as e:
            log.error("reload.refused", daemon="serve", config=path, error=str(e))
            return
        children = [c for c in supervisor.children if c.running]
        for child in children:
            os.kill(child.pid, signal.SIGHUP)
        log.info("reload.forwarded", daemons=",".join(c.name for c in children) or "-")

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, forward)


# -- postroom reload ------------------------------------------------------------------------

def targets(data_dir: Path, config: Config | None = None) -> list[tuple[str, int]]:
    """(name, pid) of what to signal on `data_dir`: serve alone if it runs (it passes signals
    on), else each daemon running alone (in a cluster, of `config`'s node)."""
    running = running_processes(data_dir, config)
    if "serve" in running:
        return [("serve", running["serve"].pid)]
    return [(name, r.pid) for name, r in running.items()]


def run_reload(config: Config, data_dir, accounts, args, audit) -> int:
    """`postroom reload`: the config (loaded by the CLI) and its certificate checked, then
    SIGHUP to serve or to each daemon running alone. Exit 1 when nothing runs (0 with
    --if-running)."""
    server_context(config.tls)  # a certificate that does not load: one line, exit 1, nothing sent
    processes = targets(data_dir.path, config)
    if not processes:
        if args.if_running:
            # A certificate hook run before the first start: the daemons read the files then.
            print(f"nothing runs on data dir {data_dir.path}: the new config and certificate are read at start")
            return 0
        print(f"postroom: nothing runs on data dir {data_dir.path} (no serve, mtad, imapd or pop3d lock held)",
              file=sys.stderr)
        return 1
    for name, pid in processes:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as e:
            print(f"postroom: cannot signal {name} (pid {pid}): {e.strerror}", file=sys.stderr)
            return 1
        print(f"reload sent to {name} (pid {pid})")
    return 0
