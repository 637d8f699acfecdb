"""Cluster mode (issue 18): what a node shares with the others through etcd."""
