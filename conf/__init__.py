"""Postroom's configuration: the schema, the TOML loader, and what is built from config alone
(logging, TLS contexts). The lowest floor: it imports nothing else of Postroom's."""

from conf.loader import DEFAULT_PATH, ConfigError, dump, load, loads
from conf.schema import Config

__all__ = ["DEFAULT_PATH", "Config", "ConfigError", "dump", "load", "loads"]
