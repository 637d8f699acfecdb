"""mtad — SMTP: the inbound MX agent, the submission agent and the outbound delivery agent. Not built yet (issue 4)."""
