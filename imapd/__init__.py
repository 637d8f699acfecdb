"""imapd: the IMAP4rev1 server over the store.

Sans-IO, fed bytes and tested without a loop: the framer (imapd.framer) and the parser
(imapd.parser, imapd.tokens, imapd.search_keys), which turn bytes into typed commands.
The session (imapd.session, with imapd.mailboxes and imapd.selected) runs those commands
as asyncio coroutines against the store and writes the answers through a `Connection`; it
knows no sockets. imapd.protocol is the thin Twisted adapter between the two.
"""
