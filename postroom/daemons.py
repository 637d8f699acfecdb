"""How `postroom serve` starts each daemon: builds it from the config and the shared
collaborators, binds its listeners, and returns something it can stop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from mtad.inbound import InboundContext, start_listeners

DELIVERY_THREADS = 32  # deliveries wait on fsync; concurrent ones share a commit


class Listening:
    def __init__(self, servers: list[asyncio.Server], executor: ThreadPoolExecutor | None = None):
        self.servers = servers
        self.executor = executor

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        if self.executor is not None:
            self.executor.shutdown(wait=True)


async def start_smtp(context) -> Listening:
    # aiosmtpd logs every connection in its own words: ours are the log.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="deliver")

    def deliver_in_thread(fn, *args):
        return loop.run_in_executor(executor, fn, *args)

    spool = context.data_dir.path / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    inbound = InboundContext(context.config, context.accounts, context.store, context.tls, deliver_in_thread,
                             spool_dir=str(spool))
    return Listening(await start_listeners(inbound, context.config.smtp.listen), executor)
