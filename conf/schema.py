"""The config schema: one frozen dataclass per TOML section, defaults for production.

The loader (conf.loader) reads the field types: `Size`, `Duration`, `ListenAddress`,
`IPAddress`, `Path`, `Literal[...]`, `bool`, `int`, `str` and tuples of those. Range limits on
integers live in the field's metadata (`min`, `max`), and `check` names a function that
validates a value beyond its type. Every field has a default, so an empty file is a valid
config; conf/postroom.toml documents each key.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conf.values import Duration, IPAddress, ListenAddress, Size, parse_listen

KiB = 1024
MiB = 1024 * KiB

_HOSTNAME_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def check_hostname(value: str) -> None:
    name = value.lower()
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"not a valid host name: {value!r} (letters, digits, '-' and '.' only)")


def check_delimiter(value: str) -> None:
    if value and (len(value) > 1 or value not in "+-_.=#~&"):
        raise ValueError(f"expected one of + - _ . = # ~ & (or \"\" to turn sub-addressing off), got {value!r}")


def _listen(*addresses: str) -> tuple[ListenAddress, ...]:
    return tuple(parse_listen(a) for a in addresses)


def _default_hostname() -> str:
    # The configured name, not a reverse lookup: start-up never waits on DNS.
    return socket.gethostname().lower()


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=_default_hostname, metadata={"check": check_hostname})
    data_dir: Path = Path("/var/lib/postroom")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # listen(2)'s backlog on every listener: connections the kernel holds, handshake done,
    # until the daemon accepts them. Linux caps it at net.core.somaxconn.
    listen_backlog: int = field(default=1024, metadata={"min": 1, "max": 65535})
    # On SIGTERM, how long connections may take to finish (an SMTP client sending its
    # message, a delivery writing its 250) before they are closed.
    stop_grace: Duration = field(default=Duration(30), metadata={"min": 0, "max": 3600})

    def problems(self) -> list[tuple[str, str]]:
        if "." not in self.hostname:
            return [("hostname", f"{self.hostname!r} is not a fully qualified name (this machine's name is used "
                                  "when hostname is not set): set it to the name your MX record points at")]
        return []


@dataclass(frozen=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None
    # Generate a self-signed certificate at cert/key on first start when they are missing.
    self_signed: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def problems(self) -> list[tuple[str, str]]:
        if self.key is not None and self.cert is None:
            return [("cert", "not set, but key is: set both")]
        if self.self_signed and (self.cert is None or self.key is None):
            return [("self_signed", "needs both cert and key: the paths to write the certificate and key to")]
        return []


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[ListenAddress, ...] = _listen("0.0.0.0:25", "[::]:25")
    max_message_size: Size = Size(25 * MiB)
    max_recipients: int = field(default=100, metadata={"min": 1, "max": 100_000})
    # How long a client may stay silent before 421 (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    timeout: Duration = field(default=Duration(300), metadata={"min": 1, "max": 3600})
    # How long a client may stay silent inside a message's data (RFC 5321 §4.5.3.2.5: 3 minutes
    # per block), so a sender that stalls mid-message frees its slot sooner.
    data_timeout: Duration = field(default=Duration(180), metadata={"min": 1, "max": 3600})
    max_connections: int = field(default=500, metadata={"min": 1, "max": 100_000})
    max_connections_per_ip: int = field(default=20, metadata={"min": 1, "max": 100_000})
    # Processes accepting on the MX port (SO_REUSEPORT); one Python process uses one core.
    workers: int = field(default=1, metadata={"min": 1, "max": 64})
    # Local deliveries of messages up to 64 KiB committed by one writer process beside the
    # workers (mtad/writer.py), not by a thread sharing each worker's interpreter. Not in a
    # cluster (a node's shards change hands; the writer does not follow them).
    writer: bool = False
    # LMTP (RFC 2033) for the other nodes of a cluster only: a message for a user whose shard
    # this node owns, handed over by the node that took it (mtad/lmtp.py). Never port 25,
    # never open to the Internet: it takes the sender's word and runs no checks.
    lmtp_listen: tuple[ListenAddress, ...] = ()
    # LMTP connections at once in each mtad process, from all the nodes together: a node
    # hands over as many messages at once as its own clients send it (up to its [smtp]
    # max_connections), so this is above that, and a bound on what a stray peer can hold.
    lmtp_max_connections: int = field(default=2000, metadata={"min": 1, "max": 100_000})


@dataclass(frozen=True)
class SubmissionConfig:
    # STARTTLS (RFC 6409); AUTH is offered only once the session is TLS.
    listen: tuple[ListenAddress, ...] = _listen("0.0.0.0:587", "[::]:587")
    # TLS from the first byte (RFC 8314).
    listen_tls: tuple[ListenAddress, ...] = _listen("0.0.0.0:465", "[::]:465")
    # Leave the client's address out of the Received: header (a user's home IP is theirs).
    hide_client_ip: bool = True
    max_connections: int = field(default=500, metadata={"min": 1, "max": 100_000})
    max_connections_per_ip: int = field(default=20, metadata={"min": 1, "max": 100_000})


@dataclass(frozen=True)
class QueueConfig:
    """The outbound queue and its delivery runner (mtad/outbound)."""
    # Deliveries at once, in all; and to one destination (a domain's MX set or a route): 20
    # as Postfix's default_destination_concurrency_limit (at 5, bench/smtp_out.py's queue fell
    # behind its submissions).
    concurrency: int = field(default=50, metadata={"min": 1, "max": 10_000})
    per_destination: int = field(default=20, metadata={"min": 1, "max": 1000})
    connect_timeout: Duration = field(default=Duration(30), metadata={"min": 1, "max": 600})
    # Each command's reply (RFC 5321 §4.5.3.2: 5 minutes for MAIL, RCPT; 10 after the data).
    command_timeout: Duration = field(default=Duration(300), metadata={"min": 1, "max": 3600})
    data_timeout: Duration = field(default=Duration(600), metadata={"min": 1, "max": 3600})
    # Waits between attempts of a deferred recipient; the last repeats until max_lifetime.
    # Each wait gets up to 10% jitter, so a queue of mail for one host does not come back at once.
    retry_schedule: tuple[Duration, ...] = (Duration(60), Duration(300), Duration(900), Duration(1800),
                                            Duration(3600), Duration(7200), Duration(14400))
    # A recipient still deferred this long after the message was queued bounces (RFC 5321 §4.5.4.1).
    max_lifetime: Duration = field(default=Duration(5 * 86400), metadata={"min": 60, "max": 60 * 86400})
    # Once a message has waited this long, its sender is told, once, that it is delayed (RFC 3464).
    delay_warning: Duration = field(default=Duration(4 * 3600), metadata={"min": 0, "max": 60 * 86400})


@dataclass(frozen=True)
class OutboundConfig:
    """Where mail for other domains goes: by default each domain's MX (dnspython)."""
    # A smarthost, "host:port", that takes all remote mail instead of the MX.
    relay: str = ""
    relay_user: str = ""
    # A file holding the relay's password (0600), so the password is not in this config.
    relay_password_file: Path | None = None
    # Per-domain routes, "domain" = "host:port", tried before the relay and the MX (tests,
    # split delivery, a partner's host).
    routes: dict[str, str] = field(default_factory=dict)
    # Domains whose servers must present a certificate valid for their name (else defer).
    require_verified_tls: tuple[str, ...] = ()
    # Extra CA certificates (PEM) trusted when verifying a server's certificate.
    ca_file: Path | None = None
    # The name said in EHLO; empty: [server] hostname.
    helo_name: str = ""
    # The port MX hosts are reached on (Postfix's smtp_tcp_port): 25, except for tests that
    # serve a zone's MX hosts on loopback addresses.
    port: int = field(default=25, metadata={"min": 1, "max": 65535})


