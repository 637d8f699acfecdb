"""Mail addresses as the accounts database keys them: parsing, normalization, sub-addressing.

- Domains are stored as lowercase A-labels (IDNA 2008 with UTS 46 mapping, RFC 5891), so
  "Bücher.Example", "bücher.example" and "xn--bcher-kva.example" are one domain; they are
  shown as U-labels.
- Local parts compare case-insensitively (RFC 5321 §2.4 lets a server choose; every
  mainstream server folds case). UTF-8 local parts (RFC 6531) are kept as UTF-8.
- Only dot-atom local parts are accepted (RFC 5322 §3.4.1): a quoted local part can never
  name a Postroom account, and refusing it here closes the `"user@remote"@local` family of
  relay tricks before any lookup.
- Length limits of RFC 5321 §4.5.3.1: 64 octets of local part, 255 of domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna

from storage.errors import AddressError

MAX_LOCAL_OCTETS = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 §4.5.3.1.2

# RFC 5322 atext, plus any non-ASCII character (RFC 6531 UTF8-non-ascii).
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]+$")
_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, order=True)
class Address:
    """A normalized address: `local` lowercased, `domain` a lowercase A-label."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def display(self) -> str:
        """The form for people: the domain in Unicode."""
        return f"{self.local}@{display_domain(self.domain)}"


def normalize_domain(text: str) -> str:
    """The lowercase A-label form of a domain name, or AddressError."""
    if not text:
        raise AddressError("empty domain")
    if text.startswith("["):
        raise AddressError(f"address literal {text!r} cannot be a mail domain here")
    if text.endswith(".") or ".." in text or text.startswith("."):
        raise AddressError(f"invalid domain {text!r}: empty label")
    if any(c.isspace() for c in text) or not text.isprintable():
        raise AddressError(f"invalid domain {text!r}: spaces, control characters or bytes that are not UTF-8")
    try:
        if text.isascii():
            ascii_form = text.lower()
            if "xn--" in ascii_form:
                idna.decode(ascii_form)  # an A-label must decode to a valid U-label
        else:
            ascii_form = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise AddressError(f"invalid internationalized domain {text!r}: {e}") from None
    if len(ascii_form) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"domain longer than {MAX_DOMAIN_OCTETS} characters")
    labels = ascii_form.split(".")
    for label in labels:
        if not _LDH_LABEL.match(label):
            raise AddressError(f"invalid domain {text!r}: label {label!r} (letters, digits and '-' only)")
    if labels[-1].isdigit():
        raise AddressError(f"invalid domain {text!r}: the top-level label is all digits (RFC 3696 §2)")
    return ascii_form


def display_domain(ascii_domain: str) -> str:
    if "xn--" not in ascii_domain:
        return ascii_domain
    try:
        return idna.decode(ascii_domain)
    except idna.IDNAError:
        return ascii_domain


def normalize_local(text: str, *, fold_case: bool = True) -> str:
    """A validated local part; lowercased unless it names a mailbox elsewhere (RFC 5321
    §2.4: only the destination host may treat the local part case-insensitively)."""
    if not text:
        raise AddressError("empty local part")
    if text.startswith('"'):
        raise AddressError("quoted local parts are not accepted")
    if not text.isprintable():  # also catches surrogates from undecodable bytes
        raise AddressError(f"invalid local part {text!r}: control characters or bytes that are not UTF-8")
    if text.startswith(".") or text.endswith(".") or ".." in text:
        raise AddressError(f"invalid local part {text!r}: misplaced dot")
    if not all(_ATEXT.match(atom) for atom in text.split(".")):
        raise AddressError(f"invalid local part {text!r}: characters not allowed in an address")
    local = text.lower() if fold_case else text
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise AddressError(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    return local


def parse_address(text: str, *, fold_case: bool = True) -> Address:
    """Parse `local@domain` (no angle brackets, no comments) into its normalized form."""
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError(f"{text!r} is not an address (no '@')")
    if "@" in local:
        raise AddressError(f"{text!r} has more than one '@'")
    return Address(normalize_local(local, fold_case=fold_case), normalize_domain(domain))


def split_detail(local: str, delimiter: str) -> tuple[str, str | None]:
    """("alice", "news") for "alice+news" with delimiter "+"; the detail is None if absent."""
    if not delimiter:
        return local, None
    base, sep, detail = local.partition(delimiter)
    if not sep or not base:
        return local, None
    return base, detail
