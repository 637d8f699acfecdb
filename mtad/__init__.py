"""mtad — SMTP. Built: the inbound MX agent (RFC 5321, on [smtp] listen, port 25), which
stores mail for local recipients and forwards an alias's remote targets through the
outbound queue (SRS); the submission agent ([submission], 587 and 465, RFC 6409 with AUTH,
RFC 4954), which stores mail for local recipients and queues the rest.

The sans-IO SMTP core, h11-style: session.py (command lines, commands, the transaction),
events.py (what it tells the adapter, and the questions it waits on), states.py (which
commands each state takes), paths.py (MAIL/RCPT paths and ESMTP parameters, DSN's among
them), sasl.py (AUTH's SASL exchange), readers.py (DATA and BDAT), replies.py (every reply,
named). The agents: agent.py (a connection of either, over aiosmtpd_adapter.py, the only
module that touches aiosmtpd's internals; and the stop), inbound.py (the MX's answers),
submission.py (submission's answers; headers.py reads a submitted message's header),
routing.py (a message into the store and the queue together), success.py (the "delivered"
report a local recipient's NOTIFY=SUCCESS asks for).
"""
