"""imapd — IMAP4rev1 server over the store. Not built yet (issue 5)."""
