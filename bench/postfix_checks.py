"""Postfix running the checks Postroom's policy chain runs, as a sysadmin would set it up
on Debian: the peer for `bench/smtp_in.py --compare-postfix --policy`.

    with PostfixChecks(work, dns_port=..., clamd=...) as checks:
        start_postfix(work, main_cf + checks.main_cf, master_cf=checks.master_cf,
                      wrapper=checks.wrapper)

The same checks against the same DNS zone and the same clamd as Postroom's chain:
- SPF of the MAIL FROM: postfix-policyd-spf-python (`check_policy_service`, spawned by
  Postfix's master; loopback not in its skip_addresses, so it checks);
- DNSBL: `reject_rbl_client` on the zone Postroom asks;
- DKIM verified: opendkim (`Mode v`), a milter;
- DMARC: opendmarc, a milter, reading opendkim's and policyd-spf's results;
- the virus scan: clamav-milter streaming each message to the same clamd;
- rates: anvil counting connections and messages per client (far above the load), as
  Postroom's rate tables count them.
ARC has no Debian milter (openarc is not packaged); the benchmark's message carries no ARC
set, so Postroom's ARC check is a header scan that finds none.

DNS: Postroom's resolver caches answers for their TTL; Postfix, policyd-spf and the
milters ask the system's resolver, which caches nothing. Debian's advice for a mail server
is a local caching resolver, so this runs unbound on 127.0.0.3:53 forwarding to the zone,
and every process of the peer finds it through /etc/resolv.conf: they run in a mount
namespace of their own (`unshare --mount`) where a copy naming 127.0.0.3 is bind-mounted
over it. The machine's own resolv.conf is not touched.

Everything (configs, sockets, pid files) is under `work`; the milters and unbound are
children of this process, stopped by PID at the end. Their CPU counts as Postfix's
(`pids()`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


AUTHSERV_ID = "postfix.bench.test"
DNSBL_ZONE = "bl.example"
READY_TIMEOUT = 30.0
# unbound's address: on loopback, and not 127.0.0.1, where a machine's own resolver may listen.
RESOLVER = "127.0.0.3"


def checks_available() -> list[str]:
    """The programs missing for the checks (empty: all there)."""
    programs = {"opendkim": "/usr/sbin/opendkim", "opendmarc": "/usr/sbin/opendmarc",
                "clamav-milter": "/usr/sbin/clamav-milter", "policyd-spf": "/usr/bin/policyd-spf",
                "unbound": "/usr/sbin/unbound", "unshare": shutil.which("unshare") or ""}
    return [name for name, path in programs.items() if not path or not Path(path).exists()]


class PostfixChecks:
    """unbound and the three milters, started in `work`/checks; `main_cf`, `master_cf` and
    `wrapper` for start_postfix."""

    def __init__(self, work: Path, *, dns_port: int, clamd: str):
        self.dir = work / "checks"
        self.dir.mkdir(parents=True)
        self.dir.chmod(0o755)
        self.dns_port = dns_port
        self.clamd = clamd
        self.processes: list[subprocess.Popen] = []
        self.resolv = self.dir / "resolv.conf"
        self.resolv.write_text(f"nameserver {RESOLVER}\noptions timeout:2 attempts:2\n")
        # Unix sockets, as Debian's packages set them up: over loopback TCP each milter's
        # small writes met delayed ACKs, 100 ms a message for opendkim and clamav-milter.
        self.milters = {name: self.dir / f"{name}.sock" for name in ("opendkim", "opendmarc", "clamav-milter")}

    # -- what Postfix is given --------------------------------------------------------------

    @property
    def wrapper(self) -> list[str]:
        """A command prefix: run the rest in a mount namespace whose /etc/resolv.conf names
        the local unbound."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.resolv)]

    @property
    def main_cf(self) -> str:
        milters = ", ".join(f"unix:{path}" for path in self.milters.values())
        # No permit_mynetworks, and no exception from anvil's limits (by default, mynetworks):
        # the client, on loopback as mynetworks has it, is checked and counted.
        return f"""smtpd_recipient_restrictions = reject_unauth_destination, reject_rbl_client {DNSBL_ZONE},
    check_policy_service unix:private/policyd-spf
policyd-spf_time_limit = 3600
smtpd_client_event_limit_exceptions =
smtpd_client_connection_rate_limit = 1000000
smtpd_client_message_rate_limit = 1000000
smtpd_client_recipient_rate_limit = 1000000
smtpd_milters = {milters}
non_smtpd_milters =
milter_default_action = tempfail
"""

    @property
    def master_cf(self) -> str:
        return (f"policyd-spf unix - n n - 0 spawn\n"
                f"  user=policyd-spf argv=/usr/bin/policyd-spf {self.dir / 'policyd-spf.conf'}\n")

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    # -- the processes ------------------------------------------------------------------------

    def __enter__(self) -> PostfixChecks:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        d = self.dir
        (d / "unbound.conf").write_text(f"""server:
    interface: {RESOLVER}
    port: 53
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    chroot: ""
    username: ""
    directory: "{d}"
    pidfile: "{d / 'unbound.pid'}"
    use-syslog: no
    logfile: ""
    verbosity: 0
    module-config: "iterator"
    num-threads: 1
    local-zone: "example." transparent
    local-zone: "test." transparent
    domain-insecure: "."
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{self.dns_port}
""")
        self._spawn("unbound", ["/usr/sbin/unbound", "-d", "-c", str(d / "unbound.conf")], tcp=(RESOLVER, 53))
        (d / "opendkim.conf").write_text(f"""Mode v
Socket local:{self.milters['opendkim']}
UMask 000
AuthservID {AUTHSERV_ID}
Syslog no
PidFile {d / 'opendkim.pid'}
Nameservers {RESOLVER}
""")
        self._spawn("opendkim", ["/usr/sbin/opendkim", "-f", "-x", str(d / "opendkim.conf")],
                    unix=self.milters["opendkim"])
        (d / "ignore-hosts").write_text("192.0.2.1\n")  # its default, 127.0.0.1, is the benchmark's client
        (d / "opendmarc.conf").write_text(f"""Socket local:{self.milters['opendmarc']}
UMask 000
AuthservID {AUTHSERV_ID}
TrustedAuthservIDs {AUTHSERV_ID}
SPFSelfValidate true
IgnoreHosts {d / 'ignore-hosts'}
RejectFailures false
Syslog false
PidFile {d / 'opendmarc.pid'}
""")
        self._spawn("opendmarc", ["/usr/sbin/opendmarc", "-f", "-c", str(d / "opendmarc.conf")],
                    unix=self.milters["opendmarc"])
        clamd = self.clamd if self.clamd.startswith("unix:") else f"tcp:{self.clamd}"
        (d / "clamav-milter.conf").write_text(f"""MilterSocket unix:{self.milters['clamav-milter']}
MilterSocketMode 666
ClamdSocket {clamd}
Foreground yes
PidFile {d / 'clamav-milter.pid'}
OnInfected Reject
OnFail Defer
AddHeader Replace
LogSyslog no
MaxFileSize 25M
""")
        self._spawn("clamav-milter", ["/usr/sbin/clamav-milter", "-c", str(d / "clamav-milter.conf")],
                    unix=self.milters["clamav-milter"])
        # Debian's defaults but for skip_addresses, whose default (loopback) would skip the
        # benchmark's every message.
        (d / "policyd-spf.conf").write_text("""debugLevel = 0
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 192.0.2.0/24
""")

    def _spawn(self, name: str, command: list[str], *, tcp: tuple[str, int] | None = None, unix: Path | None = None) -> None:
        with open(self.dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen([*self.wrapper, *command], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.processes.append(process)
        deadline = time.monotonic() + READY_TIMEOUT
        while not (_listening(tcp) if tcp else unix.exists()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} is not ready: see {self.dir / (name + '.log')}")
            time.sleep(0.05)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _listening(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False
