"""The outbound delivery agent: mail in the queue (storage's QueueSet: one queue, or a
cluster node's shard queues) to other domains' servers.

- routes.py: where a domain's mail goes (routes, relay, MX with dnspython);
- client.py: one SMTP transaction to one destination's hosts (aiosmtplib);
- dotstuff.py: the message's bytes as DATA sends them;
- runner.py: the loop that takes due messages from the queue, delivers them within the
  concurrency limits, records the results, retries, expires, and sends the DSNs;
- start_runner (runner.py): the hook mtad's processes call; one of them runs the loop.
"""
