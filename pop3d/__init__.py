"""pop3d — POP3 server over the store (issue 6): a sans-IO core (core), the session's store
work (session) and the Twisted adapter (protocol); started by `pop3d` and `postroom serve`."""
