"""The in-process IMAP test tier: scripted client lines in, the server's answers out, through
the daemon's own Session (imapd.session) over a real store in a tmp dir, without sockets,
TLS or Twisted. Like mox's `tc.transactf("ok", "select inbox")`:

    imap = server.login(user)                      # a session, logged in with LOGIN
    reply = imap.transact("ok", "SELECT INBOX")    # the tagged status is checked
    assert "1 EXISTS" in reply.untagged            # untagged responses, "* " and CRLF off
    assert reply.code == "READ-WRITE"

What stands in for imapd.protocol is its reading half, done the same way: bytes go through
the real Framer and parse_command, a Continue is answered `+ Ready for literal data`, a
Reject and a ParseError go to the session as the protocol gives them, and each command runs
to its tagged answer before the next frame is read. Store calls run in worker threads as
in the daemon; the only difference is the loop, which this module runs while a test waits
for an answer. What needs the wire (TLS, STARTTLS, flow control, timeouts, real clients)
stays in test_imapd.py.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import conf
from conftest import CHEAP_HASHER, render_config  # password hashes: real argon2id at the smallest cost
from imapd.parser import Frame, Framer
from imapd.recent import RecentClaims
from imapd.session import LOGOUT, IMAPContext, Session
from imapd.view import Snapshots
from policy.logins import LoginThrottle
from postroom.datadir import open_store
from storage import Accounts, Watcher, open_data_dir
from wire.connections import ConnectionLimit

PASSWORD = "correct horse battery staple"
MAX_LINE = 64 * 1024  # as imapd.protocol
WAIT = 5.0  # seconds a test waits for an answer before it fails
_LITERAL_END = re.compile(rb"\{(\d+)\+?\}\r\n\Z")


@dataclass
class Reply:
    """A command's answer: `untagged` responses (as text where they decode as UTF-8, "* " and
    CRLF off, a literal kept inside its response), the tagged `status`, `code` and `text`."""

    untagged: list[str]
    status: str
    code: str | None
    text: str
    raw: bytes  # every byte written, the tagged line included

    def named(self, name: str) -> list[str]:
        """The untagged responses of one kind, without the name: named("EXISTS") -> ["3"]
        (the number before the name), named("LIST") -> ['(\\\\HasNoChildren) "/" INBOX']."""
        out = []
        for line in self.untagged:
            words = line.split(" ", 2)
            if words[0] == name:
                out.append(line[len(name) + 1:])
            elif len(words) > 1 and words[1] == name and words[0].isdigit():
                out.append(words[0] if len(words) == 2 else words[0] + " " + words[2])
        return out


class ScriptedConnection:
    """imapd.session.Connection in memory: writes are collected, next_line is the script's."""

    def __init__(self, *, tls: bool = True, peer: str = "127.0.0.1"):
        self.tls = tls
        self.peer = peer
        self.output = bytearray()
        self.closed = False
        self.line_waiter: asyncio.Future | None = None
        self.reading = True  # a test sets it False for a client that stopped reading

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.output += data

    async def drain(self) -> None:
        return None

    def writable(self) -> bool:
        return self.reading

    async def start_tls(self) -> None:
        raise AssertionError("STARTTLS needs the wire: test it in test_imapd.py")

    compressing = False

    def start_compression(self) -> None:
        raise AssertionError("COMPRESS needs the wire: test it in test_imap_compress.py")

    def next_line(self) -> asyncio.Future:
        self.line_waiter = asyncio.get_running_loop().create_future()
        return self.line_waiter

    def close(self) -> None:
        self.closed = True

    def waiting_for_line(self) -> bool:
        return self.line_waiter is not None and not self.line_waiter.done()


