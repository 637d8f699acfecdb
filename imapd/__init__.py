"""imapd: the IMAP4rev1 server over the store (a sans-IO core in parser/session, a thin Twisted adapter in protocol)."""
