"""Postroom as a cluster: several nodes share the shards, each shard owned by one node at
a time, through etcd (DESIGN.md "Scale beyond one machine"; [cluster] in the config).

Without [cluster] etcd nothing here runs and a node owns every shard, as ever.

Modules, one job each:
    etcd.py      the cluster's keys in etcd (nodes/, owners/, drain/) and the calls on them
    balance.py   which shards a node claims or releases (pure)
    agent.py     the node agent: lease, registration, claims, hand-overs, fencing deadline
    local.py     the node table the agent publishes for the machine's processes
    view.py      what a daemon asks: owner_of, owns, live_nodes
    volumes.py   a shard's volume attached and detached ([cluster] attach, detach)

The agent's process (a child of `postroom serve`, or `cluster agent`) and the CLI's
`postroom cluster status | drain | undrain | agent` are postroom's (postroom/cluster_agent.py,
postroom/clusteradmin.py): this package imports nothing of the floors above it.

Shared accounts (docs/cluster.md): etcd holds domains, users and aliases; each node reads
its own copy in accounts.lmdb, so RCPT and LOGIN never wait on etcd:
    accounts_etcd.py     the accounts' keys in etcd, loads, watches, transactions
    accounts_mirror.py   AccountsMirror: etcd -> the node's accounts.lmdb (load, then watch)
    accounts_writer.py   ClusterAccounts: the CLI's changes, compare-and-swap in etcd
    accounts_seed.py     push_local: a joining node's own accounts into etcd

The interface for daemons (mtad's LMTP hand-off, the IMAP/POP3 proxy, queue runners), from
any process of the node, without a request to etcd (microseconds a call):

    from cluster.view import open_view
    view = open_view(config, data_dir)        # ClusterView, or None when not a cluster
    shard = store.shard_number(account)
    view.owns(shard)        -> bool: this node may write it now (what each commit checks)
    view.owner_of(shard)    -> Owner(shard, node: Node, revision) | None (free just now)
    view.live_nodes()       -> [Node(name, address, ports, draining)]
    node.endpoint("lmtp")   -> (host, port); also "imap", "pop3" ([cluster] *_port)
    view.node               -> this node's name
    view.here()             -> this node's own Node (its address and ports)
    view.lease_left()       -> seconds this node's claims stay good without a keepalive
    store.close_shard(shard)   a daemon lets go of a shard its node released (volume detach)

A daemon's store is fenced by postroom.datadir.open_store when [cluster] etcd is set: a
commit to a shard this node does not hold now fails with storage.NotOwnerError (a
StoreError: 4xx), and nothing is written.
"""
