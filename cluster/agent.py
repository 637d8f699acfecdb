"""The node agent: this node's membership of the cluster and its shards' ownership, kept
in etcd (cluster/etcd.py) and published for the machine's processes (cluster/local.py).

One agent a node (under `postroom serve`, a supervised process of its own; alone,
`postroom cluster agent`). It
- holds a lease of [cluster] lease_ttl, kept alive every third of it by a thread of its
  own, and registers the node under nodes/ with it;
- claims shards with keys bound to that lease, each by a compare-and-swap transaction
  (create_revision == 0), balanced across the live nodes (cluster/balance.py), and
  releases its extras when a node joins; it looks again at every change under the
  prefix (a watch) and at least every third of the TTL;
- takes a shard: claim in etcd, attach its volume (cluster/volumes.py), record the claim's
  revision in the shard as its fence (Store.take_shard), then publish the claim: from
  then on this machine's commits to the shard pass (storage/shard.py, "Fencing");
- hands a shard over (a join, a drain, a stop) in two steps. First it is "leaving": its
  owner is withdrawn from the table while the claim stays, so that a new RCPT for its
  users waits for the next owner (mtad/agent.py owners_known) while the transactions
  already accepted commit here, for HANDOVER_GRACE. Then the claim is withdrawn (new
  commits fail with NotOwnerError; a transaction that reaches its commit later is handed
  to the next owner over LMTP, mtad/routing.py), the fence cleared after the commits in
  flight, the shard flushed and closed here; once every process of the node has let go of
  it too (cluster/pins.py; the daemons follow within FOLLOW_INTERVAL, cluster/follow.py),
  or after [cluster] let_go_wait, its volume is detached, and only then the key deleted, so that the
  next owner can attach it at once;
- stops writing before anyone else may: the table's deadline is the time the last
  answered keepalive was sent plus the TTL minus a margin, and etcd expires the lease no
  sooner than TTL after it received that keepalive. Past the deadline every commit here
  fails; the agent drops its claims (without touching the shards: another node may own
  them by now), detaches their volumes and registers again with a new lease.

A drained node (`postroom cluster drain`, a drain/ key) stays registered and claims
nothing until `postroom cluster undrain`; the key outlives restarts, so a node restarted
for maintenance does not take shards back.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import lmdb

from cluster import pins, volumes
from cluster.balance import plan
from cluster.etcd import Etcd, EtcdError, EtcdUnreachableError, node_record
from cluster.local import Node, node_name, open_node_table
from conf import Config
from conf.logfmt import EventLogger
from storage import DataDir, Store, StoreError

ATTACH_BACKOFF = 30.0  # seconds before a shard whose attach failed is tried again here
ERROR_LOG_EVERY = 10.0  # seconds between two log lines of etcd staying unreachable
# Seconds a shard being handed over stays "leaving" (no owner to new transactions, the
# claim kept for those in flight): a commit takes milliseconds; a transaction slower than
# this is handed to the next owner at its commit instead.
HANDOVER_GRACE = 1.0
# [cluster] let_go_wait: seconds, at most, that shards released together wait for every
# process of the node to let go of them (cluster/pins.py) before their volumes are detached
# all the same (event let_go_timeout): the daemons follow within a second; a command of the
# CLI, a message still arriving or being sent, may take a few more. At a stop, [server]
# stop_grace: the daemons stop too, and may take that long to finish their sessions.
RELEASE_THREADS = 32  # shards let go of and detached at once (_release)


def service_ports(config: Config) -> dict[str, int]:
    """The ports other nodes reach this node's services on ([cluster] *_port; 0: the port
    of the service's first listen address)."""
    cluster = config.cluster
    ports = {"lmtp": cluster.lmtp_port}
    for service, port, listen in (("imap", cluster.imap_port, config.imap.listen),
                                  ("pop3", cluster.pop3_port, config.pop3.listen)):
        if port or listen:
            ports[service] = port or listen[0].port
    return ports


