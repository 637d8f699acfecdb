"""systemd's readiness protocol (sd_notify(3)): tell the service manager we are up or stopping.

Under `Type=notify` systemd waits for READY=1 before starting what depends on us; the test
fixtures use the same socket to know when a daemon is ready. Outside systemd (no
NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, socket_path: str | None = None) -> None:
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    # Non-blocking: the send is made from the event loop (the watchdog's WATCHDOG=1), and a
    # manager that does not read (serve stalled or stopped; a queue holds only
    # net.unix.max_dgram_qlen datagrams, 10 by default) would otherwise stall the loop and
    # every session with it. A message that finds the queue full is dropped (EAGAIN).
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.connect(path)
            sock.sendall(state.encode())
        except OSError:
            pass  # a vanished manager must not take the daemon down
