"""The cluster's hand-off: an LMTP server (RFC 2033) for the other nodes, on [smtp]
lmtp_listen.

In a cluster every node takes mail for every user, and a user's mailbox lives in one shard,
which one node owns at a time (DESIGN.md, "Scale beyond one machine"). The node that took a
message hands it to the owner over LMTP before its own 250 (mtad/lmtp_client.py), so a 250
still means durable on the owner. This is the owner's side: the inbound agent's session,
store and commit, with what the handing node already did left out.

- LHLO in place of EHLO (mtad/session.py in LMTP mode); after the data, one reply per
  recipient in RCPT order. The commit is every copy or none (mtad/routing.py), so each
  recipient is told the same outcome.
- RCPT names an account, not an address to resolve: the handing node has expanded aliases,
  catch-alls and sub-addresses already, and doing it again could forward twice. An address
  that is no user here is 550 5.1.1; a full mailbox 452 4.2.2; one whose shard this node
  does not hold, when its quota is asked, 451 4.4.0 (the handing node's table is behind).
- No policy chain, no rate limits, no remote recipients: the handing node ran the checks and
  added its Received: header; this hop adds Return-Path: and its own Received: "with LMTP"
  (RFC 3848). That trust is why the listener belongs on the cluster's own network, why in
  a cluster it takes connections only from the live nodes' addresses (as their agents
  registered them; anyone else is told 421 4.7.1), and why a node must prove itself before
  MAIL: AUTH PLAIN with its name and its proof of the cluster's secret for the nonce in
  the greeting (wire/node_proof.py), since any process on a node's machine shares its
  address (else 530 5.7.0 at MAIL, 535 5.7.8 for a wrong proof).
- MAIL FROM's XSENT=<n> (a private parameter, RFC 5321 §4.1.2, offered at LHLO): the
  message's first n bytes are the handing node's (its verdict fields and Received:), not
  the sender's. The copy's deduplication key (storage/dedupe.py) skips them, so a message
  sent again after a lost 250 is known whichever node took it, and by which route.
- MAIL FROM's XJUNK (private too, offered at LHLO): the handing node's policy judged the
  message spam; each copy goes to its account's Junk mailbox here, as it would have there.
"""

from __future__ import annotations

from mtad import replies
from mtad.agent import AgentContext, store_failure_reply
from mtad.events import Auth, DataEnd, Question, RcptTo
from mtad.inbound import InboundSMTP
from mtad.replies import Reply
from mtad.routing import Route
from mtad.session import SessionConfig
from storage import NotOwnerError, StoreError
from wire import node_proof as proof
from wire.connections import ConnectionLimit

NOT_A_PEER = Reply(421, "4.7.1", "Not a node of this cluster")
PROVEN = Reply(235, "2.7.0", "Node authenticated")
NOT_PROVEN = Reply(535, "5.7.8", "Not a node of this cluster")
NO_SECRET_YET = Reply(454, "4.7.0", "Temporary authentication failure, try again")

# What a hand-off may carry beyond [smtp] max_message_size: the handing node checked the
# sender's bytes against the limit, then put its Received: and verdict fields in front (a
# few hundred bytes; more after a second hop, a drain's). Without room for them, a message
# near the limit was stored when sent to its owner and refused 552 when handed over, which
# the handing node answers 451: its sender was deferred every time, then bounced.
HEADROOM = 64 * 1024
# Recipients one hand-off may name: accounts, not addresses. The handing node held the
# sender to [smtp] max_recipients addresses, but one address may be an alias of many
# accounts (up to 1,000 each, storage/accounts.py), all on this node; refusing the 101st
# (452) deferred such a message, every time, at any node that handed it over.
MAX_ACCOUNTS = 100_000


