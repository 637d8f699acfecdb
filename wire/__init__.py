"""Connection plumbing the daemons share: the Twisted protocol base of imapd and pop3d
(wire.protocol), listening sockets (wire.sockets), connection limits (wire.connections) and the Prometheus
metrics every process counts (wire.metrics; storage counts its fsyncs there).

A ground floor beside conf/: it imports conf (for config values) and nothing else of
Postroom's. Importing this package loads nothing: `mtad` takes sockets and limits from it
and never loads Twisted, which only wire.protocol imports."""
