"""Policy: what a server on the open internet must decide about its clients and their mail.

Built so far: per-address connection limits (connections), login throttling and the cap on
concurrent password checks (logins), and each account's fair share of a daemon's store
threads (shares). The mail checks (SPF, DKIM/ARC, DMARC, anti-virus through clamd, rate
limits, DNSBL, spam score) come with the policy chain issue: each gathers evidence as plain
values and one decision turns it into an action. Policy never imports storage.
"""