class Agent:
    def __init__(self, config: Config, data_dir: DataDir, store: Store, log: EventLogger | None = None):
        cluster = config.cluster
        self.config = config
        self.node = node_name(config)
        self.address = cluster.address or config.server.hostname
        self.ports = service_ports(config)
        self.shards = data_dir.shards
        self.data_dir = data_dir
        self.pins = data_dir.cluster_pins_path(self.node)
        self.store = store
        self.log = log or EventLogger("cluster.agent")
        self.etcd = Etcd(cluster)
        self.ttl = self.etcd.ttl
        self.interval = self.ttl / 3
        # A keepalive's answer may take up to a request's timeout; clocks drift a little.
        self.margin = max(0.5, self.ttl * 0.2)
        self.table = open_node_table(config, data_dir, writer=True)
        self.lease = 0
        self.deadline = 0.0
        self.claims: dict[int, int] = {}  # shard -> its claim's revision
        self.secret: bytes | None = None  # the cluster's (etcd's "secret"), once read
        self.owners: dict[int, tuple[str, int]] = {}
        self.nodes: list[Node] = []
        self.draining = False
        self._backoff: dict[int, float] = {}
        self._state = threading.Lock()  # the deadline and the table, between the two threads
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Set once the node has left (_leave): the keepalive holds the lease until then, a
        # stop's hand-over included (its grace, the let-go wait, the detaches).
        self._left = threading.Event()
        self._expired = False
        self._previous_lease = 0
        self._cancel_watch = None
        self._keepalive: threading.Thread | None = None
        self._logged_error = -ERROR_LOG_EVERY
        self.ready = threading.Event()  # registered and through a first round of claims

    # -- life -------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        """run() in a thread (in-process use; `stop` ends it)."""
        thread = threading.Thread(target=self.run, name=f"agent-{self.node}", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        """Until stop(): keep the lease, claim and release; then hand every shard over."""
        # A previous agent of this node (killed, restarted by serve) may have left claims
        # under its lease: withdrawn here first, then that lease revoked once etcd answers,
        # so its shards are free now rather than at its expiry.
        self._previous_lease = self.table.lease_id()
        self.table.publish(deadline=0.0, lease=0, claims={}, owners={}, nodes=[])
        self._keepalive = threading.Thread(target=self._keep_alive, name="lease-keepalive", daemon=True)
        self._keepalive.start()
        try:
            while not self._stop.is_set():
                try:
                    self._round()
                except EtcdError as e:
                    self._etcd_failed(e)
                except Exception:  # a bug must cost a round, not the node's shards
                    self.log.error("round_failed", exc_info=True, node=self.node)
                if self.claims and time.monotonic() >= self.deadline or self._expired:
                    self._lapsed()
                self._publish()
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            try:
                self._leave()
            finally:
                self._left.set()

    def _round(self) -> None:
        if self.lease == 0:
            self._register()
        if self._cancel_watch is None:  # none yet, or it broke (etcd went away and came back)
            try:
                self._cancel_watch = self.etcd.watch(self._wake.set, self._watch_ended)
            except EtcdError as e:  # the rounds every third of the TTL go on without it
                self._etcd_failed(e)
        snapshot = self.etcd.snapshot()
        nodes, owners, drains = snapshot.under("nodes/"), snapshot.under("owners/"), snapshot.under("drain/")
        if "secret" in snapshot.keys:
            self.secret = snapshot.keys["secret"].value
        if self.node not in nodes or nodes[self.node].lease != self.lease:
            self._expired = True  # our record is gone: so is our lease, or it soon will be
            return
        # Claims etcd no longer shows as ours (the lease expired and came back?): lost.
        lost = []
        for shard, revision in sorted(self.claims.items()):
            kv = owners.get(str(shard))
            if kv is None or kv.mod_revision != revision or kv.lease != self.lease:
                lost.append(shard)
        self._release(lost, "lost", lost=True)
        owner_of: dict[int, str] = {}
        self.owners = {}
        for name, kv in owners.items():
            shard, node = int(name), json.loads(kv.value)["node"]
            self.owners[shard] = (node, kv.mod_revision)
            # A claim of this node's previous life (an older lease) is nobody's to release.
            owner_of[shard] = node if node != self.node or shard in self.claims else "-"
        self.draining = self.node in drains
        self.nodes = [Node(name, (record := json.loads(kv.value))["address"], record["ports"], name in drains)
                      for name, kv in sorted(nodes.items())]
        live = {name for name in nodes if name not in drains}
        now = time.monotonic()
        decided = plan(self.shards, self.node, live, owner_of)
        self._hand_over(decided.release, "drain" if self.draining else "balance")
        for shard in decided.claim:
            if self._backoff.get(shard, 0.0) <= now and not self._stop.is_set():
                self._claim(shard)
        if not self.ready.is_set():
            self.ready.set()
            self.log.info("ready", node=self.node, shards=len(self.claims), nodes=len(nodes))

    def _watch_ended(self) -> None:
        self._cancel_watch = None
        self._wake.set()

    def _register(self) -> None:
        if self._previous_lease:
            previous, self._previous_lease = self._previous_lease, 0
            try:
                self.etcd.revoke(previous)
                outcome = "revoked"
            except EtcdUnreachableError:
                self._previous_lease = previous  # the next try, once etcd answers
                raise
            except EtcdError:
                outcome = "gone"  # etcd no longer knows it: expired
            self.log.info("previous_lease", node=self.node, lease=f"{previous:x}", outcome=outcome)
        sent = time.monotonic()
        lease = self.etcd.grant()
        self.etcd.put(f"nodes/{self.node}", node_record(self.address, self.ports), lease)
        # The cluster's secret, made by the first node to register (kept: no lease): how a
        # node proves itself to another's LMTP listener (mtad/lmtp.py). etcd is the trust
        # root already: whoever writes there may claim the shards.
        self.etcd.create("secret", secrets.token_hex(32).encode(), 0)
        with self._state:
            self.lease, self.deadline, self._expired = lease, sent + self.ttl - self.margin, False
        self.log.info("registered", node=self.node, lease=f"{lease:x}", ttl=self.ttl, address=self.address)

    def _keep_alive(self) -> None:
        """The lease's keepalive, every third of the TTL, in a thread of its own: a slow
        claim (a volume attached, a shard recovered) must never hold it up."""
        etcd = Etcd(self.config.cluster)  # requests' sessions are not shared across threads
        while not self._left.wait(self.interval):  # not _stop: a stop's hand-over needs the lease
            lease = self.lease
            if lease == 0:
                continue
            sent = time.monotonic()
            try:
                ttl = etcd.keepalive(lease)
            except EtcdError as e:
                self._etcd_failed(e)
                continue
            if ttl <= 0:
                self._expired = True
                self._wake.set()
                continue
            with self._state:
                if self.lease == lease and not self._expired:
                    self.deadline = sent + ttl - self.margin
                    self.table.set_lease(deadline=self.deadline, lease=lease)

    def _leave(self) -> None:
        """A stop: every shard handed over, the node's record and lease gone."""
        cancel, self._cancel_watch = self._cancel_watch, None
        if cancel is not None:
            cancel()
        self._hand_over(sorted(self.claims), "stop")
        if self.lease:
            try:
                self.etcd.revoke(self.lease)  # nodes/<name> goes with it
            except EtcdError as e:
                self.log.warning("leave_failed", node=self.node, error=str(e))
        self.lease = 0
        self.table.publish(deadline=0.0, lease=0, claims={}, owners={}, nodes=[])
        self.table.close()
        self.log.info("left", node=self.node)

    def _lapsed(self) -> None:
        """The lease is lost (or may be): every claim dropped, the shards left untouched."""
        self.log.warning("lease_lapsed", node=self.node, lease=f"{self.lease:x}", shards=len(self.claims),
                         expired=self._expired)
        with self._state:
            self.table.drop_claims()
        self._release(sorted(self.claims), "lease_lapsed", lost=True)
        old, self.lease = self.lease, 0
        try:
            if old:
                self.etcd.revoke(old)  # if etcd still has it: its keys go now, not at expiry
        except EtcdUnreachableError:
            self._previous_lease = old  # revoked when etcd answers again
        except EtcdError:
            pass  # etcd no longer knows it: expired
        self._expired = False

    def _etcd_failed(self, error: EtcdError) -> None:
        if time.monotonic() - self._logged_error >= ERROR_LOG_EVERY:
            self._logged_error = time.monotonic()
            self.log.error("etcd_failed", node=self.node, error=str(error),
                           lease_left=round(self.deadline - time.monotonic(), 1))

    # -- shards -----------------------------------------------------------------------

    def _claim(self, shard: int) -> None:
        revision = self.etcd.create(f"owners/{shard}", json.dumps({"node": self.node}).encode(), self.lease)
        if revision is None:
            return  # another node was first
        path = self.data_dir.shard_path(shard)
        try:
            volumes.run(self.config.cluster.attach, shard, path)
            self.store.take_shard(shard, revision)
        except (volumes.VolumeError, StoreError, lmdb.Error, OSError) as e:
            self.log.error("claim_failed", node=self.node, shard=shard, error=str(e))
            self._backoff[shard] = time.monotonic() + ATTACH_BACKOFF
            try:
                self.store.close_shard(shard)  # opened before the fence failed: not under the detach
            except (StoreError, lmdb.Error, OSError):
                pass
            self._detach(shard)
            self.etcd.delete_if(f"owners/{shard}", revision)
            return
        self.claims[shard] = revision
        self.owners[shard] = (self.node, revision)
        self._publish()
        self.log.info("shard_claimed", node=self.node, shard=shard, revision=revision)

    def _hand_over(self, shards: list[int], reason: str) -> None:
        """A graceful release of `shards` together: "leaving" first (no owner in the table,
        the claims kept) for HANDOVER_GRACE, then each released."""
        if not shards:
            return
        for shard in shards:
            self.owners.pop(shard, None)
        self._publish()
        self.log.info("shards_leaving", node=self.node, shards=",".join(map(str, shards)), reason=reason)
        # Not cut short by stop(): a stop is a hand-over like the others. The keepalive
        # thread holds the lease meanwhile.
        time.sleep(HANDOVER_GRACE)
        self._release([shard for shard in shards if shard in self.claims], reason)

    def _release(self, shards: list[int], reason: str, *, lost: bool = False) -> None:
        """Stop writes to `shards` (their claims withdrawn here first, together: the node's
        processes let go of them in one look), then each flushed, closed, let go of by the
        node's processes, detached, and, unless the claim is `lost` already, its key deleted.

        The shards are let go of and detached at once, each in a thread: a node holds
        hundreds of volumes, and one after another, each detach taking seconds (an RBD
        unmap), the last would wait minutes for its next owner. Each key is deleted here as
        soon as its volume is detached (the etcd client is this thread's only)."""
        if not shards:
            return
        revisions = {shard: self.claims.pop(shard) for shard in shards}
        self._publish()
        wait = float(self.config.server.stop_grace if reason == "stop" else self.config.cluster.let_go_wait)
        deadline = time.monotonic() + wait
        with ThreadPoolExecutor(max_workers=min(RELEASE_THREADS, len(revisions)),
                                thread_name_prefix="release") as pool:
            let_go = {pool.submit(self._let_go, shard, lost=lost, deadline=deadline): shard for shard in revisions}
            for future in as_completed(let_go):
                shard = let_go[future]
                future.result()
                self._forget(shard, revisions[shard], reason, lost=lost)

    def _let_go(self, shard: int, *, lost: bool, deadline: float) -> None:
        """Shard `shard` flushed and closed here, let go of by the node's processes (or at
        `deadline`), then its volume detached."""
        try:
            self.store.release_shard(shard, clear_fence=not lost)
        except (StoreError, lmdb.Error, OSError) as e:
            self.log.error("release_failed", node=self.node, shard=shard, error=str(e))
        with pins.let_go(self.pins, shard, deadline) as outcome:
            waited = round(outcome.waited, 3)
            if outcome.all_let_go:
                self.log.info("shard_let_go", node=self.node, shard=shard, waited=waited)
            else:  # detached all the same: a stop must not hang; the detach may fail, and says so
                self.log.warning("let_go_timeout", node=self.node, shard=shard, waited=waited,
                                 pids=",".join(map(str, outcome.holders)) or "-")
            self._detach(shard)

    def _forget(self, shard: int, revision: int, reason: str, *, lost: bool) -> None:
        """The claim's key deleted (the next owner may claim the shard now), unless it is lost."""
        if not lost:
            try:
                self.etcd.delete_if(f"owners/{shard}", revision)
            except EtcdError as e:  # the key goes with the lease, at the latest
                self.log.warning("release_key_failed", node=self.node, shard=shard, error=str(e))
        self.owners.pop(shard, None)
        self.log.info("shard_released", node=self.node, shard=shard, revision=revision, reason=reason)

    def _detach(self, shard: int) -> None:
        try:
            volumes.run(self.config.cluster.detach, shard, self.data_dir.shard_path(shard))
        except volumes.VolumeError as e:
            self.log.error("detach_failed", node=self.node, shard=shard, error=str(e))

    def _publish(self) -> None:
        with self._state:
            self.table.publish(deadline=self.deadline if self.lease else 0.0, lease=self.lease,
                               claims=dict(self.claims), owners=dict(self.owners), nodes=list(self.nodes),
                               secret=self.secret)