@dataclass(frozen=True)
class SRSConfig:
    """Sender Rewriting Scheme, for mail forwarded to other domains (aliases)."""
    # The HMAC key of the SRS addresses; empty: one is made on first start and kept in
    # <data_dir>/srs.key. Changing it invalidates bounces of mail already forwarded.
    secret: str = ""
    # Domain of the rewritten senders; empty: [server] hostname.
    domain: str = ""


@dataclass(frozen=True)
class DKIMConfig:
    """Signing of mail sent by local users (keys: `postroom dkim keygen`, under the data dir)."""
    sign: bool = True


@dataclass(frozen=True)
class IMAPConfig:
    listen: tuple[ListenAddress, ...] = _listen("0.0.0.0:143", "[::]:143")
    listen_tls: tuple[ListenAddress, ...] = _listen("0.0.0.0:993", "[::]:993")
    # LOGIN and AUTHENTICATE before TLS (port 143 without STARTTLS): only for loopback tests.
    plaintext_auth: bool = False
    # RFC 3501 §5.4: logged-in clients are logged out after this long without a command (at
    # least 30 minutes; IDLE counts as idle too, RFC 2177, and clients renew it every 29).
    timeout: Duration = field(default=Duration(1800), metadata={"min": 1800, "max": 86400})
    # Before login a client has this long in all, however it trickles bytes: idle strangers
    # would otherwise fill the connection limit.
    login_timeout: Duration = field(default=Duration(120), metadata={"min": 1, "max": 3600})
    max_connections: int = field(default=2000, metadata={"min": 1, "max": 100_000})
    max_connections_per_ip: int = field(default=50, metadata={"min": 1, "max": 100_000})


