"""The SASL exchange of SMTP AUTH (RFC 4954 §4), for the PLAIN (RFC 4616) and LOGIN
mechanisms, sans-IO: the session (mtad/session.py) hands over the AUTH command's mechanism
and initial response, then each response line the client sends after a 334; an Exchange
answers with a Challenge (a 334 to send), the Credentials it has gathered (for the adapter
to check), or a Failure (the reply that ends the exchange).

- "*" alone cancels the exchange: 501 5.0.0 (RFC 4954 §4).
- A response that is not base64 is 501 5.5.2 (RFC 4954 §4); so is a decoded PLAIN message
  that is not authzid NUL authcid NUL passwd, or a name or password that is not UTF-8
  (RFC 4616 §2).
- An initial response of "=" is an empty one (RFC 4954 §4).
LOGIN is no standard (draft-murchison-sasl-login): "Username:" and "Password:" prompts,
each answer in base64; an initial response is the user name.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from mtad.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")
USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()

CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")


@dataclass(frozen=True)
class Challenge:
    text: str  # base64, "" for the empty challenge


@dataclass(frozen=True)
class Credentials:
    authzid: str  # "" when the client acts as itself
    authcid: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Failure:
    reply: Reply


Step = Challenge | Credentials | Failure


class Exchange:
    """One AUTH exchange. `start` once, then `respond` to each line until a step other
    than a Challenge comes back."""

    def __init__(self, mechanism: str):
        assert mechanism in MECHANISMS
        self.mechanism = mechanism
        self._username: str | None = None  # LOGIN, once given

    def start(self, initial: str | None) -> Step:
        if initial is None:
            return Challenge("" if self.mechanism == "PLAIN" else USERNAME_PROMPT)
        return self._take(initial)

    def respond(self, line: str) -> Step:
        if line.strip() == "*":
            return Failure(CANCELLED)
        return self._take(line)

    def _take(self, response: str) -> Step:
        decoded = _decode(response)
        if decoded is None:
            return Failure(CANNOT_DECODE)
        if self.mechanism == "PLAIN":
            parts = decoded.split("\0")
            if len(parts) != 3 or not parts[1]:
                return Failure(CANNOT_DECODE)
            return Credentials(parts[0], parts[1], parts[2])
        if self._username is None:
            self._username = decoded
            return Challenge(PASSWORD_PROMPT)
        return Credentials("", self._username, decoded)


def _decode(response: str) -> str | None:
    """The text a base64 response stands for ("=" is empty), or None."""
    response = response.strip()
    if response == "=":
        return ""
    try:
        return base64.b64decode(response.encode("ascii"), validate=True).decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        return None
