"""pop3d — POP3 server over the store. Not built yet (issue 6)."""
