"""Postroom's configuration: the schema (conf.schema), the TOML loader (conf.loader) and the
values it parses (conf.values), and what is built from config alone: logging (conf.logfmt)
and TLS contexts (conf.tls). The ground floor: it imports nothing else of Postroom's.
Connection plumbing is wire/'s; binding ports and the reactor are postroom/'s."""

from conf.loader import DEFAULT_PATH, ConfigError, dump, load, loads
from conf.schema import Config

__all__ = ["DEFAULT_PATH", "Config", "ConfigError", "dump", "load", "loads"]
