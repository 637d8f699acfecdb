"""Postroom's composition root: the `postroom` admin CLI and `postroom serve`, which builds
every component from the config and wires them together."""

__version__ = "0.1.0"
