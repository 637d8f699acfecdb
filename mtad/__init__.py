"""mtad — SMTP. Built: the inbound MX agent (RFC 5321, on [smtp] listen, port 25), which
stores mail for local recipients. Not built yet: the submission agent ([submission], 587 and
465 with AUTH) and the outbound queue and delivery agent (until it exists, remote alias
targets are answered 451 4.3.0).

The sans-IO SMTP core, h11-style: session.py (command lines, commands, the transaction),
events.py (what it tells the adapter, and the questions it waits on), states.py (which
commands each state takes), paths.py (MAIL/RCPT paths and ESMTP parameters), readers.py
(DATA and BDAT), replies.py (every reply, named). The adapter: inbound.py (answers the
core's questions: recipients, delivery to the store; stopping), over aiosmtpd_adapter.py
(the only module that touches aiosmtpd's internals).
"""