class IMAPScript:
    """One client session. `transact` for a command and its answer; `send`, `read` and
    `wait_for` for what a command does not answer at once (IDLE, bad input)."""

    def __init__(self, server: ScriptServer, *, tls: bool = True):
        self.server = server
        self.loop = server.loop
        self.conn = ScriptedConnection(tls=tls)
        self.session = Session(server.context, self.conn, f"t{next(server.sids)}")
        self.framer = Framer(max_line=MAX_LINE, max_literal=self.session.max_literal,
                             literal_sink=self.session.literal_sink)
        self.greeting = self.session.greeting()
        self.running: asyncio.Task | None = None
        self._tags = itertools.count(1)
        self._read_upto = 0

    # -- the mox-style verbs ------------------------------------------------------------------

    def transact(self, status: str, command: str | bytes) -> Reply:
        """Send `command` under a new tag, run it to its tagged answer and check that answer's
        status ("ok", "no" or "bad"). Literals are written inline as `{n+}\\r\\n...`."""
        tag = f"x{next(self._tags)}"
        data = command if isinstance(command, bytes) else command.encode()
        start = len(self.conn.output)
        self.send(tag.encode() + b" " + data + b"\r\n")
        self._run_until(lambda: self._tagged(tag, start) is not None, f"the answer to {tag} {command!r}")
        reply = self._reply(tag, start)
        self._read_upto = len(self.conn.output)
        assert reply.status == status.upper(), f"{command!r}: expected {status.upper()}, got {reply}"
        return reply

    def send(self, data: bytes) -> None:
        """Bytes from the client, taken as imapd.protocol takes them: every complete command is
        run to its end before the next one is read, unless it waits for a line (IDLE)."""
        self.framer.feed(data)
        self._pump()

    def read(self) -> bytes:
        """What the server wrote since the last read or transact."""
        out = bytes(self.conn.output[self._read_upto:])
        self._read_upto = len(self.conn.output)
        return out

    def wait_for(self, marker: bytes, timeout: float = WAIT) -> bytes:
        """Run the loop (the watcher, a running IDLE) until `marker` has been written; then
        read() as far as it goes."""
        self._run_until(lambda: marker in self.conn.output[self._read_upto:], repr(marker), timeout)
        return self.read()

    def finish(self) -> None:
        """Run what is running (IDLE after DONE) to its end."""
        self._run_until(lambda: self.running is None, "the running command to end")

    # -- the protocol's reading half ------------------------------------------------------------

    def _pump(self) -> None:
        while not self.conn.closed:
            waiting = self.conn.waiting_for_line()
            if self.running is not None and not waiting:
                self._run_until(lambda: self.running is None or self.conn.waiting_for_line(), "a command")
                continue
            event = self.framer.next()
            if event is None:
                return
            if isinstance(event, Frame) and waiting:
                self.conn.line_waiter.set_result(event.raw)
                self._run_until(lambda: self.running is None or self.conn.waiting_for_line(), "a line")
                continue
            work = self.session.take(event)
            if work is not None:
                self.running = self.loop.create_task(self._run(work))
                self._run_until(lambda: self.running is None or self.conn.waiting_for_line(), "a command")

    async def _run(self, work) -> None:
        try:
            await work
        finally:
            self.running = None
        if self.session.state == LOGOUT:
            self.conn.close()

    def _run_until(self, done, what: str, timeout: float = WAIT) -> None:
        async def wait() -> None:
            deadline = time.monotonic() + timeout
            while not done():
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what} within {timeout} s; the server wrote: "
                                         f"{bytes(self.conn.output[-2000:])!r}")
                await asyncio.sleep(0.0005)

        if not done():
            self.loop.run_until_complete(wait())

    # -- reading the answer ---------------------------------------------------------------------

    def _tagged(self, tag: str, start: int) -> int | None:
        """Where the tagged line of `tag` begins in the output after `start`, or None."""
        for begin, line in _responses(bytes(self.conn.output[start:])):
            if line.startswith(tag.encode() + b" ") and line.endswith(b"\r\n"):
                return start + begin
        return None

    def _reply(self, tag: str, start: int) -> Reply:
        output = bytes(self.conn.output[start:])
        untagged, status, code, text = [], "", None, ""
        for _, line in _responses(output):
            if line.startswith(b"* "):
                untagged.append(line[2:-2].decode("utf-8", "replace"))
            elif line.startswith(tag.encode() + b" "):
                words = line[len(tag) + 1:-2].decode("utf-8", "replace")
                status, _, text = words.partition(" ")
                if text.startswith("["):
                    code, _, text = text[1:].partition("] ")
                break
        return Reply(untagged, status, code, text, output)


def _responses(output: bytes):
    """(offset, response) for each complete response in `output`, literals inside theirs."""
    pos = 0
    while pos < len(output):
        begin, end = pos, pos
        while True:
            eol = output.find(b"\r\n", end)
            if eol < 0:
                return
            end = eol + 2
            literal = _LITERAL_END.search(output, begin, end)
            if literal is None:
                break
            end += int(literal.group(1))
            if end > len(output):
                return
        yield begin, output[begin:end]
        pos = end


class ScriptServer:
    """What the daemon builds for imapd (postroom/daemons.py), in process: a real store and
    accounts in `root`, a watcher, store threads, an IMAPContext; and a loop to run it on."""

    def __init__(self, root: Path, **imap: object):
        data_dir = root / "var"
        config_path = root / "postroom.toml"
        config_path.write_text(render_config({
            "server": {"hostname": "mail.example.test", "data_dir": str(data_dir)},
            "storage": {"shards": 2},
            "smtp": {"max_message_size": "10M"},
            "imap": {"plaintext_auth": False, **imap},
        }))
        self.config = conf.load(config_path)
        opened = open_data_dir(data_dir, 2)
        self.accounts = Accounts(opened.accounts_path, hasher=CHEAP_HASHER)
        self.accounts.add_domain("example.test")
        self.store = open_store(opened, self.accounts, self.config)  # quotas from the accounts
        self.watcher = Watcher(self.store, interval=0.02)
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")

        def run(function, *args):
            return self.loop.run_in_executor(self.executor, function, *args)

        self.context = IMAPContext(self.config, self.accounts, self.store, self.watcher, LoginThrottle(),
                                   RecentClaims(self.store), Snapshots(), run, None, "test",
                                   connections=ConnectionLimit(100, 100))
        self.sids = itertools.count(1)
        self._users = itertools.count(1)

    def user(self) -> str:
        """A new account of its own, so tests neither see nor disturb each other's mail."""
        address = f"user{next(self._users)}@example.test"
        self.accounts.add_user(address, PASSWORD)
        return address

    def connect(self, *, tls: bool = True) -> IMAPScript:
        return IMAPScript(self, tls=tls)

    def login(self, user: str) -> IMAPScript:
        imap = self.connect()
        imap.transact("ok", f'LOGIN "{user}" "{PASSWORD}"')
        return imap

    def deliver(self, user: str, subject: str = "hello", body: str = "Hello there.", mailbox: str = "INBOX",
                **headers: str) -> bytes:
        """A message as the MX agent would store it (the store's own append)."""
        lines = [f"From: {headers.pop('sender', 'sender@remote.example')}", f"To: {user}", f"Subject: {subject}",
                 f"Message-ID: <{time.monotonic_ns()}@remote.example>"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        message = ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode()
        self.store.ensure_account(user)
        self.store.append(user, mailbox, message)
        return message

    def close(self) -> None:
        self.watcher.close()
        self.executor.shutdown(wait=True)
        self.loop.close()
        self.store.close()
        self.accounts.close()
