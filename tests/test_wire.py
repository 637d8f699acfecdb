"""wire/: the connection plumbing imapd and pop3d share, tested alone.

A toy line protocol (`SAY x` answered at once, `SLOW x` answered by a coroutine) subclasses
wire.protocol's base and listens on loopback through postroom.ports, the way imapd and
pop3d do, on Twisted's reactor over this module's asyncio loop; asyncio stream clients talk
to it. The daemons' own tests (test_imapd, test_pop3, test_stop) cover the same plumbing
end to end with real clients.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conf.values import ListenAddress
from postroom.ports import TwistedListening, install_reactor, listen_twisted
from wire.connections import ConnectionLimit
from wire.protocol import ServerFactory, ServerProtocol

TIMEOUT = 5.0


class LineFactory(ServerFactory):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.waited: list[bytes] = []  # WAIT commands that ran to their end

    def buildProtocol(self, addr):  # noqa: N802
        return LineProtocol(self)


class LineProtocol(ServerProtocol):
    def __init__(self, factory: LineFactory):
        super().__init__(factory)
        self.buffer = bytearray()

    def refusal(self) -> bytes:
        return b"NO too many connections\r\n"

    def timeout_reply(self) -> bytes:
        return b"BYE idle\r\n"

    def shutdown_reply(self) -> bytes:
        return b"BYE stopping\r\n"

    def first_timeout(self) -> float:
        return 60.0

    def started(self) -> None:
        self.write(b"HELLO\r\n")

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def buffered(self) -> int:
        return len(self.buffer)

    def next_event(self):
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return None
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        return line

    def fault_reply(self) -> bytes:
        return b"BYE internal error\r\n"

    def dispatch(self, line):
        verb, _, text = line.partition(b" ")
        if verb == b"BUG":
            raise RuntimeError("secret detail")  # a bug in the core, met while dispatching
        if verb == b"SLOWBUG":
            return self._bug()
        if verb == b"SLOW":
            return self._slow(text)
        if verb == b"WAIT":
            return self._wait(text)
        if verb == b"BIG":
            return self._big(int(text))
        self.write(text + b"\r\n")
        return None

    async def _bug(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("secret detail")

    async def _big(self, chunks: int) -> None:
        """An answer sent as the client takes it: a big FETCH or RETR."""
        for _ in range(chunks):
            self.write(b"y" * 65536)
            await self.drain()
        self.factory.waited.append(b"big")

    async def _wait(self, text: bytes) -> None:
        """A command that takes seconds: a long SEARCH, an APPEND's commit on a slow disk."""
        await asyncio.sleep(float(text))
        self.factory.waited.append(text)
        self.write(text + b"\r\n")

    async def _slow(self, text: bytes) -> None:
        for _ in range(5):  # a few turns of the loop, as a store call in a thread takes
            await asyncio.sleep(0)
        self.write(text + b"\r\n")


@pytest.fixture(scope="module")
def loop():
    """One loop for the module: Twisted's reactor is installed on it once per process."""
    loop = asyncio.new_event_loop()

    async def install() -> None:
        install_reactor()

    loop.run_until_complete(install())
    yield loop
    loop.close()


def serve(loop, limit: ConnectionLimit) -> tuple[LineFactory, TwistedListening, int]:
    factory = LineFactory(connections=limit, tls=None, implicit_tls=False)

    async def start():
        return listen_twisted(factory, [ListenAddress("127.0.0.1", 0)], backlog=16)

    ports = loop.run_until_complete(start())
    return factory, TwistedListening(ports), ports[0].getHost().port


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"HELLO\r\n"
    return reader, writer


def test_limit_counts_per_ip_and_in_all():
    limit = ConnectionLimit(max_total=3, max_per_ip=2)
    assert [limit.admit("a"), limit.admit("a"), limit.admit("a")] == [True, True, False]
    assert limit.admit("b") is True
    assert limit.admit("c") is False and limit.total == 3
    limit.release("a")
    assert limit.admit("c") is True
    for ip in ("a", "b", "c"):
        limit.release(ip)
    assert limit.total == 0 and limit.admit("a") and limit.admit("a")


