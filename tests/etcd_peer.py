"""A real etcd (Debian's etcd-server) for the cluster's tests: one member on loopback, its
data in a fresh directory, gone when it stops.

    with Etcd() as etcd:                   # etcd.endpoint: "http://127.0.0.1:PORT"
        ... [cluster] etcd = [etcd.endpoint] ...
        etcd.kill()                        # SIGKILL: the cluster loses its coordinator

Fixture: `etcd_server`, one etcd shared by the tests of a pytest process (do not stop it;
start an `Etcd` of your own to stop), `from etcd_peer import etcd_server`.

By hand (for `make run` with a [cluster] section), until Ctrl-C or SIGTERM:

    .venv/bin/python tests/etcd_peer.py 2379
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ETCD = shutil.which("etcd", path="/usr/bin:/usr/local/bin") or "/usr/bin/etcd"
SETPRIV = shutil.which("setpriv")  # a parent-death signal, as tests/clamd_peer.py does
READY_TIMEOUT = 30.0


class EtcdStartError(RuntimeError):
    pass


def _free_port() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import free_port

    return free_port()


class Etcd:
    """One etcd member: clients on 127.0.0.1:`port` (a free one by default), peers on
    another free port. Quick to start (~0.3 s) and to commit: `--unsafe-no-fsync` is not
    used, so a commit costs what it costs in production."""

    def __init__(self, port: int | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-etcd-"))
        self.port = port or _free_port()
        self.peer_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [ETCD, "--name", "test", "--data-dir", str(self.dir / "data"),
                   "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                   "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                   "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
                   "--log-level", "error", "--logger", "zap"]
        if SETPRIV:
            command = [SETPRIV, "--pdeathsig", "KILL", "--"] + command
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=open(self.dir / "etcd.log", "wb"))
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EtcdStartError(f"etcd exited: {(self.dir / 'etcd.log').read_text()[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise EtcdStartError(f"etcd not ready after {READY_TIMEOUT} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as reply:
                return json.loads(reply.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def etcd_server():
    with Etcd() as etcd:
        yield etcd


if __name__ == "__main__":
    with Etcd(int(sys.argv[1]) if len(sys.argv) > 1 else None) as etcd:
        print(f"etcd at {etcd.endpoint} (data in {etcd.dir}); Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
