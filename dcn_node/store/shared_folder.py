"""Files in a spool folder that several nodes may share (cluster mode: NFS in production).

A node writes each file to a temporary name and renames it into place. After a crash the
temporary files it left are its to remove; in a folder shared with other nodes, the same
folder also holds the other nodes' files half-written *right now*. So each node names its
temporary files after itself (:meth:`NodeFiles.temp_name`) and at start-up takes only

* its own leftovers, at once, and
* anyone's untouched for :data:`LEFTOVER_SECONDS` by the file system's own clock: their
  node crashed (and may never come back under that id: the default id is new at each
  start). A live node renames or removes its temporary file within moments.

In a folder that is one node's (the embedded SQLite index in the spool), every leftover is
that node's, as before cluster mode.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

LOGGER = logging.getLogger(__name__)

#: A file another node wrote and left untouched this long is a leftover of a crash. Far
#: longer than writing the largest dataset takes (node.max_dataset_bytes) on a slow share.
LEFTOVER_SECONDS = 3600.0

_UNSAFE_IN_TAG = re.compile(r"[^0-9A-Za-z_-]")
#: Between a node's tag and the rest of a temporary file's name: in no tag, and in no
#: name the spool makes from UIDs, so the tag is always read back exactly.
_TAG_END = "~"


def node_tag(node_id: str) -> str:
    """A short, file-name-safe form of ``node_id``; distinct ids give distinct tags."""
    safe = _UNSAFE_IN_TAG.sub("_", node_id)
    if safe == node_id and len(safe) <= 48:
        return safe
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:12]
    return f"{safe[:32]}-{digest}"


def file_system_now(folder: Path) -> float:
    """The time of the file system holding ``folder``: the modification time it gives a
    file written now (on NFS the server's clock, the one that stamped the files compared
    with it, whatever the hosts' clocks say)."""
    probe = folder / f".clock-{uuid.uuid4().hex}.tmp"
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _modified_at(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile: renamed into place or removed by its node
        return None


class NodeFiles:
    """How one node names its temporary files, and which leftover files it may take.

    Parameters
    ----------
    node_id:
        This node's id (``node.id``, or the default host-pid-xxxx).
    shared:
        Whether other nodes may write in the same folder: the nodes of a cluster (a
        PostgreSQL store) share the spool folder. False: everything in it is this node's.
    """

    def __init__(self, node_id: str, *, shared: bool) -> None:
        self.node_id = node_id
        self.shared = shared
        self.tag = node_tag(node_id)
        self._prefix = self.tag + _TAG_END

    def temp_name(self, name: str, unique: object, *, hidden: bool = False) -> str:
        """The name of this node's temporary file for ``name``; ``unique`` tells apart
        files of the same name written at once by this node (a thread id, a random hex)."""
        return f"{'.' if hidden else ''}{self._prefix}{name}.{unique}.tmp"

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is one of this node's temporary files."""
        return path.name.lstrip(".").startswith(self._prefix)

    def temp_leftovers(self, temps: Iterable[Path]) -> list[Path]:
        """Of the temporary files ``temps``, those this node may remove at start-up: every
        one when the folder is not shared; else its own and the stale ones."""
        temps = list(temps)
        if not self.shared:
            return temps
        mine = [p for p in temps if self.owns(p)]
        return mine + self.stale([p for p in temps if not self.owns(p)])

    def stale(self, paths: Iterable[Path]) -> list[Path]:
        """Of ``paths``, those untouched for :data:`LEFTOVER_SECONDS` (every one when the
        folder is not shared): what no live node is still working on."""
        paths = list(paths)
        if not self.shared or not paths:
            return paths
        cutoff = file_system_now(paths[0].parent) - LEFTOVER_SECONDS
        stale = []
        for path in paths:
            modified = _modified_at(path)
            if modified is not None and modified < cutoff:
                stale.append(path)
        if len(stale) < len(paths):
            LOGGER.info("%d file(s) in %s left to the nodes writing them (touched within "
                        "%.0f s)", len(paths) - len(stale), paths[0].parent, LEFTOVER_SECONDS)
        return stale

