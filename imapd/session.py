"""One IMAP session: the table of commands each state allows (RFC 3501 §3), the commands of
login and of any state, and the dispatch that runs a command to its tagged answer. What a
session knows and the primitives handlers use are in imapd.state; the mailbox commands are
in imapd.mailboxes, those on the selected mailbox in imapd.selected, response lines and the
store-error table in imapd.answers.

The session knows no sockets and no Twisted: it takes parsed commands (imapd.parser) and
writes response bytes through its `Connection` (imapd.protocol is the Twisted one; the
in-process test tier has another). It is not sans-IO, though: commands are coroutines on
the asyncio loop, one at a time, in order, and anything that touches the disk or takes a
CPU burst (store calls, FETCH rendering, password checks) runs in a thread via
`context.run`, within the account's fair share.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

from imapd import mailboxes, metadata, notify, searching, selected, urlauth, utf7
from imapd import responses as r
from imapd.answers import Answer, AnsweredItself, bad, no
from imapd.proxy import PROXY_ID
from imapd.state import (  # noqa: F401 - Connection, IMAPContext: the session's face for protocol and postroom
    AUTHENTICATED,
    LOGOUT,
    NOT_AUTHENTICATED,
    PROXIED,
    SELECTED,
    Connection,
    IMAPContext,
    SessionState,
)
from imapd.parser import Close, Continue, Frame, Reject, parse_command
from imapd.syntax import Authenticate, Command, Compress, Enable, Id, Login, ParseError, Search
from wire import metrics
from wire import node_proof as proof


class Session(SessionState):
    """A session that runs each command through the state table to its tagged answer."""

    def take(self, event: Continue | Reject | Close | Frame) -> Awaitable[None] | None:
        """One event of the framer (imapd.framer): answered here, or the command it carries
        returned to be run (`handle`). The daemon's protocol and the in-process test tier
        both feed the session through this, so they cannot drift apart."""
        if isinstance(event, Continue):
            self.conn.write(b"+ Ready for literal data\r\n")
        elif isinstance(event, Reject):
            status = event.status if event.tag else "BAD"
            self.tagged(event.tag or "*", status, event.text, event.code)
            self.note_error(status)
        elif isinstance(event, Close):
            self.conn.write(f"* BYE {event.text}\r\n".encode())
            self.conn.close()
        else:
            try:
                with utf7.utf8_names(self.utf8):
                    command = parse_command(event)
            except ParseError as error:
                self.parse_failed(error)
                return None
            return self.handle(command)
        return None

    async def handle(self, command: Command) -> None:
        """Run one command to its tagged response."""
        started = time.perf_counter()
        async with self.running:
            notifier = self.notifier  # NOTIFY (imapd.notify): the client's own changes are not told back
            if notifier is not None:
                notifier.command_started(command)
            try:
                with utf7.utf8_names(self.utf8):
                    await self._handle(command)
            finally:
                if notifier is not None:
                    await notifier.command_ended()
        name = command.name if command.name in KNOWN else "OTHER"  # a bounded set of label values
        metrics.imap_command(name, self.status, time.perf_counter() - started)

    async def _handle(self, command: Command) -> None:
        handler = STATES[self.state].get(command.name)
        try:
            charset = getattr(command, "charset", None)
            if self.utf8 and charset is not None and (isinstance(command, Search) or charset != "UTF-8"):
                # RFC 6855 §3 and its erratum 4029: strings are UTF-8 now; an optional CHARSET
                # label (SEARCH) conflicts, and a mandatory one (SORT, THREAD) must be UTF-8.
                raise bad("no CHARSET but UTF-8 once UTF8=ACCEPT is enabled")
            if handler is None:
                if command.name not in KNOWN:
                    raise bad("unknown command")
                raise bad(f"{command.name} is not allowed {_STATE_PHRASES[self.state]}")
            result = await handler(self, command)
            code, text = result if isinstance(result, tuple) else (None, result or f"{command.name} completed")
            if self.view is not None and command.name not in ("LOGOUT",):
                await selected.sync(self, expunges=command.name not in selected.NO_EXPUNGE_DURING)
            self.tagged(command.tag, "OK", text, code)
            self.errors = 0
        except AnsweredItself:
            return
        except Answer as answer:
            try:
                if self.view is not None and answer.status == "NO":
                    await selected.sync(self, expunges=command.name not in selected.NO_EXPUNGE_DURING)
            except Answer:
                pass  # the store failed again: the command's own answer is what matters
            self.tagged(command.tag, answer.status, answer.text, answer.code)
            self.note_error(answer.status)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - a bug must cost one command, not the session
            self.log.error("command_failed", command=command.name, exc_info=True)
            self.tagged(command.tag, "NO", "internal error (logged on the server)", "SERVERBUG")


# -- any state (RFC 3501 §6.1) --------------------------------------------------------------------

async def capability(session: Session, command: Command):
    session.untagged(f"CAPABILITY {session.capabilities()}")


async def noop(session: Session, command: Command):
    return None


async def logout(session: Session, command: Command):
    session.untagged("BYE logging out")
    session.state = LOGOUT
    session.log.info("logout", user=session.user)
    return None


async def id_(session: Session, command: Id):
    """RFC 2971: the client's ID is logged (bounded), ours is name and version."""
    params = command.params
    if params:
        shown = " ".join(f"{k}={v}" for k, v in list(params.items())[:8])
        session.log.info("client_id", user=session.user, client=shown[:300])
        is_peer = session.context.is_peer
        if PROXY_ID in params and session.user is None and is_peer is not None and is_peer(session.conn.peer):
            session.forwarded_for = _address(params.get("x-originating-ip")) or session.conn.peer
    session.untagged(b"ID " + r.plist([r.string(b"name"), r.string(b"Postroom"), r.string(b"version"),
                                        r.string(session.context.version.encode())]))


