"""An authoritative DNS server on loopback for a test's zone (dnspython), UDP and TCP.

    with DNSZone({"example.net": {"MX": ["10 mx1.example.net."]},
                  "mx1.example.net": {"A": ["127.0.0.1"]}},
                 servfail={"broken.example"}, silent={"slow.example"}) as zone:
        ... [dns] nameservers = ["127.0.0.1"], port = zone.port ...

A name in `records` answers its records, or NOERROR with no data for a type it lacks; a name
not there is NXDOMAIN; a name in `servfail` (or under it) answers SERVFAIL; one in `silent`
never answers (a timeout); one in `slow` (or under it) answers after that many seconds,
without holding up the answers to other queries. A null MX is "0 .". Records are in zone
file text, so a TXT record of several strings is '"v=spf1 ip4:127.0.0.0/8 " "-all"'.

Answers carry `ttl` (0 by default: no resolver keeps them). With a ttl, negative answers
carry an SOA whose minimum is that ttl, so a resolver may keep those too (RFC 2308 §5:
without an SOA it should not).

Every query is counted in `queries`, as (name, type), and in `arrivals` with the time it
arrived (time.monotonic()). `update(records)` changes the zone
while it serves. Each server is a thread with its own socket; `close()` stops both.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from conftest import free_port

LOOPBACK = "127.0.0.1"


class DNSZone:
    def __init__(self, records: dict[str, dict[str, list[str]]], *, servfail: set[str] = frozenset(),
                 silent: set[str] = frozenset(), slow: dict[str, float] | None = None,
                 ttl: int = 0, port: int = 0):
        self.update(records)
        self.servfail = {n.lower().rstrip(".") for n in servfail}
        self.silent = {n.lower().rstrip(".") for n in silent}
        self.slow = {n.lower().rstrip("."): float(delay) for n, delay in (slow or {}).items()}
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self.arrivals: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._udp, self._tcp = _bind_both(port)
        self.port = self._udp.getsockname()[1]
        self._closed = False
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for thread in self._threads:
            thread.start()

    def update(self, records: dict[str, dict[str, list[str]]]) -> None:
        self.records = {name.lower().rstrip("."): types for name, types in records.items()}

    def __enter__(self) -> DNSZone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for sock in (self._udp, self._tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def delay(self, wire: bytes) -> float:
        """How long to wait before answering this query (`slow`)."""
        try:
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text(omit_final_dot=True).lower()
        except Exception:
            return 0.0
        return max((d for n, d in self.slow.items() if name == n or name.endswith("." + n)), default=0.0)

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            self.arrivals.append((time.monotonic(), name, rdtype))
        if any(name == n or name.endswith("." + n) for n in self.silent):
            return None
        if any(name == n or name.endswith("." + n) for n in self.servfail):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        types = self.records.get(name)
        if types is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response)
            return response.to_wire()
        texts = types.get(rdtype, [])
        if texts:
            rdatas = [dns.rdata.from_text(dns.rdataclass.IN, question.rdtype, text) for text in texts]
            response.answer.append(dns.rrset.from_rdata_list(question.name, self.ttl, rdatas))
        else:
            self._add_soa(response)
        return response.to_wire()

    def _add_soa(self, response: dns.message.Message) -> None:
        """The SOA of a negative answer, whose minimum is the negative TTL (RFC 2308 §3)."""
        if self.ttl:
            soa = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA,
                                      f"ns.test. hostmaster.test. 1 3600 600 86400 {self.ttl}")
            response.authority.append(dns.rrset.from_rdata_list(dns.name.root, self.ttl, [soa]))

    def _serve_udp(self) -> None:
        while not self._closed:
            try:
                wire, peer = self._udp.recvfrom(65535)
            except OSError:
                return
            delay = self.delay(wire)
            if delay:
                timer = threading.Timer(delay, self._answer_udp, args=(wire, peer))
                timer.daemon = True
                timer.start()
            else:
                self._answer_udp(wire, peer)

    def _answer_udp(self, wire: bytes, peer: tuple) -> None:
        reply = None if self._closed else self.answer(wire)
        if reply is not None:
            try:
                self._udp.sendto(reply, peer)
            except OSError:
                pass

    def _serve_tcp(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_tcp_connection, args=(conn,), daemon=True).start()

    def _serve_tcp_connection(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    head = _read_exactly(conn, 2)
                    if head is None:
                        return
                    wire = _read_exactly(conn, struct.unpack("!H", head)[0])
                    if wire is None:
                        return
                    time.sleep(self.delay(wire))
                    reply = self.answer(wire)
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return


def _bind_both(port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on one loopback port: `port`, or one from this test process's
    range (conftest.free_port: below the ephemeral range, where clients could take it)."""
    for _ in range(1 if port else 50):
        number = port or free_port()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((LOOPBACK, number))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((LOOPBACK, number))
            tcp.listen(16)
            return udp, tcp
        except OSError:
            udp.close()
            tcp.close()
            if port:
                raise
    raise RuntimeError("no loopback port free for both UDP and TCP")


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data