@dataclass(frozen=True)
class POP3Config:
    listen: tuple[ListenAddress, ...] = _listen("0.0.0.0:110", "[::]:110")
    listen_tls: tuple[ListenAddress, ...] = _listen("0.0.0.0:995", "[::]:995")
    # USER/PASS and AUTH before TLS (port 110 without STLS): only for loopback tests.
    plaintext_auth: bool = False
    # RFC 1939 §3: an autologout timer of at least 10 minutes.
    timeout: Duration = field(default=Duration(600), metadata={"min": 600, "max": 86400})
    # Before login a client has this long in all, however it trickles bytes.
    login_timeout: Duration = field(default=Duration(120), metadata={"min": 1, "max": 3600})
    max_connections: int = field(default=1000, metadata={"min": 1, "max": 100_000})
    max_connections_per_ip: int = field(default=20, metadata={"min": 1, "max": 100_000})
    # RFC 2449 §6.5 LOGIN-DELAY: the least time between two logins of one user (0: any time).
    login_delay: Duration = field(default=Duration(0), metadata={"min": 0, "max": 86400})
    # RFC 2449 §6.7 EXPIRE: "never" keeps mail until the client deletes it; "0" also removes
    # every message a session retrieved with RETR when it ends with QUIT.
    expire: Literal["never", "0"] = "never"


@dataclass(frozen=True)
class DNSConfig:
    # Empty: the system resolver's servers (/etc/resolv.conf).
    nameservers: tuple[IPAddress, ...] = ()
    # The port of those nameservers: 53, except for a test's zone served on loopback.
    port: int = field(default=53, metadata={"min": 1, "max": 65535})
    timeout: Duration = Duration(5)


# The signals of the spam score (policy/decide.py) and their default weights. A message's
# score is the sum of the weights of the signals it shows; [policy.weights] overrides any.
DEFAULT_WEIGHTS: dict[str, float] = {
    "spf_fail": 3.0, "spf_softfail": 1.0, "spf_neutral": 0.0, "spf_none": 0.5, "spf_permerror": 1.0,
    "spf_pass": -0.5,
    "dkim_fail": 1.0,  # a signature that does not verify (a body changed, a key revoked)
    "dkim_pass": -0.5,  # at least one signature verifies
    "dkim_none": 0.5,  # not signed at all
    "dmarc_fail": 3.0,  # the From domain's DMARC evaluation failed (whatever its policy)
    "dmarc_pass": -1.0,
    "arc_fail": 0.5,  # an ARC chain that does not validate
    "dnsbl": 5.0,  # per listing zone, when [policy] dnsbl_action = "score"
    "no_from": 2.0,  # no From: address, or several (RFC 5322 §3.6.2 wants one)
    "no_message_id": 0.5,
    "no_date": 0.5,
    "not_scanned": 0.0,  # clamd was not reachable and [clamav] on_failure = "accept"
}


