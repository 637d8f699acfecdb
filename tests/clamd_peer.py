"""A real clamd (Debian's clamav-daemon) for the tests, and a clamd that never answers.

    with Clamd() as clamd:                 # a unix socket; Clamd(tcp=True): 127.0.0.1:port
        ... [clamav] enabled = true, address = clamd.address ...
        clamd.stop()                       # SIGTERM: the socket file goes, connect fails
        clamd.kill()                       # SIGKILL: the socket file stays, connect is refused

    with SilentClamd() as fake:            # accepts, reads what it is sent, never answers
    SilentClamd(read=False)                # accepts and never reads: the sender blocks
    SilentClamd(read_rate=65536)           # reads 64 KiB a second, never answers
    SilentClamd(accept=False)              # a full connection queue: connect() hangs

It starts /usr/sbin/clamd with a config of its own and a database of one signature
(tests/data/clamav/postroom-test.ndb: the EICAR test string anywhere in a file or a
decoded mail part, named "Eicar-Test-Signature"), so nothing is downloaded (no freshclam)
and clamd is ready in a fraction of a second (~0.2 s on the test machine, against
~20 s and ~1 GiB for Debian's full database). Debian's own clamav-daemon and
clamav-freshclam services, running or not, are neither used nor disturbed: another socket,
another config, another database, no fixed port.

Everything clamd touches (config, database copy, socket, log, pid file, temporary files)
is in a fresh directory under /tmp, because Debian's AppArmor profile for /usr/sbin/clamd
(/etc/apparmor.d/usr.sbin.clamd) lets it read and write under /tmp (and /var/lib/clamav,
/run/clamav) but not under a checkout or a home directory. A unix socket path is also
limited to 107 bytes, which pytest's tmp_path can exceed.

Fixtures (import them into a test module, `from clamd_peer import clamd_server`):
`clamd_server` is one clamd on a unix socket shared by the tests of a pytest process (do
not stop it; start a `Clamd` of your own to stop); `silent_clamd` is a SilentClamd.

By hand (for `make run` with `[clamav] enabled`), until Ctrl-C or SIGTERM:

    .venv/bin/python tests/clamd_peer.py unix:/tmp/postroom-clamd.sock
    .venv/bin/python tests/clamd_peer.py 127.0.0.1:3310
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

SIGNATURES = Path(__file__).resolve().parent / "data" / "clamav"
CLAMD = shutil.which("clamd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) or "/usr/sbin/clamd"
# setpriv (util-linux, Essential in Debian) execs clamd with a parent-death signal: a test
# process that dies without stopping its clamd takes it along (the signal comes when the
# thread that started clamd ends: start it from the main thread).
SETPRIV = shutil.which("setpriv")
READY_TIMEOUT = 30.0


class ClamdStartError(RuntimeError):
    pass


class Clamd:
    """One clamd process. `address` is in [clamav] address form: "unix:/path" or
    "127.0.0.1:port". `socket_path` or `port` choose the socket (default: a unix socket in
    the run directory; tcp=True: a free loopback port from conftest.free_port)."""

    def __init__(self, *, tcp: bool = False, socket_path: str | None = None, port: int | None = None,
                 stream_max: str = "30M", max_threads: int = 4):
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-clamd-", dir="/tmp"))
        self.process: subprocess.Popen | None = None
        self._tcp = tcp or port is not None
        self._port = port
        self.socket_path = None if self._tcp else (socket_path or str(self.dir / "clamd.sock"))
        self._stream_max = stream_max
        self._max_threads = max_threads
        self.startup_seconds = 0.0  # how long the last start took, exec to the first PONG
        db = self.dir / "db"
        db.mkdir()
        for source in SIGNATURES.iterdir():
            shutil.copy(source, db / source.name)
        (self.dir / "tmp").mkdir()
        self.start()

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}" if not self._tcp else f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            f"DatabaseDirectory {self.dir / 'db'}",
            f"TemporaryDirectory {self.dir / 'tmp'}",
            f"LogFile {self.dir / 'clamd.log'}",
            "LogTime yes",
            f"PidFile {self.dir / 'clamd.pid'}",
            "Foreground yes",
            f"StreamMaxLength {self._stream_max}",
            f"MaxThreads {self._max_threads}",
            "ScanMail yes",
            # The bytecode engine would look for bytecode.cvd; there is none to load.
            "Bytecode no",
        ]
        if self._tcp:
            lines += [f"TCPSocket {self.port}", "TCPAddr 127.0.0.1"]
        else:
            lines += [f"LocalSocket {self.socket_path}", "FixStaleSocket yes", "LocalSocketMode 600"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start clamd (again, after stop() or kill()) and wait until it answers PING."""
        attempts = 3 if self._tcp and self._port is None else 1
        for attempt in range(attempts):
            if self._tcp:
                self.port = self._port or _free_port()
            (self.dir / "clamd.conf").write_text(self._config())
            try:
                self._start_once()
                return
            except ClamdStartError:
                # A free port taken by someone else between our check and clamd's bind.
                if attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        started = time.monotonic()
        log = open(self.dir / "clamd.out", "ab")
        argv = [CLAMD, "-c", str(self.dir / "clamd.conf")]
        if SETPRIV:
            argv = [SETPRIV, "--pdeathsig", "TERM", *argv]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = started + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClamdStartError(f"clamd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ping():
                self.startup_seconds = time.monotonic() - started
                return
            time.sleep(0.02)
        self.kill()
        raise ClamdStartError(f"clamd not ready after {READY_TIMEOUT}s:\n{self.log_tail()}")

    def ping(self) -> bool:
        try:
            with self._connect(1.0) as sock:
                sock.sendall(b"zPING\0")
                return sock.recv(16) == b"PONG\0"
        except OSError:
            return False

    def _connect(self, timeout: float) -> socket.socket:
        if self._tcp:
            return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("clamd.out", "clamd.log"):
            path = self.dir / name
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM: clamd removes its socket file and exits."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: gone at once, the socket file left behind (connect: refused)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Clamd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentClamd:
    """A socket that accepts clamd's clients and never answers them: a clamd that hangs.
    read=True reads and drops what comes (at read_rate bytes a second if given), so the
    client waits for an answer; read=False never reads, so the client's sends block once
    the socket buffers are full. `connections` counts the accepted clients.
    accept=False (unix socket only) never accepts and fills its own connection queue first,
    like a clamd stuck with all its threads busy: a client's connect() blocks."""

    def __init__(self, *, tcp: bool = False, read: bool = True, read_rate: int | None = None,
                 accept: bool = True):
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-silent-clamd-", dir="/tmp"))
        if tcp:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        else:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = str(self.dir / "clamd.sock")
            self._listener.bind(path)
            self.address = f"unix:{path}"
        self._read = read
        self._read_rate = read_rate
        self._closed = threading.Event()
        self._clients: list[socket.socket] = []
        self.connections = 0
        self.received = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        if accept:
            self._listener.listen(16)
            self._thread.start()
        else:
            assert not tcp, "a TCP listen queue cannot be filled this way"
            self._listener.listen(0)
            self._fill_queue(path)

    def _fill_queue(self, path: str) -> None:
        for _ in range(64):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                return
            self._clients.append(sock)
        raise RuntimeError("the listen queue did not fill")

    def free_one(self) -> None:
        """Take one connection off the full queue (accept=False), making room for one."""
        client, _ = self._listener.accept()
        self._clients.append(client)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.append(client)
            if self._read:
                threading.Thread(target=self._drain, args=(client,), daemon=True).start()

    def _drain(self, client: socket.socket) -> None:
        piece = 4096 if self._read_rate is None else max(1, self._read_rate // 20)
        while not self._closed.is_set():
            try:
                data = client.recv(piece)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)
            if self._read_rate is not None:
                time.sleep(len(data) / self._read_rate)

    def close(self) -> None:
        self._closed.set()
        for sock in (self._listener, *self._clients):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread.is_alive():
            self._thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SilentClamd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port() -> int:
    try:
        from conftest import free_port  # this test process's own port range (pytest-xdist)
    except ImportError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return free_port()


@pytest.fixture(scope="session")
def clamd_server():
    """One clamd on a unix socket for the tests of this pytest process. Do not stop it."""
    with Clamd() as clamd:
        yield clamd


@pytest.fixture
def silent_clamd():
    with SilentClamd() as fake:
        yield fake


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(f"usage: {argv[0]} unix:/PATH | 127.0.0.1:PORT\n\n"
              "Runs clamd with the test signature (EICAR) on that socket until interrupted.", file=sys.stderr)
        return 2
    address = argv[1]
    if address.startswith("unix:"):
        clamd = Clamd(socket_path=address[len("unix:"):])
    else:
        host, _, port = address.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            print(f"{argv[0]}: expected unix:/PATH or 127.0.0.1:PORT, got {address!r}", file=sys.stderr)
            return 2
        clamd = Clamd(port=int(port))
    with clamd:
        print(f"clamd ready at {clamd.address} in {clamd.startup_seconds:.2f}s (files in {clamd.dir}); "
              "Ctrl-C stops it", flush=True)
        try:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            signal.signal(signal.SIGINT, signal.default_int_handler)  # even started with `&`
            clamd.process.wait()
            print(f"clamd exited with {clamd.process.returncode}:\n{clamd.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