def test_pipelined_commands_are_answered_in_order(loop):
    factory, listening, port = serve(loop, ConnectionLimit(10, 10))

    async def talk() -> bytes:
        reader, writer = await connect(port)
        # The slow one runs alone: the quick one behind it waits for it, not overtakes it.
        writer.write(b"SLOW one\r\nSAY two\r\nSLOW three\r\nSAY four\r\n")
        answers = b"".join([await asyncio.wait_for(reader.readline(), TIMEOUT) for _ in range(4)])
        writer.close()
        return answers

    try:
        assert loop.run_until_complete(talk()) == b"one\r\ntwo\r\nthree\r\nfour\r\n"
    finally:
        loop.run_until_complete(listening.stop())


@pytest.mark.parametrize("verb", [b"BUG", b"SLOWBUG"])
def test_a_bug_in_the_core_ends_only_its_connection_with_last_words(loop, verb):
    """A bug (an exception other than the protocol's own errors) while taking or answering a
    command: that client hears the fault reply (never the exception's text) and is closed,
    and the others go on. Before, one escaping the framer dropped the connection in silence."""
    factory, listening, port = serve(loop, ConnectionLimit(10, 10))

    async def talk() -> tuple[bytes, bytes]:
        reader, writer = await connect(port)
        other_reader, other_writer = await connect(port)
        writer.write(verb + b" x\r\nSAY never\r\n")
        last = await asyncio.wait_for(reader.read(), TIMEOUT)  # to EOF: the connection is closed
        other_writer.write(b"SAY still here\r\n")
        other = await asyncio.wait_for(other_reader.readline(), TIMEOUT)
        writer.close()
        other_writer.close()
        return last, other

    try:
        last, other = loop.run_until_complete(talk())
    finally:
        loop.run_until_complete(listening.stop())
    assert last == b"BYE internal error\r\n"
    assert other == b"still here\r\n"


def test_connection_over_the_limit_is_refused_and_released_ones_free_a_place(loop):
    factory, listening, port = serve(loop, ConnectionLimit(10, 1))

    async def talk() -> tuple[bytes, bytes, bytes]:
        reader, writer = await connect(port)
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader2.read(), TIMEOUT)  # to the end: we closed it
        writer2.close()
        writer.write(b"SAY still here\r\n")
        answer = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        await asyncio.wait_for(factory.none_live(), TIMEOUT)  # the server side sees the close a turn later
        reader3, writer3 = await connect(port)  # the place is free again
        writer3.write(b"SAY back\r\n")
        again = await asyncio.wait_for(reader3.readline(), TIMEOUT)
        writer3.close()
        return refused, answer, again

    try:
        refused, answer, again = loop.run_until_complete(talk())
    finally:
        loop.run_until_complete(listening.stop())
    assert refused == b"NO too many connections\r\n"
    assert answer == b"still here\r\n"
    assert again == b"back\r\n"


def test_shutdown_tells_every_client_and_returns_once_they_are_gone(loop):
    factory, listening, port = serve(loop, ConnectionLimit(10, 10))
    grace = 10.0

    async def stop_with_clients() -> tuple[list[bytes], float]:
        clients = [await connect(port) for _ in range(3)]
        started = time.monotonic()
        await factory.shutdown(grace)
        took = time.monotonic() - started
        heard = [await asyncio.wait_for(reader.read(), TIMEOUT) for reader, _ in clients]
        for _, writer in clients:
            writer.close()
        return heard, took

    try:
        heard, took = loop.run_until_complete(stop_with_clients())
    finally:
        loop.run_until_complete(listening.stop())
    assert heard == [b"BYE stopping\r\n"] * 3
    assert not factory.live
    # Woken by the last connection's end, not by the grace period running out.
    assert took < grace / 4, took


