"""pop3d — POP3 server over the store (issue 6). Sans-IO: the command state machine (core),
lines in and message bodies out (framer), the session's snapshot of INBOX (maildrop) and
the replies by name (replies). Around them the session's store work (session) and the
Twisted adapter (protocol); started by `pop3d` and `postroom serve`."""
