"""One account cannot take imapd's store threads from everyone else (found by an attack:
sixteen sessions of one user, each running a slow SEARCH, held all sixteen store threads,
and another user's LOGIN went unanswered until the login timer fired). Each account has a
share of the threads (policy/shares.py) and passwords are checked in threads of their own."""

from __future__ import annotations

import asyncio
import imaplib
import threading
import time

import pytest

from conftest import add_accounts, client_tls_context
from policy.shares import FairShare
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery"
HOG, OTHER = "hog@example.test", "other@example.test"
SESSIONS = 16
MESSAGES = 120


def test_an_account_waits_beyond_its_share_and_others_do_not():
    async def scenario() -> list[str]:
        share = FairShare(2)
        events: list[str] = []
        gate = asyncio.Event()

        async def call(account: str, name: str) -> None:
            async with share.slot(account):
                events.append(f"start {name}")
                await gate.wait()
                events.append(f"end {name}")

        tasks = [asyncio.ensure_future(call("hog", f"hog{i}")) for i in range(5)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(call("other", "other")))
        for _ in range(3):
            await asyncio.sleep(0)
        started = list(events)
        assert share.busy("hog") == 5
        gate.set()
        await asyncio.gather(*tasks)
        assert share.busy("hog") == 0 and not share._slots  # forgotten once idle
        return started

    started = asyncio.run(scenario())
    assert started == ["start hog0", "start hog1", "start other"]


@pytest.mark.serial  # a bound on another user's wait while one user loads the CPU
def test_one_users_slow_searches_leave_other_users_served(daemon, data_dir):
    add_accounts(daemon.config_path, PASSWORD, [HOG, OTHER])
    with Store(open_data_dir(data_dir, 4)) as store:
        for i in range(MESSAGES):
            store.deliver([HOG], f"Subject: m{i}\r\n\r\nword{i} and some text of message {i}\r\n".encode())
        store.deliver([OTHER], b"Subject: mine\r\n\r\nhello\r\n")
    address = daemon.listen("imap.listen_tls")
    context = client_tls_context(daemon.config)
    slow = " ".join(["TEXT e"] * 400)  # a letter every message has: each key reads every text
    stop = threading.Event()
    searches: list[float] = []
    selected: list[int] = []

    def hog() -> None:
        with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=context, timeout=300) as client:
            client.login(HOG, PASSWORD)
            client.select("INBOX")
            selected.append(1)
            while not stop.is_set():
                started = time.monotonic()
                assert client.search(None, slow)[0] == "OK"
                searches.append(time.monotonic() - started)

    threads = [threading.Thread(target=hog, daemon=True) for _ in range(SESSIONS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(selected) < SESSIONS:  # each hog goes straight from SELECT to SEARCH
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), "the hog sessions never selected"
        time.sleep(0.05)
    time.sleep(0.2)  # for the last SEARCH line to cross loopback
    try:
        started = time.monotonic()
        with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=context, timeout=300) as client:
            client.login(OTHER, PASSWORD)
            assert client.select("INBOX")[0] == "OK"
            assert client.fetch("1", "(BODY.PEEK[])")[0] == "OK"
        waited = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    print(f"other user served in {waited:.2f} s; hog's searches took {min(searches):.2f}-{max(searches):.2f} s")
    assert min(searches) > 0.3, "the hog's searches are not slow: the test proves nothing"
    assert waited < 3.0, f"another user waited {waited:.1f} s behind one user's searches"
