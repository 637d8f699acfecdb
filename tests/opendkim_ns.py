"""Run Debian's `opendkim-testmsg` (verify mode) against TXT records we serve ourselves.

opendkim-testmsg looks keys up in DNS through the C library's resolver, which reads
/etc/resolv.conf and asks port 53: it cannot be pointed at a test server on another port.
So tests/test_dkim.py runs this script under `unshare --net --mount --map-root-user`: in a
network namespace of its own, loopback is ours and port 53 is free; in a mount namespace of
its own, a resolv.conf naming 127.0.0.1 is bind-mounted over /etc/resolv.conf. Nothing
outside the namespaces sees either.

    unshare --net --mount --map-root-user python opendkim_ns.py RECORDS.json < message

RECORDS.json maps a DNS name ("s1._domainkey.example.test") to TXT text. The exit status
and stderr are opendkim-testmsg's (0: a signature verified); the DNS names asked go to
stdout, one a line, so a test can tell "no DNS" from "bad signature".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset


def serve(sock: socket.socket, records: dict[str, str], asked: list[str]) -> None:
    zone = {dns.name.from_text(name): text.encode() for name, text in records.items()}
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        asked.append(question.name.to_text())
        text = zone.get(question.name)
        if text is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            strings = [text[i:i + 255] for i in range(0, len(text), 255)]
            rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
            response.answer.append(dns.rrset.from_rdata(question.name, 60, rdata))
        sock.sendto(response.to_wire(), peer)


def main() -> int:
    records = json.loads(open(sys.argv[1]).read())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    asked: list[str] = []
    threading.Thread(target=serve, args=(sock, records, asked), daemon=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf", delete=False) as f:
        f.write("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
    try:
        subprocess.run(["mount", "--bind", f.name, "/etc/resolv.conf"], check=True)
        result = subprocess.run(["opendkim-testmsg"], stdin=sys.stdin, capture_output=True, timeout=60)
    finally:
        os.unlink(f.name)
    sys.stdout.write("".join(name + "\n" for name in asked))
    sys.stderr.buffer.write(result.stderr + result.stdout)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
