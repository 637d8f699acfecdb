"""docs/config.md is what `postroom config reference` makes of conf/schema.py and the comments
of conf/postroom.toml, and every schema key has a comment there (postroom/configref.py)."""

from __future__ import annotations

import difflib
import re
import subprocess
from pathlib import Path

from conftest import POSTROOM
from postroom.configref import EXAMPLE, parse_example, reference, undocumented

REPO = Path(__file__).resolve().parent.parent
CONFIG_MD = REPO / "docs" / "config.md"


def _reference(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([POSTROOM, "config", "reference", *args], capture_output=True, text=True, timeout=60)


def test_docs_config_md_is_what_the_command_makes():
    made = _reference()
    assert made.returncode == 0, made.stderr
    written = CONFIG_MD.read_text()
    diff = "".join(list(difflib.unified_diff(written.splitlines(True), made.stdout.splitlines(True),
                                             "docs/config.md", "postroom config reference"))[:40])
    assert made.stdout == written, f"docs/config.md is stale: run `make config-doc`\n{diff}"


def test_every_schema_key_has_a_comment_in_the_example():
    assert undocumented(parse_example(EXAMPLE.read_text())) == []


def test_a_key_without_a_comment_or_missing_is_named(tmp_path):
    text = EXAMPLE.read_text()
    no_comment = text.replace("# Sign mail your users send with their domain's key (`postroom dkim keygen DOMAIN`).\n",
                              "")
    assert no_comment != text
    assert undocumented(parse_example(no_comment)) == ["dkim.sign"]
    missing = text.replace('helo_name = ""\n', "")
    assert missing != text
    assert undocumented(parse_example(missing)) == ["outbound.helo_name"]
    # The command says so and fails, after printing what it could.
    path = tmp_path / "example.toml"
    path.write_text(no_comment)
    made = _reference("--example", str(path))
    assert made.returncode == 1
    assert made.stderr.strip() == f"postroom: {path}: keys without a comment: dkim.sign"
    assert "### `dkim.sign`" in made.stdout


def test_comments_attach_to_runs_commented_keys_and_subtables():
    example = parse_example(
        "# The preamble.\n"
        "\n"
        "[smtp]\n"
        "# Connections at once.\n"
        "max_connections = 5\n"
        "max_connections_per_ip = 2\n"
        "# Processes.\n"
        "workers = 2\n"
        "\n"
        "[outbound]\n"
        "# A file holding the relay's password:\n"
        '# relay_password_file = "/etc/postroom/relay-password"\n'
        "\n"
        "# Per-domain routes:\n"
        "[outbound.routes]\n"
        '# "partner.example" = "10.0.0.5:25"\n'
    )
    assert example.preamble == ["The preamble."]
    keys = example.keys
    assert keys[("smtp", "max_connections")].prose == ["Connections at once."]
    assert keys[("smtp", "max_connections_per_ip")].prose is keys[("smtp", "max_connections")].prose
    assert keys[("smtp", "workers")].prose == ["Processes."]
    password_file = keys[("outbound", "relay_password_file")]
    assert password_file.examples == ['relay_password_file = "/etc/postroom/relay-password"']
    assert password_file.value is None
    assert keys[("outbound", "routes")].prose == ["Per-domain routes:"]
    assert keys[("outbound", "routes")].examples == ['"partner.example" = "10.0.0.5:25"']
    page = reference(example)
    # Keys sharing a comment share an entry; types, defaults and ranges come from the schema.
    assert "### `smtp.max_connections`, `smtp.max_connections_per_ip`" in page
    assert "| `max_connections_per_ip` | integer | `20` | `1` to `100000` | applied |" in page
    assert "| `relay_password_file` | path, optional | not set | — | restart |" in page  # all of [outbound]
    assert "| `timeout` | duration | `\"30m\"` | `\"30m\"` to `\"1d\"` | applied |" in page  # [imap]
    assert "| `workers` | integer | `1` | `1` to `64` | restart |" in page  # smtp.workers
    assert "In the example: `max_connections = 5`, `max_connections_per_ip = 2`" in page


def test_a_key_whose_comment_says_restart_is_one_reload_keeps():
    """The example's word and reload's list agree: a key documented as needing a restart is
    one a reload keeps (and logs as reload.restart_needed), not one it half applies."""
    from postroom.reload import RESTART_NEEDED

    example = parse_example(EXAMPLE.read_text())
    said = sorted({f"{section}.{key}" for (section, key), doc in example.keys.items()
                   if re.search(r"\bneeds? a restart\b", " ".join(doc.prose))})
    applied = [key for key in said if key not in RESTART_NEEDED and key.split(".")[0] not in RESTART_NEEDED]
    assert not applied, f"documented as needing a restart, but a reload applies them: {applied}"