class LMTPAgent(InboundSMTP):
    """One LMTP connection from another node of the cluster."""

    MX = False
    CHECKED = False  # the checks ran where the message came in
    PROTOCOL = "LMTP"
    service = "lmtp"

    def __init__(self, context: AgentContext, connections: ConnectionLimit):
        super().__init__(context)
        self._connections = connections
        self._refused = (NOT_A_PEER, "not a node of the cluster")

    # Not the MX's connection limits: a busy node hands over as many messages at once as
    # its own clients send it (C=50 is 50 connections from one address), and the listener
    # is the cluster's own (the README: reach it from the cluster's network only). Its own
    # limit, [smtp] lmtp_max_connections, for all the nodes together.
    def admit(self, ip: str) -> bool:
        router = self.context.router
        if router is not None and not router.is_peer(ip):
            return False
        if not self._connections.admit(ip):
            self._refused = (replies.TOO_MANY_CONNECTIONS, "too many LMTP connections")
            return False
        return True

    def release(self, ip: str) -> None:
        self._connections.release(ip)

    def refusal(self) -> tuple[Reply, str]:
        return self._refused

    @staticmethod
    def session_config(context: AgentContext, implicit_tls: bool) -> SessionConfig:
        config = context.config
        # A cluster's listener: the handing node proves itself before MAIL (wire/node_proof.py),
        # answering the nonce in this greeting; its address alone is not enough.
        cluster = context.router is not None
        return SessionConfig(hostname=config.server.hostname,
                             max_message_size=config.smtp.max_message_size + HEADROOM,
                             max_recipients=MAX_ACCOUNTS, tls_available=False, dsn=True,
                             chunking=False, lmtp=True, auth=cluster, plaintext_auth=cluster,
                             greeting_note=proof.greeting_note(proof.nonce(), config.server.hostname)
                             if cluster else "")

    async def answer(self, event: Question) -> Reply:
        if isinstance(event, Auth):
            return self._node_proof(event)
        return await super().answer(event)

    def _node_proof(self, event: Auth) -> Reply:
        """AUTH PLAIN from a handing node: its name, and its proof for this session's nonce."""
        secret = self.context.router.secret()
        if not secret:  # this node's agent has not read it yet
            return NO_SECRET_YET
        nonce = proof.nonce_in(self.core.config.greeting_note) or ""
        if event.mechanism != "PLAIN" or event.authzid or not proof.valid(secret, nonce, event.authcid, event.password):
            self.log.warning("lmtp_auth_failed", client=self.peer, node=event.authcid[:64])
            return NOT_PROVEN
        return PROVEN

    def _recipient(self, event: RcptTo) -> Reply:
        user = self.context.accounts.get_user(event.address)  # None for a malformed address too
        try:
            full = user is not None and self.context.store.is_full(str(user.address))
        except NotOwnerError:  # its shard is not (or no longer) this node's: the hand-off asks its owner
            full = None
        if user is None:
            outcome = replies.NO_SUCH_USER
        elif full is None:
            outcome = replies.NO_OWNER_NOW
        elif full:
            outcome = replies.OVER_QUOTA
        else:
            self._recipients.add_local(event.address, [str(user.address)], event.dsn)
            outcome = replies.RECIPIENT_OK
        self.log.info("rcpt", to=event.address, result=f"{outcome.code} {outcome.enhanced}")
        self._outcomes.append(f"{event.address}:{outcome.code}")
        return outcome

    async def _judge_and_deliver(self, route: Route, end: DataEnd) -> Reply:
        """No policy here (it ran where the message came in), but its Junk verdict (XJUNK)."""
        if self._mail is not None and "XJUNK" in self._mail.params:
            accounts = self._recipients.accounts()
            try:
                route.verdict(b"", await self.junk_mailboxes(accounts) if accounts else None, junk=True)
            except (StoreError, OSError) as e:  # the route is closed: nothing of it stays
                route.close()
                self.log.error("store_failed", qid=self._qid, error=type(e).__name__, reason=str(e)[:200])
                return store_failure_reply(e)
        return await super()._judge_and_deliver(route, end)
