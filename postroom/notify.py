"""systemd's readiness protocol (sd_notify(3)): tell the service manager we are up or stopping.

Under `Type=notify` systemd waits for READY=1 before starting what depends on us; the test
fixtures use the same socket to know when a daemon is ready. Outside systemd (no
NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


# How long a state change (READY=1, STOPPING=1, STATUS=) may wait for room in the manager's
# queue: it matters (without READY=1 systemd fails the start), and it is sent once.
STATE_TIMEOUT = 5.0


def notify(state: str, socket_path: str | None = None, *, drop_when_full: bool = False) -> None:
    """Send `state` to the manager. `drop_when_full`: for what is sent from the event loop
    again and again (the watchdog's WATCHDOG=1): never wait, and drop it when the manager's
    queue is full (a queue holds net.unix.max_dgram_qlen datagrams, 10 by default), since a
    manager that does not read (serve stalled or stopped) would otherwise stall the loop and
    every session with it; the next ping follows anyway. Anything else waits for room up to
    STATE_TIMEOUT, so READY=1 is not lost to a burst of pings."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(0 if drop_when_full else STATE_TIMEOUT)
        try:
            sock.connect(path)
            sock.sendall(state.encode())
        except OSError:
            pass  # a vanished (or, past the timeout, stuck) manager must not take the daemon down
