"""Policy checks for mail on the open internet: SPF, DKIM/ARC, DMARC, anti-virus (clamd),
rate limits, DNSBL, spam score. Each check gathers evidence; one decision turns it into an
action. Not built yet: see the policy issue."""
