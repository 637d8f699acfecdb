"""Debian's Dovecot (dovecot-imapd) writing a Maildir, for tests that need one made by
Dovecot itself: its dovecot-uidlist, dovecot-keywords, file names and modified UTF-7 folder
names, exactly as a Dovecot server leaves them for `postroom store import`.

No server runs: `session()` starts Dovecot's imap process on a pipe, pre-authenticated
(what `doveadm exec imap` does), with a config of its own (nothing of /etc/dovecot is
read), and imaplib talks to it over stdin/stdout. It costs a tenth of a second, and there
is no daemon to stop (a Dovecot master takes two seconds to). As root it runs as `nobody`
(Dovecot will not keep mail as root), in a directory under /tmp that user can reach
(pytest's own are 0700).
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shlex
import shutil
import tempfile
from pathlib import Path

IMAP = Path("/usr/lib/dovecot/imap")
USER = "olduser"


class DovecotMaildir:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="test-dovecot-"))
        os.chmod(self.work, 0o755)
        home = self.work / "home"
        home.mkdir()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
            self._run_as = ["runuser", "-u", "nobody", "--"]
        self.home = home
        self.maildir = home / "Maildir"
        self.config = self.work / "dovecot.conf"
        self.config.write_text(f"""
base_dir = {self.work / 'run'}
state_dir = {self.work / 'state'}
log_path = {self.work / 'dovecot.log'}
mail_location = maildir:{self.maildir}
first_valid_uid = 0
""")

    def session(self) -> imaplib.IMAP4:
        """A pre-authenticated IMAP session of Dovecot's on this Maildir."""
        command = [*self._run_as, "env", f"HOME={self.home}", f"USER={USER}", str(IMAP), "-c", str(self.config)]
        return imaplib.IMAP4_stream(shlex.join(command))

    def log(self) -> str:
        path = self.work / "dovecot.log"
        return path.read_text() if path.exists() else ""

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