async def enable(session: Session, command: Enable):
    """RFC 5161: CONDSTORE; QRESYNC (RFC 7162 §3.2.3: it enables CONDSTORE too); UTF8=ACCEPT
    (RFC 6855 §3: mailbox names in UTF-8 both ways, UTF-8 in quoted strings, APPEND's UTF8
    data item); IMAP4rev2 (RFC 9051 §6.3.1, Appendix A). ENABLED names only what this
    command enabled, not what was on before."""
    before = {"QRESYNC": session.qresync, "UTF8=ACCEPT": session.utf8, "IMAP4REV2": session.rev2}
    enabled = [c for c in dict.fromkeys(command.capabilities)
               if c in ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT", "IMAP4REV2") and not before.get(c)]
    if "CONDSTORE" in enabled or "QRESYNC" in enabled:
        session.condstore = True
    if "QRESYNC" in enabled:
        session.qresync = True
    if "UTF8=ACCEPT" in enabled:
        session.utf8 = True
    if "IMAP4REV2" in enabled:
        session.rev2 = True
    enabled = ["IMAP4rev2" if c == "IMAP4REV2" else c for c in enabled]
    session.untagged("ENABLED" + "".join(" " + c for c in enabled))


async def compress(session: Session, command: Compress):
    """RFC 4978: the tagged OK goes out in the clear, everything after it compressed."""
    if command.mechanism != "DEFLATE":
        raise bad("only COMPRESS DEFLATE is supported")
    if session.conn.compressing:
        raise no("DEFLATE is active already", "COMPRESSIONACTIVE")
    session.tagged(command.tag, "OK", "DEFLATE active")
    session.conn.start_compression()
    raise AnsweredItself()


# -- not authenticated (RFC 3501 §6.2) ------------------------------------------------------------

async def starttls(session: Session, command: Command):
    if session.conn.tls:
        raise bad("TLS is already active")
    if session.context.tls is None:
        raise no("TLS is not configured")
    session.tagged(command.tag, "OK", "begin TLS negotiation now")
    await session.conn.start_tls()
    raise AnsweredItself()


async def login(session: Session, command: Login):
    if not session.plaintext_ok():
        raise no("use STARTTLS before LOGIN", "PRIVACYREQUIRED")
    return await log_in(session, command.user, command.password)


async def authenticate(session: Session, command: Authenticate):
    """AUTHENTICATE PLAIN (RFC 4616), with SASL-IR's initial response (RFC 4959)."""
    if command.mechanism != "PLAIN":
        raise no("only AUTHENTICATE PLAIN is supported", "CANNOT")
    if not session.plaintext_ok():
        raise no("use STARTTLS before AUTHENTICATE", "PRIVACYREQUIRED")
    response = command.initial
    if response is None:
        session.conn.write(b"+ \r\n")
        line = (await session.conn.next_line()).strip()
        if line == b"*":
            raise bad("authentication cancelled")
        response = line.decode("ascii", "replace")
    try:
        decoded = base64.b64decode(response, validate=True) if response else b""
        authzid, authcid, password = decoded.split(b"\0")
        user, secret, acting_as = authcid.decode(), password.decode(), authzid.decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad("malformed PLAIN response") from None
    if acting_as and acting_as != user:
        if _node_proxy(session, user, secret):
            return await _log_in_proxied(session, acting_as, user)
        raise no("acting as another user is not allowed", "AUTHORIZATIONFAILED")
    return await log_in(session, user, secret)


def _node_proxy(session: Session, node: str, given: str) -> bool:
    """Whether this AUTHENTICATE is a live node's proxy logging in as its client's user: from
    a node's address, naming a node (no "@"), with its proof of the cluster's secret for
    this session's nonce (wire/node_proof.py). The proxy checked the password itself."""
    context = session.context
    if session.nonce is None or "@" in node or context.is_peer is None or not context.is_peer(session.conn.peer):
        return False
    if proof.valid(context.secret(), session.nonce, node, given):
        return True
    session.log.warning("proxy_auth_failed", node=node[:64], ip=session.conn.peer)
    return False


async def _log_in_proxied(session: Session, user: str, node: str):
    """A node's proxy's login as `user` (its password checked there): served here, never
    proxied on (as a session with the proxy's ID)."""
    context = session.context
    account = context.accounts.get_user(user)
    if account is None:
        raise no("no such user here", "AUTHENTICATIONFAILED")
    session.forwarded_for = session.forwarded_for or session.conn.peer
    name = str(account.address)
    if context.owner is not None and _owner(context, name) is not None:
        session.log.info("login_moving", user=name, ip=session.forwarded_for, via=session.conn.peer)
        raise no("your mailbox is moving between servers, try again in a few seconds", "UNAVAILABLE")
    return await _enter(session, name, session.forwarded_for, {"via": session.conn.peer, "node": node})


async def log_in(session: Session, user: str, password: str):
    """Check the password (throttled per IP on failure) and enter the authenticated state."""
    context = session.context
    throttle = context.throttle
    client = session.forwarded_for or session.conn.peer
    via = {"via": session.conn.peer} if session.forwarded_for else {}
    async with throttle.checks:
        account = await (context.run_login or context.run)(context.accounts.authenticate, user, password)
    metrics.login("imap", ok=account is not None)
    if account is None:
        delay = throttle.failed(client)
        session.log.warning("login_failed", user=user[:100], ip=client, delay=delay, **via)
        await asyncio.sleep(delay)
        raise no("wrong user name or password", "AUTHENTICATIONFAILED")
    throttle.succeeded(client)
    name = str(account.address)  # the store's account name: local@a-label
    if context.owner is not None:
        owner = _owner(context, name)
        if owner is not None and session.forwarded_for is not None:
            # Proxied here by a node that took this one for the owner: the two nodes' tables
            # disagree for a moment (a hand-over). Proxying on could go round between them.
            session.log.info("login_moving", user=name, ip=client, **via)
            raise no("your mailbox is moving between servers, try again in a few seconds", "UNAVAILABLE")
        if owner is not None:
            return await _proxy(session, name, password, owner)
    return await _enter(session, name, client, via)


async def _enter(session: Session, name: str, client: str, via: dict[str, str]):
    await session.run_store(session.context.store.ensure_account, name)
    session.user = name
    session.state = AUTHENTICATED
    session.log = session.log.bind(user=session.user)
    session.log.info("login", ip=client, tls=session.conn.tls, **via)
    return "CAPABILITY " + session.capabilities(), "logged in"


def _address(text: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(text or ""))
    except ValueError:
        return None


def _owner(context: IMAPContext, account: str) -> tuple[str, int] | None:
    from storage import NoOwnerError

    try:
        return context.owner(account)
    except NoOwnerError:
        raise no("your mailbox is moving between servers, try again in a few seconds", "UNAVAILABLE") from None


async def _proxy(session: Session, account: str, password: str, owner: tuple[str, int]):
    """The rest of the session at the node that owns the account's shard (imapd/proxy.py)."""
    from imapd.proxy import ProxyError, log_in_at

    config = session.context.config
    try:
        reader, writer, capability = await log_in_at(
            owner[0], owner[1], user=account, password=password, client_ip=session.forwarded_for or session.conn.peer,
            prove=proof.prover(session.context.secret, session.context.node),
            hostname=config.server.hostname, tls=session.context.proxy_tls, timeout=float(config.imap.login_timeout))
    except ProxyError as e:
        session.log.warning("proxy_failed", user=account, owner=f"{owner[0]}:{owner[1]}", error=str(e)[:200])
        raise no("your mailbox's server is not answering, try again later", "UNAVAILABLE") from None
    session.user = account
    session.state = PROXIED
    session.log = session.log.bind(user=account)
    session.log.info("login", ip=session.forwarded_for or session.conn.peer, tls=session.conn.tls,
                     proxied_to=f"{owner[0]}:{owner[1]}")
    session.conn.relay_to(reader, writer)  # from the end of this command on
    return capability or "CAPABILITY IMAP4rev1", "logged in"


# -- the state table (RFC 3501 §3): which commands each state allows, and their handlers ---------

Handler = Callable[[Session, Command], Awaitable[Any]]

_ANY: dict[str, Handler] = {"CAPABILITY": capability, "NOOP": noop, "LOGOUT": logout, "ID": id_}
_AUTHENTICATED: dict[str, Handler] = {
    **_ANY,
    "ENABLE": enable,
    "SELECT": mailboxes.select,
    "EXAMINE": mailboxes.select,
    "CREATE": mailboxes.create,
    "DELETE": mailboxes.delete,
    "RENAME": mailboxes.rename,
    "SUBSCRIBE": mailboxes.subscribe,
    "UNSUBSCRIBE": mailboxes.unsubscribe,
    "LIST": mailboxes.list_,
    "LSUB": mailboxes.lsub,
    "NAMESPACE": mailboxes.namespace,
    "STATUS": mailboxes.status,
    "APPEND": mailboxes.append,
    "IDLE": selected.idle,
    "GETQUOTAROOT": mailboxes.getquotaroot,
    "GETQUOTA": mailboxes.getquota,
    "SETQUOTA": mailboxes.setquota,
    "GETMETADATA": metadata.getmetadata,
    "SETMETADATA": metadata.setmetadata,
    "NOTIFY": notify.notify,
    "COMPRESS": compress,
    "GENURLAUTH": urlauth.genurlauth,
    "RESETKEY": urlauth.resetkey,
    "URLFETCH": urlauth.urlfetch,
}
STATES: dict[str, dict[str, Handler]] = {
    NOT_AUTHENTICATED: {**_ANY, "STARTTLS": starttls, "LOGIN": login, "AUTHENTICATE": authenticate},
    AUTHENTICATED: _AUTHENTICATED,
    SELECTED: {
        **_AUTHENTICATED,
        "CHECK": selected.check,
        "CLOSE": selected.close,
        "UNSELECT": selected.unselect,
        "EXPUNGE": selected.expunge,
        "UID EXPUNGE": selected.expunge,
        "SEARCH": searching.search,
        "UID SEARCH": searching.search,
        "SORT": searching.sort,
        "UID SORT": searching.sort,
        "THREAD": searching.thread,
        "UID THREAD": searching.thread,
        "CANCELUPDATE": searching.cancelupdate,
        "FETCH": selected.fetch,
        "UID FETCH": selected.fetch,
        "STORE": selected.store,
        "UID STORE": selected.store,
        "COPY": selected.copy,
        "UID COPY": selected.copy,
        "MOVE": selected.copy,
        "UID MOVE": selected.copy,
    },
    LOGOUT: {},
    PROXIED: {},  # the protocol relays every byte: no command reaches the session
}
KNOWN = frozenset(name for table in STATES.values() for name in table)
_STATE_PHRASES = {NOT_AUTHENTICATED: "before login", AUTHENTICATED: "without a selected mailbox",
                  SELECTED: "here", LOGOUT: "after LOGOUT", PROXIED: "here"}
