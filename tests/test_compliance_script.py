"""tests/compliance.py's own logic, on groups written here (imaptest itself runs in `make
compliance`): the groups that cannot run for want of a capability are found from their
`capabilities:` lines, and HEADER_FIXES is applied to a copy once."""

from __future__ import annotations

import compliance


def test_groups_whose_capabilities_are_not_offered_are_found(tmp_path):
    (tmp_path / "plain").write_text("messages: 2\n\nok noop\n")
    (tmp_path / "urlauth").write_text("capabilities: urlauth\nmessages: 2\n\nok noop\n")
    (tmp_path / "both").write_text("capabilities: urlauth urlauth=binary\n\nok noop\n")
    (tmp_path / "late").write_text("messages: 1\n\ncapabilities: xother\n")  # not the header: ignored
    (tmp_path / "default.mbox").write_text("From a\n\ncapabilities: nothing\n")
    groups = compliance.required_capabilities(tmp_path)
    assert groups == {"both": ["urlauth", "urlauth=binary"], "late": [], "plain": [], "urlauth": ["urlauth"]}
    assert compliance.not_run(groups, {"IMAP4REV1", "URLAUTH"}) == {"both": ["urlauth=binary"]}
    assert compliance.not_run(groups, {"URLAUTH", "URLAUTH=BINARY"}) == {}
    assert compliance.not_run(groups, set()) == {"both": ["urlauth", "urlauth=binary"], "urlauth": ["urlauth"]}


def test_header_fixes_are_applied_to_a_copy_only_where_missing(tmp_path):
    source = tmp_path / "tests"
    source.mkdir()
    (source / "urlauth2").write_text("capabilities: urlauth\nconnections: 2\n\n1 ok noop\n")
    copy = compliance.fixed_groups(source, tmp_path / "copy")
    assert (copy / "urlauth2").read_text().startswith("messages: 2\ncapabilities: urlauth\n")
    assert (source / "urlauth2").read_text().startswith("capabilities: urlauth\n")
    (source / "urlauth2").write_text("messages: all\ncapabilities: urlauth\n\n1 ok noop\n")
    again = compliance.fixed_groups(source, tmp_path / "again")
    assert (again / "urlauth2").read_text().startswith("messages: all\n")
