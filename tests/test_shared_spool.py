"""Nodes sharing one spool folder and one PostgreSQL store (cluster mode: the folder is on
NFS in production, a local folder here). A node starting up takes back only what is its
own or stale: another live node's half-written temp file, or the file it renamed into
place and is about to record, is left to it. With the embedded SQLite index the folder is
one node's, and start-up takes everything back, as before cluster mode."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dcn_node.header import InstanceHeader, header_from_dataset
from dcn_node.store.quarantine import Quarantine
from dcn_node.store.shared_folder import LEFTOVER_SECONDS, NodeFiles, node_tag
from dcn_node.store.spool import Spool
from tests.dicom_factory import ct_series
from tests.postgres import PostgresServer


@pytest.fixture
def shared_url(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()


@pytest.fixture
def node_a(spool_dir: Path, shared_url: str) -> Iterator[Spool]:
    spool = Spool(spool_dir, url=shared_url, node_id="node-a")
    yield spool
    spool.close()


@pytest.fixture
def node_b(spool_dir: Path, shared_url: str) -> Iterator[Spool]:
    spool = Spool(spool_dir, url=shared_url, node_id="node-b")
    yield spool
    spool.close()


def touch(path: Path, *, age: float = 0.0) -> Path:
    """A file at ``path``, last written ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half written")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def crashed_nodes_temp(folder: Path, name: str, *, hidden: bool = False) -> Path:
    """A temp file left by a node that crashed long ago (under an id never seen again)."""
    files = NodeFiles("host-4242-dead", shared=True)
    return touch(folder / files.temp_name(name, 7, hidden=hidden), age=2 * LEFTOVER_SECONDS)


def stored_file(spool: Spool, ds: Dataset, *, age: float = 0.0) -> tuple[InstanceHeader, Path]:
    """``ds`` renamed into its place in the spool but not recorded: a node between the
    two steps of a C-STORE (or one that crashed there)."""
    header = header_from_dataset(ds)
    path = spool.instance_path(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    when = time.time() - age
    os.utime(path, (when, when))
    return header, path


def test_node_tags_are_file_name_safe_and_distinct() -> None:
    assert node_tag("node-a") == "node-a"
    odd = [node_tag(n) for n in ("a.b", "a_b", "a/b", "x" * 200, "x" * 199 + "y")]
    assert len(set(odd)) == len(odd)
    assert all(len(t) <= 48 and t.replace("-", "").replace("_", "").isalnum() for t in odd)


def test_start_up_removes_its_own_and_stale_temp_files_not_another_live_nodes(
        node_a: Spool, node_b: Spool) -> None:
    incoming = node_a.incoming_dir
    mine = touch(incoming / node_a.node_files.temp_name("1.2.3.1.dcm", 140))
    theirs = touch(incoming / node_b.node_files.temp_name("1.2.3.2.dcm", 140))
    crashed = crashed_nodes_temp(incoming, "1.2.3.3.dcm")
    before_tags = touch(incoming / "1.2.3.4.dcm.140.tmp", age=2 * LEFTOVER_SECONDS)
    unknown_fresh = touch(incoming / "1.2.3.5.dcm.140.tmp")
    # Result objects being written (results.builder: not named after a node).
    results = node_a.results_dir_for("1.2.3", 0) / "seg"
    result_stale = touch(results / ".tmpab12.partial", age=2 * LEFTOVER_SECONDS)
    result_fresh = touch(results / ".tmpcd34.partial")
    node_a.recover("node-a")
    assert not mine.exists() and not crashed.exists() and not before_tags.exists()
    assert theirs.read_bytes() == b"half written"  # node-b is still writing it
    assert unknown_fresh.exists()  # whose it is cannot be told: left until it is stale
    assert not result_stale.exists() and result_fresh.exists()


def test_start_up_leaves_a_file_another_node_is_recording_and_indexes_stale_ones(
        node_a: Spool, node_b: Spool) -> None:
    fresh_ds, stale_ds = ct_series(2)
    fresh, fresh_path = stored_file(node_b, fresh_ds)  # node-b renamed it in just now
    stale, stale_path = stored_file(node_b, stale_ds, age=2 * LEFTOVER_SECONDS)
    node_a.recover("node-a")
    indexed = node_a.query("SELECT sop_instance_uid, calling_ae_title FROM instances")
    assert indexed == [(stale.sop_instance_uid, "")]  # the crash leftover is taken in
    # node-b records its instance: a first copy, not a replacement of one node-a found.
    replaced = node_b.store_instance(fresh, (fresh_path.read_bytes(),),
                                     transfer_syntax_uid=ExplicitVRLittleEndian,
                                     calling_ae_title="PACS")
    assert replaced is False
    assert sorted(node_a.query("SELECT calling_ae_title FROM instances")) == [("",), ("PACS",)]


def test_a_file_found_never_overwrites_what_a_node_recorded(node_a: Spool,
                                                            tmp_path: Path) -> None:
    """A copy left behind of an instance re-sent under another series (its node crashed
    before removing it) is not indexed over the record of the newer copy."""
    (ds,) = ct_series(1)
    header = header_from_dataset(ds)
    node_a.store_instance(header, (b"meta", b"body"), transfer_syntax_uid=ExplicitVRLittleEndian,
                          calling_ae_title="PACS")
    recorded = node_a.query("SELECT path FROM instances")
    ds.SeriesInstanceUID = generate_uid()  # the older copy, in another series
    stored_file(node_a, ds, age=2 * LEFTOVER_SECONDS)
    node_a.recover("node-a")
    assert node_a.query("SELECT path FROM instances") == recorded


def test_quarantine_start_up_removes_only_its_own_and_stale_temp_files(
        node_a: Spool, node_b: Spool) -> None:
    day = node_a.root / "quarantine" / "2026-01-02"
    mine = touch(day / node_a.node_files.temp_name("1.2.3.1.dcm", "ab", hidden=True))
    theirs = touch(day / node_b.node_files.temp_name("1.2.3.2.dcm", "ab", hidden=True))
    crashed = crashed_nodes_temp(day, "1.2.3.3.dcm", hidden=True)
    Quarantine(node_a.root, 1 << 20, node_files=node_a.node_files)
    assert not mine.exists() and not crashed.exists() and theirs.exists()


def test_with_the_embedded_index_every_leftover_is_this_nodes(spool_dir: Path) -> None:
    """SQLite in the spool: nobody else writes there, so start-up removes every temp file
    and indexes every unrecorded file at once, whatever their names and ages."""
    spool = Spool(spool_dir, node_id="node-a")
    try:
        temps = [touch(spool.incoming_dir / NodeFiles("node-b", shared=False).temp_name(
                     "1.2.3.1.dcm", 1)), touch(spool.incoming_dir / "1.2.3.2.dcm.140.tmp")]
        quarantined = touch(spool.root / "quarantine" / "2026-01-02" / ".1.2.3.dcm.ab.tmp")
        result = touch(spool.results_dir_for("1.2.3", 1) / "sr" / ".tmpab12.partial")
        header, _ = stored_file(spool, ct_series(1)[0])
        spool.recover("node-a")
        Quarantine(spool.root, 1 << 20, node_files=spool.node_files)
        assert not any(p.exists() for p in (*temps, quarantined, result))
        assert spool.query("SELECT sop_instance_uid FROM instances") == \
            [(header.sop_instance_uid,)]
    finally:
        spool.close()
