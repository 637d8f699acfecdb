"""Connection limits: in all, and per client address (one service's listeners share them).

Beyond either limit a new connection is told to come back later and closed before it
costs anything (SMTP 421 4.7.0, IMAP BYE [UNAVAILABLE], POP3 -ERR [SYS/TEMP]). Counted by
the connection plumbing of every daemon (mtad's InboundSMTP, wire.protocol for imapd and
pop3d) as connections open and close: no check of the mail itself, so not policy."""

from __future__ import annotations


class ConnectionLimit:
    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        """Count a new connection from `ip`; False (and not counted) beyond a limit."""
        if self.total >= self.max_total or self._per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        """An admitted connection from `ip` ended."""
        left = self._per_ip.get(ip, 1) - 1
        if left:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
        self.total = max(0, self.total - 1)