def test_shutdown_waits_for_commands_within_the_grace_and_not_for_clients_that_do_not_read(loop):
    """A stop gives a command under way the grace ([server] stop_grace) to end and be
    answered (an APPEND's OK: without it the client appends again), and a client
    that takes nothing GOODBYE_WAIT: its socket goes with the process; a command waiting for
    such a client to read is cut off once it has taken nothing for STALL_WAIT, while one
    whose client goes on reading (a RETR to a slow link) ends within the grace and is told.
    Before, a client that did not read held the stop for the whole grace, and one that read
    steadily was cut off (its transport's buffer was full at the moment of the stop)."""
    from wire.protocol import GOODBYE_WAIT, STALL_WAIT

    factory, listening, port = serve(loop, ConnectionLimit(10, 10))
    grace = 8.0

    async def stop_while_busy() -> tuple[float, bytes]:
        reader, writer = await connect(port)
        writer.write(b"WAIT 3\r\nSAY never taken\r\n")
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await factory.shutdown(grace)
        took = time.monotonic() - started
        heard = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        return took, heard

    async def stop_with_a_client_that_does_not_read() -> float:
        reader, writer = await connect(port)
        line = b"SAY " + b"x" * 30000 + b"\r\n"  # within the protocol's read-ahead
        for _ in range(700):  # 21 MB of answers: more than both sockets' buffers hold
            writer.write(line)
        await asyncio.sleep(1.0)
        assert factory.live and not all(protocol.writable() for protocol in factory.live), [(p.writable(), p.busy, p.buffered()) for p in factory.live]
        started = time.monotonic()
        await factory.shutdown(grace)
        took = time.monotonic() - started
        writer.transport.abort()
        return took

    async def stop_with_a_command_waiting_for_the_client() -> float:
        reader, writer = await connect(port)
        writer.write(b"BIG 400\r\n")  # 26 MB, and the client reads none of it
        await asyncio.sleep(1.0)
        assert any(protocol.busy and not protocol.writable() for protocol in factory.live)
        started = time.monotonic()
        await factory.shutdown(grace)
        took = time.monotonic() - started
        writer.transport.abort()
        return took

    async def stop_with_a_client_reading_slowly() -> tuple[float, int, bytes]:
        reader, writer = await connect(port)
        writer.write(b"BIG 320\r\n")  # 21 MB, more than the sockets hold; taken at <16 MB/s
        taken = bytearray()
        while len(taken) < 2 << 20:  # reading, and our buffers full: the command waits on us
            taken += await asyncio.wait_for(reader.read(65536), TIMEOUT)
            await asyncio.sleep(0.004)
        assert any(protocol.busy for protocol in factory.live)
        started = time.monotonic()
        stop = asyncio.ensure_future(factory.shutdown(grace))
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            taken += chunk
            await asyncio.sleep(0.004)
        await stop
        writer.close()
        return time.monotonic() - started, len(taken), bytes(taken[-20:])

    try:
        took, heard = loop.run_until_complete(stop_while_busy())
        assert factory.waited == [b"3"], "the command was cut off by the stop"
        assert 2.5 < took < grace - 2, took
        # Its answer, then the goodbye; what was pipelined behind it is not taken.
        assert heard == b"3\r\nBYE stopping\r\n", heard
        took = loop.run_until_complete(stop_with_a_client_that_does_not_read())
        assert took < GOODBYE_WAIT + STALL_WAIT + 1.5, took
        took = loop.run_until_complete(stop_with_a_command_waiting_for_the_client())
        assert took < GOODBYE_WAIT + STALL_WAIT + 1.5, took
        assert b"big" not in factory.waited, "the command was not cut off"
        took, size, tail = loop.run_until_complete(stop_with_a_client_reading_slowly())
        assert factory.waited.count(b"big") == 1, "the slow reader's command was cut off"
        # The whole answer, then the goodbye.
        assert size == 320 * 65536 + len(b"BYE stopping\r\n") and tail.endswith(b"yBYE stopping\r\n"), (size, tail)
        assert took < grace, took
    finally:
        loop.run_until_complete(listening.stop())
