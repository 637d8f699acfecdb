"""Value types of the config file and their parsers: sizes, durations, listen addresses.

Each parser takes what TOML gave (str or int) and returns the typed value or raises
ValueError with a message that reads well after "<file>: <key>: ". Each formatter is the
inverse, so that `postroom config check` prints a file that loads back to the same config.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class Size(int):
    """A byte count written as 1048576, "512K", "25M" or "1G" (binary units)."""


class Duration(float):
    """Seconds, written as 30, "30s", "5m", "2h", "5d" or "1h30m"."""


class IPAddress(str):
    """An IPv4 or IPv6 address literal, stored in its compressed form."""


@dataclass(frozen=True, order=True)
class ListenAddress:
    """One socket to listen on. Hosts are IP literals: start-up never waits on DNS."""

    host: str
    port: int

    @property
    def family_is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_is_ipv6 else f"{self.host}:{self.port}"


def parse_size(value: object) -> Size:
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 25M, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return Size(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return Size(int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    raise ValueError(f"expected a size like 1048576, \"512K\", \"25M\" or \"1G\", got {value!r}")


def format_size(value: int) -> str | int:
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return int(value)


def human_size(value: float) -> str:
    """A byte count for people to read, rounded ("512 bytes", "3.2 MiB"); format_size is
    the exact form a config file takes."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like \"30s\", got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a duration of zero or more seconds, got {value}")
        return Duration(value)
    if isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return Duration(sum(float(n) * _DURATION_UNITS[u] for n, u in parts))
    raise ValueError(f"expected a duration like \"30s\", \"5m\", \"2h\" or \"5d\", got {value!r}")


def format_duration(value: float) -> str | float:
    for unit in ("d", "h", "m", "s", "ms"):
        factor = _DURATION_UNITS[unit]
        if value and (value / factor).is_integer():
            return f"{int(value / factor)}{unit}"
    if value == 0:
        return "0s"
    return float(value)  # seconds, exactly as given


def parse_ip(value: object) -> IPAddress:
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address string, got {value!r}")
    try:
        return IPAddress(ipaddress.ip_address(value.strip()).compressed)
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


def parse_listen(value: object) -> ListenAddress:
    """Parse "host:port" or "[v6]:port"; the host must be an IP literal."""
    if not isinstance(value, str):
        raise ValueError(f"expected \"host:port\", got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {value!r}: expected \"[IPv6]:port\"")
        version = 6
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {value!r}: expected \"host:port\" or \"[IPv6]:port\"")
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"bad address {value!r}: {host!r} is not an IP address "
            "(use 0.0.0.0 or [::] for all addresses, 127.0.0.1 or [::1] for loopback)"
        ) from None
    if ip.version != version:
        hint = "write IPv6 addresses in brackets" if ip.version == 6 else "only IPv6 addresses go in brackets"
        raise ValueError(f"bad address {value!r}: {hint}, as \"[::1]:25\" or \"127.0.0.1:25\"")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"bad address {value!r}: port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"bad address {value!r}: port {number} out of range 1-65535")
    return ListenAddress(ip.compressed, number)
