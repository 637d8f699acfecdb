"""The data directory: created on first use, its layout recorded so it cannot drift.

`<data_dir>/layout.json` records the format version and the shard count chosen when the
directory was initialised. A later config with another `[storage] shards` is refused with a
clear error instead of silently mapping accounts to other shards (DESIGN.md, "Store").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from storage.errors import DataDirError

FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class DataDir:
    path: Path
    shards: int

    @property
    def accounts_path(self) -> Path:
        return self.path / "accounts.lmdb"

    @property
    def logins_path(self) -> Path:
        """Failed logins per client address, shared by every daemon (policy/logins.py)."""
        return self.path / "logins.lmdb"

    @property
    def rates_path(self) -> Path:
        """The rate limits' token buckets, shared by mtad's processes (policy/rates.py)."""
        return self.path / "rates.lmdb"

    @property
    def greylist_path(self) -> Path:
        """Greylisting's triplets and trusted domains (policy/greylist.py)."""
        return self.path / "greylist.lmdb"

    def shard_path(self, number: int) -> Path:
        """Shard `number`'s directory (in cluster mode, where its volume is attached)."""
        width = max(2, len(str(self.shards - 1)))
        return self.path / "shards" / f"{number:0{width}d}"

    def cluster_table_path(self, node: str) -> Path:
        """Cluster mode: what node `node`'s agent publishes for this machine's processes
        (cluster/local.py); named by node, so nodes sharing a directory in tests keep theirs."""
        return self.path / "cluster" / f"{node}.lmdb"

    def cluster_pins_path(self, node: str) -> Path:
        """Cluster mode: node `node`'s shard pins (cluster/pins.py), on the node's own disk,
        never on the volumes they guard; named by node, as its table is."""
        return self.path / "cluster" / f"{node}.pins"

    @property
    def audit_log_path(self) -> Path:
        """Who changed which account when (postroom/admin.py's AuditLog)."""
        return self.path / "audit.log"


def open_data_dir(path: Path | str, shards: int) -> DataDir:
    """Open (creating and recording on first use) the data dir at `path`."""
    path = Path(path)
    try:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as e:
        raise DataDirError(f"{path}: cannot create data directory: {e.strerror}") from None
    layout_path = path / LAYOUT_FILE
    try:
        layout = json.loads(layout_path.read_text())
    except FileNotFoundError:
        _write_layout(layout_path, {"format": FORMAT_VERSION, "shards": shards})
        layout = json.loads(layout_path.read_text())
    except (OSError, ValueError) as e:
        raise DataDirError(f"{layout_path}: unreadable layout record: {e}") from None
    if layout.get("format") != FORMAT_VERSION:
        raise DataDirError(f"{layout_path}: format {layout.get('format')!r}, this Postroom reads {FORMAT_VERSION}")
    if layout.get("shards") != shards:
        raise DataDirError(
            f"{path} was initialised with {layout.get('shards')} shards but [storage] shards = {shards}; "
            f"set shards = {layout.get('shards')} (re-sharding is not automatic)"
        )
    return DataDir(path, shards)


def _write_layout(layout_path: Path, layout: dict) -> None:
    tmp = layout_path.with_name(f".{LAYOUT_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(layout, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # link() fails if another process initialised the directory first: theirs stands.
        try:
            os.link(tmp, layout_path)
        except FileExistsError:
            pass
        os.unlink(tmp)
        dir_fd = os.open(layout_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise DataDirError(f"{layout_path}: cannot write: {e.strerror}") from None