def check_weights(value: dict[str, float]) -> None:
    unknown = sorted(set(value) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown signal {unknown[0]!r}: the signals are {', '.join(DEFAULT_WEIGHTS)}")


@dataclass(frozen=True)
class PolicyConfig:
    """The checks the MX runs on mail from other servers (policy/), and what they lead to."""
    # Off: the MX checks nothing but its recipients (a trusted relay in front of it does).
    enabled: bool = True
    # The name in our Authentication-Results: headers (RFC 8601 §2.5); empty: [server]
    # hostname. Such headers already in a message are forgeries: they are removed.
    authserv_id: str = ""
    # SPF `fail` of the MAIL FROM (or HELO) domain: "reject" answers 550 5.7.23 at MAIL
    # (RFC 7208 §8.4); "score" records it and adds its weight (forwarded mail fails SPF).
    spf_fail: Literal["score", "reject"] = "score"
    # DMARC (RFC 7489 §6.6): the From domain's policy applied; "quarantine" turns its
    # p=reject into delivery to the Junk mailbox; "none" only records and scores.
    dmarc: Literal["apply", "quarantine", "none"] = "apply"
    # DNS blocklists asked about each client address, e.g. ["zen.spamhaus.org"].
    dnsbl_zones: tuple[str, ...] = ()
    # A listed client: "reject" 554 5.7.1 with the list's reason (at RCPT), or "score".
    dnsbl_action: Literal["reject", "score"] = "reject"
    # Scores at or over this go to the recipient's Junk mailbox; at or over reject_threshold
    # are refused 550 5.7.1 at the end of the data.
    junk_threshold: float = 5.0
    reject_threshold: float = 15.0
    junk_mailbox: str = "Junk"
    weights: dict[str, float] = field(default_factory=dict, metadata={"check": check_weights})

    def weight(self, signal: str) -> float:
        return self.weights.get(signal, DEFAULT_WEIGHTS[signal])

    def problems(self) -> list[tuple[str, str]]:
        if self.reject_threshold < self.junk_threshold:
            return [("reject_threshold", f"{self.reject_threshold} is below junk_threshold {self.junk_threshold}")]
        return []


@dataclass(frozen=True)
class ClamAVConfig:
    """Every message, received and submitted, scanned by a running clamd (clamav-daemon)."""
    enabled: bool = False
    # "unix:/run/clamav/clamd.ctl" (Debian's clamd socket) or "host:port" (TCP, 3310).
    address: str = "unix:/run/clamav/clamd.ctl"
    # How long a scan may take, connect to verdict.
    timeout: Duration = field(default=Duration(30), metadata={"min": 1, "max": 600})
    # clamd down or too slow: "tempfail" answers 451 4.7.1 (the sender tries again later);
    # "accept" delivers with an X-Virus-Scanned: header saying it was not scanned.
    on_failure: Literal["tempfail", "accept"] = "tempfail"


def check_networks(value: tuple[str, ...]) -> None:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or network: {item!r}") from None


@dataclass(frozen=True)
class RatesConfig:
    """Token buckets, shared by every mtad process of the data dir (<data_dir>/rates.lmdb).
    0 turns a limit off."""
    # Per client address, per minute, on the MX: connections (421 4.7.0), messages and
    # recipients (450 4.7.1).
    connections_per_minute: int = field(default=60, metadata={"min": 0, "max": 1_000_000})
    messages_per_minute: int = field(default=120, metadata={"min": 0, "max": 1_000_000})
    recipients_per_minute: int = field(default=600, metadata={"min": 0, "max": 1_000_000})
    # Per authenticated user, on submission (450 4.7.1).
    user_messages_per_hour: int = field(default=300, metadata={"min": 0, "max": 1_000_000})
    user_messages_per_day: int = field(default=1000, metadata={"min": 0, "max": 1_000_000})
    user_recipients_per_hour: int = field(default=1000, metadata={"min": 0, "max": 1_000_000})
    user_recipients_per_day: int = field(default=3000, metadata={"min": 0, "max": 1_000_000})
    # Addresses or networks no limit applies to (a backup MX, a monitoring host); loopback
    # by default.
    exempt: tuple[str, ...] = field(default=("127.0.0.1", "::1"), metadata={"check": check_networks})


@dataclass(frozen=True)
class GreylistConfig:
    """Greylisting (off by default): the first message of an unknown (client network,
    sender, recipient) is answered 451 4.7.1; a retry after `delay` is accepted."""
    enabled: bool = False
    delay: Duration = field(default=Duration(300), metadata={"min": 0, "max": 86400})
    # A retry later than this after the first try counts as a new first try.
    retry_window: Duration = field(default=Duration(2 * 86400), metadata={"min": 60, "max": 30 * 86400})
    # A triplet that passed is remembered this long after its last message.
    expire: Duration = field(default=Duration(35 * 86400), metadata={"min": 3600, "max": 365 * 86400})

    def problems(self) -> list[tuple[str, str]]:
        if self.delay >= self.retry_window:
            return [("delay", f"{self.delay} is not shorter than retry_window {self.retry_window}: no retry "
                              "could ever pass")]
        return []


@dataclass(frozen=True)
class StorageConfig:
    # Fixed when the data dir is initialised; changing it later is refused, not re-mapped.
    shards: int = field(default=16, metadata={"min": 1, "max": 1024})
    # A message received again by SMTP (same Message-ID and the same bytes from its sender)
    # within this long is answered 250 and not stored twice: a sender that lost our 250
    # sends it again. 0: off.
    dedupe_window: Duration = field(default=Duration(24 * 3600), metadata={"min": 0, "max": 30 * 86400})


@dataclass(frozen=True)
class AccountsConfig:
    # "alice+news@example.org" reaches alice; "" turns sub-addressing off.
    recipient_delimiter: str = field(default="+", metadata={"check": check_delimiter})
    # argon2id's cost for each password hashed from now on (RFC 9106 §4): the memory, passes
    # and lanes of every hash and every login's check. The defaults are RFC 9106's second
    # recommended option. A stored hash is checked at the cost it was made with, and made
    # again at these at its user's next login.
    password_memory: Size = field(default=Size(64 * MiB), metadata={"min": 8 * KiB, "max": 4 * 1024 * MiB})
    password_passes: int = field(default=3, metadata={"min": 1, "max": 32})
    password_lanes: int = field(default=4, metadata={"min": 1, "max": 64})

    def problems(self) -> list[tuple[str, str]]:
        if self.password_memory < 8 * KiB * self.password_lanes:  # argon2's own floor (RFC 9106 §3.1)
            return [("password_memory", f"at least 8K per lane: {self.password_lanes} lanes need "
                                        f"{8 * self.password_lanes}K")]
        return []


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics over HTTP (docs/metrics.md); off when listen is empty."""
    # Where GET /metrics answers, e.g. ["127.0.0.1:9154"]. No authentication and no TLS:
    # a loopback or private address, or a firewall in front. Under `postroom serve`, serve
    # answers it for every daemon process; with the daemons as separate units, the first of
    # them to start does, and another takes over when it stops.
    listen: tuple[ListenAddress, ...] = ()


def check_endpoints(value: tuple[str, ...]) -> None:
    from urllib.parse import urlsplit

    for item in value:
        url = urlsplit(item)
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ValueError(f"not an etcd endpoint URL like http://10.0.0.1:2379: {item!r}")


def check_command(value: str) -> None:
    import string

    try:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as e:
        raise ValueError(f"not a command template: {e}") from None
    unknown = sorted(names - {"shard", "path"})
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}: the command may use {{shard}} and {{path}}")


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes sharing the shards (cluster/): each shard owned by one node at a time,
    through etcd. Without etcd endpoints (the default) this node is alone, as ever."""
    # The etcd cluster's client URLs, e.g. ["http://10.0.0.1:2379", "http://10.0.0.2:2379"].
    etcd: tuple[str, ...] = field(default=(), metadata={"check": check_endpoints})
    # This node's name, unique in the cluster; empty: [server] hostname.
    node: str = ""
    # The host (IP or name) other nodes reach this node on; empty: [server] hostname.
    address: str = ""
    # The ports on `address` other nodes use: LMTP hand-off of mail for this node's shards,
    # and IMAP and POP3 sessions proxied here. 0: the port of the first [imap] listen (or
    # [pop3] listen) address.
    lmtp_port: int = field(default=24, metadata={"min": 1, "max": 65535})
    imap_port: int = field(default=0, metadata={"min": 0, "max": 65535})
    pop3_port: int = field(default=0, metadata={"min": 0, "max": 65535})
    # How long a node's claims outlive its last keepalive.
    lease_ttl: Duration = field(default=Duration(10), metadata={"min": 2, "max": 600})
    prefix: str = "/postroom/"
    # Commands run before this node takes a shard, and after it released one; {shard} is
    # its number, {path} its directory. Empty: nothing to run (volumes are directories).
    attach: str = field(default="", metadata={"check": check_command})
    detach: str = field(default="", metadata={"check": check_command})
    # How long shards released together (a drain, a rebalance) wait for every process of the
    # node to let go of them before their volumes are detached all the same (at a stop:
    # [server] stop_grace). A message still arriving or being sent may hold one that long.
    let_go_wait: Duration = field(default=Duration(10), metadata={"min": 1, "max": 600})

    @property
    def enabled(self) -> bool:
        return bool(self.etcd)

    def problems(self) -> list[tuple[str, str]]:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            return [("prefix", f"{self.prefix!r} must begin and end with '/'")]
        if self.node and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", self.node):
            return [("node", f"{self.node!r}: letters, digits, '.', '_' and '-' only")]
        return []


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    srs: SRSConfig = field(default_factory=SRSConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    dns: DNSConfig = field(default_factory=DNSConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    clamav: ClamAVConfig = field(default_factory=ClamAVConfig)
    rates: RatesConfig = field(default_factory=RatesConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Where it was read from, for messages; not a key of the file.
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})
