"""An authoritative DNS server on loopback for a test's zone (dnspython), UDP and TCP.

    with DNSZone({"example.net": {"MX": ["10 mx1.example.net."]},
                  "mx1.example.net": {"A": ["127.0.0.1"]}},
                 servfail={"broken.example"}, silent={"slow.example"}) as zone:
        ... [dns] nameservers = ["127.0.0.1"], port = zone.port ...

A name in `records` answers its records (TTL 0: no resolver keeps them), or NOERROR with no
data for a type it lacks; a name not there is NXDOMAIN; a name in `servfail` (or under it)
answers SERVFAIL; one in `silent` never answers (a timeout). A null MX is "0 .".
Every query is counted in `queries`, as (name, type). `update(records)` changes the zone
while it serves. Each server is a thread with its own socket; `close()` stops both.
"""

from __future__ import annotations

import socket
import struct
import threading

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
                 silent: set[str] = frozenset(), port: int = 0):
        self.update(records)
        self.servfail = {n.lower().rstrip(".") for n in servfail}
        self.silent = {n.lower().rstrip(".") for n in silent}
        self.queries: list[tuple[str, str]] = []
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
        if any(name == n or name.endswith("." + n) for n in self.silent):
            return None
        if any(name == n or name.endswith("." + n) for n in self.servfail):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        types = self.records.get(name)
        if types is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        texts = types.get(rdtype, [])
        if texts:
            rdatas = [dns.rdata.from_text(dns.rdataclass.IN, question.rdtype, text) for text in texts]
            response.answer.append(dns.rrset.from_rdata_list(question.name, 0, rdatas))
        return response.to_wire()

    def _serve_udp(self) -> None:
        while not self._closed:
            try:
                wire, peer = self._udp.recvfrom(65535)
            except OSError:
                return
            reply = self.answer(wire)
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

