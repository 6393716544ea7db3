"""The spool's index and the outbox on both backends: SQLite in the spool (the default) and a
real PostgreSQL (tests/postgres.py): the same behaviour, and on a shared index, claimers that
never take the same job or delivery and stale claims that cannot record an outcome."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dcn_node.config import parse_settings
from dcn_node.errors import ConfigError
from dcn_node.header import InstanceHeader, header_from_dataset
from dcn_node.pipeline.series import SeriesAssembler
from dcn_node.store.outbox import Outbox, ResultObject
from dcn_node.store.spool import Job, SeriesRecord, Spool
from tests.conftest import send_datasets, wait_for
from tests.dicom_factory import ct_series
from tests.postgres import PostgresServer

DESTINATIONS = {"pacs": ("seg", "sr"), "viewer": ("seg",)}


@pytest.fixture
def spool(tmp_path: Path, store_url: str | None) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool", url=store_url)
    yield opened
    opened.close()


def store(spool: Spool, header: InstanceHeader) -> bool:
    return spool.store_instance(header, (b"meta", b"body"),
                                transfer_syntax_uid=ExplicitVRLittleEndian,
                                calling_ae_title="PACS")


def received_series(spool: Spool, count: int = 3) -> list[InstanceHeader]:
    headers = [header_from_dataset(ds) for ds in ct_series(count)]
    for header in headers:
        store(spool, header)
    return headers


def complete(spool: Spool, header: InstanceHeader) -> SeriesRecord:
    """Close the series of ``header`` as accepted: a job is queued."""
    record = spool.get_series(header.study_instance_uid, header.series_instance_uid)
    assert record is not None
    assert spool.close_series(record, "queued", None, enqueue=True)
    return record


def queued_jobs(spool: Spool, count: int) -> list[SeriesRecord]:
    return [complete(spool, received_series(spool, 1)[0]) for _ in range(count)]


def objects(tmp_path: Path, n: int = 2) -> list[ResultObject]:
    kinds = ["seg", "sr", "sc"]
    return [ResultObject(kinds[i % 3], "1.2.840.10008.5.1.4.1.1.66.4", f"1.2.9.{i}",
                         tmp_path / f"{i}.dcm") for i in range(n)]


# -- the same behaviour on both -----------------------------------------------------------


def test_instances_series_jobs_and_timeline(spool: Spool) -> None:
    headers = received_series(spool, 3)
    first = headers[0]
    assert store(spool, first) is True  # the same SOP Instance again replaces it
    record = spool.get_series(first.study_instance_uid, first.series_instance_uid)
    assert record is not None
    assert (record.state, record.instances, record.frames, record.generation) == \
        ("receiving", 3, 3, 0)
    assert record.first_received_at <= record.last_received_at <= spool.now()
    assert [s.series_instance_uid for s in spool.list_series("receiving")] == \
        [first.series_instance_uid]
    stored = spool.series_instances(first.study_instance_uid, first.series_instance_uid)
    assert sorted(i.header.sop_instance_uid for i in stored) == \
        sorted(h.sop_instance_uid for h in headers)
    assert stored[0].header == next(h for h in headers
                                    if h.sop_instance_uid == stored[0].header.sop_instance_uid)

    complete(spool, first)
    assert not spool.close_series(record, "queued", None, enqueue=True)  # applied once
    assert spool.count_jobs("queued") == 1
    job = spool.claim_next_job()
    assert job is not None and job.state == "processing" and job.claim == 1
    assert spool.claim_next_job() is None
    spool.record_event(first.study_instance_uid, first.series_instance_uid, 0, "inference_start")
    spool.record_event(first.study_instance_uid, first.series_instance_uid, 0, "inference_end")
    assert spool.finish_job(job, "done")
    done = spool.get_series(first.study_instance_uid, first.series_instance_uid)
    assert done is not None and done.state == "done"
    assert [j.state for j in spool.list_jobs()] == ["done"]
    events = [e for _, e, _, _ in spool.timeline(first.study_instance_uid,
                                                 first.series_instance_uid)]
    assert events == ["first_received", "complete", "inference_start", "inference_end"]


def test_a_late_arrival_reopens_the_series_and_supersedes_its_queued_job(spool: Spool) -> None:
    headers = [header_from_dataset(ds) for ds in ct_series(3)]
    for header in headers[:2]:
        store(spool, header)
    complete(spool, headers[0])
    store(spool, headers[2])
    record = spool.get_series(headers[0].study_instance_uid, headers[0].series_instance_uid)
    assert record is not None and (record.state, record.generation) == ("receiving", 1)
    assert [j.state for j in spool.list_jobs()] == ["superseded"]
    complete(spool, headers[0])
    job = spool.claim_next_job()
    assert job is not None and job.generation == 1


def test_recovery_runs_unleased_and_expired_claims_again_not_live_leases(spool: Spool) -> None:
    queued_jobs(spool, 3)
    unleased = spool.claim_next_job()
    live = spool.claim_next_job("node-c", lease_seconds=600.0)
    expired = spool.claim_next_job("node-b", lease_seconds=-1.0)  # runs out at once
    assert unleased and expired and live
    spool.recover()
    by_id = {j.job_id: j for j in spool.list_jobs()}
    assert by_id[unleased.job_id].state == "queued"
    assert by_id[expired.job_id].state == "queued"
    assert by_id[live.job_id].state == "processing"
    states = {s.series_instance_uid: s.state for s in spool.list_series()}
    assert states[live.series_instance_uid] == "processing"
    assert states[unleased.series_instance_uid] == states[expired.series_instance_uid] == \
        "queued"


def series_record(spool: Spool, header: InstanceHeader) -> SeriesRecord:
    record = spool.get_series(header.study_instance_uid, header.series_instance_uid)
    assert record is not None
    return record


def test_a_series_is_assessed_by_one_claimer_until_its_lease_runs_out(spool: Spool) -> None:
    header = received_series(spool, 3)[0]
    record = series_record(spool, header)
    assert spool.claim_assessment(record, "node-a", lease_seconds=-1.0)  # runs out at once
    assert series_record(spool, header).state == "complete"
    assert [s.series_instance_uid for s in spool.series_to_assess(spool.now())] == \
        [header.series_instance_uid]  # anyone's to assess again
    assert spool.claim_assessment(record, "node-b", lease_seconds=600.0)  # taken over
    assert not spool.claim_assessment(record, "node-c", lease_seconds=600.0)
    assert spool.series_to_assess(spool.now()) == []
    # The claim taken over decides nothing; neither does a closer without a claim.
    assert not spool.close_series(record, "rejected", "gap", enqueue=False, owner="node-a")
    assert not spool.close_series(record, "rejected", "gap", enqueue=False)
    assert spool.close_series(record, "queued", None, enqueue=True, owner="node-b")
    assert (series_record(spool, header).state, spool.count_jobs("queued")) == ("queued", 1)
    assert spool.query("SELECT lease_owner, lease_expires_at FROM series") == [(None, None)]


def test_the_assembler_passes_over_a_series_another_node_is_assessing(spool: Spool) -> None:
    settings = parse_settings({"completion": {"quiet_seconds": 0.01}})
    header = received_series(spool, 3)[0]
    assembler = SeriesAssembler(spool, settings.completion, settings.selection,
                                owner="node-b", lease_seconds=600.0)
    assert spool.claim_assessment(series_record(spool, header), "node-a", lease_seconds=0.5)
    assert assembler.check() == []  # node-a is at it
    time.sleep(0.6)  # node-a's lease runs out: it stopped, or was cut off
    ((record, assessment),) = assembler.check()
    assert record.series_instance_uid == header.series_instance_uid
    assert series_record(spool, header).state == assessment.state == "rejected"  # 3 slices


def test_an_instance_arriving_during_an_assessment_wins(spool: Spool) -> None:
    headers = [header_from_dataset(ds) for ds in ct_series(3)]
    for header in headers[:2]:
        store(spool, header)
    record = series_record(spool, headers[0])
    assert spool.claim_assessment(record, "node-a", lease_seconds=600.0)
    store(spool, headers[2])  # reopens the series: generation 1, receiving
    assert not spool.close_series(record, "queued", None, enqueue=True, owner="node-a")
    reopened = series_record(spool, headers[0])
    assert (reopened.state, reopened.generation) == ("receiving", 1)
    assert spool.claim_assessment(reopened, "node-b", lease_seconds=600.0)


def test_recovery_takes_back_this_nodes_and_expired_assessments_not_another_live_nodes(
        spool: Spool) -> None:
    mine, theirs, expired, unleased = (series_record(spool, received_series(spool, 1)[0])
                                       for _ in range(4))
    assert spool.claim_assessment(mine, "node-a", lease_seconds=600.0)
    assert spool.claim_assessment(theirs, "node-b", lease_seconds=600.0)
    assert spool.claim_assessment(expired, "node-c", lease_seconds=-1.0)
    assert spool.claim_assessment(unleased, "node-d")  # one node: held until it decides
    spool.recover("node-a")  # node-a restarted under its own id
    states = {s.series_instance_uid: s.state for s in spool.list_series()}
    assert states == {mine.series_instance_uid: "receiving",
                      theirs.series_instance_uid: "complete",
                      expired.series_instance_uid: "receiving",
                      unleased.series_instance_uid: "receiving"}
    # node-b, still at it, decides its series as if nobody had restarted.
    assert spool.close_series(theirs, "queued", None, enqueue=True, owner="node-b")


def test_a_stale_generations_claim_cannot_mark_a_newer_generation_done(spool: Spool) -> None:
    headers = [header_from_dataset(ds) for ds in ct_series(3)]
    for header in headers[:2]:
        store(spool, header)
    complete(spool, headers[0])
    stale = spool.claim_next_job()  # generation 0, being analysed ...
    assert stale is not None and stale.generation == 0
    store(spool, headers[2])  # ... when a late arrival makes generation 1
    complete(spool, headers[0])
    newer = spool.claim_next_job()
    assert newer is not None and newer.generation == 1
    spool.finish_job(stale, "done")
    record = spool.get_series(stale.study_instance_uid, stale.series_instance_uid)
    assert record is not None and (record.state, record.generation) == ("processing", 1)
    assert spool.finish_job(newer, "failed", "model error")
    record = spool.get_series(stale.study_instance_uid, stale.series_instance_uid)
    assert record is not None and (record.state, record.reason) == ("failed", "model error")


def test_a_claim_whose_lease_ran_out_cannot_finish_the_job(spool: Spool) -> None:
    queued_jobs(spool, 1)
    first = spool.claim_next_job("node-a", lease_seconds=-1.0)  # runs out at once
    assert first is not None
    assert spool.renew_lease(first, -1.0)  # still its job: the lease can be renewed
    second = spool.claim_next_job("node-b", lease_seconds=60.0)
    assert second is not None and second.job_id == first.job_id and second.claim == 2
    assert not spool.renew_lease(first, 60.0)
    assert not spool.finish_job(first, "failed", "too slow")
    assert spool.finish_job(second, "done")
    (job,) = spool.list_jobs()
    assert (job.state, job.reason, job.claim) == ("done", None, 2)
    assert spool.claim_next_job("node-c", lease_seconds=60.0) is None


def test_the_outbox(spool: Spool, tmp_path: Path) -> None:
    (record,) = queued_jobs(spool, 1)
    job = spool.claim_next_job()
    assert job is not None
    box = Outbox(spool)
    set_id = box.record_result_set(job, tmp_path, objects(tmp_path, 3), DESTINATIONS)
    assert box.result_set_counts(set_id) == {"pending": 3}  # seg + sr to pacs, seg to viewer
    due = box.due("pacs")
    assert [d.kind for d in due] == ["seg", "sr"] and due[0].path == tmp_path / "0.dcm"
    assert due[0].series_instance_uid == record.series_instance_uid
    assert box.next_attempt_at("pacs") is not None
    assert not box.mark_sent(due[0])
    box.mark_retry(due[1], "association rejected", spool.now() + 3600)
    assert box.due("pacs") == []
    assert box.mark_sent(box.due("viewer")[0])  # the viewer's only object
    box.mark_dead(box.deliveries(state="pending")[0], "refused")
    assert box.counts() == {"pacs": {"sent": 1, "dead": 1}, "viewer": {"sent": 1}}
    backlog = box.backlog()
    assert backlog["pacs"].dead == 1 and backlog["pacs"].pending == 0
    assert box.retry_dead("pacs") == 1
    assert box.backlog()["pacs"].pending == 1 and box.backlog()["pacs"].oldest_pending_at
    assert box.deliveries_of(job.study_instance_uid, job.series_instance_uid, 0) == 3
    # A newer result set supersedes what was not sent.
    newer = box.record_result_set(job, tmp_path, objects(tmp_path, 1), DESTINATIONS)
    assert box.result_set_counts(set_id) == {"sent": 2, "superseded": 1}
    assert box.result_set_counts(newer) == {"pending": 2}


def test_outbox_claims_hold_deliveries_until_an_outcome_or_the_lease_ends(
        spool: Spool, tmp_path: Path) -> None:
    queued_jobs(spool, 1)
    job = spool.claim_next_job()
    assert job is not None
    box = Outbox(spool)
    box.record_result_set(job, tmp_path, objects(tmp_path, 2), DESTINATIONS)
    held = box.claim("pacs", "node-a", lease_seconds=60.0)
    assert [d.kind for d in held] == ["seg", "sr"]
    assert box.claim("pacs", "node-b", lease_seconds=60.0) == []
    assert box.due("pacs") == []
    box.mark_retry(held[1], "timeout", spool.now() - 1)  # an outcome ends the lease
    assert [d.kind for d in box.claim("pacs", "node-b", lease_seconds=-1.0)] == ["sr"]
    # That lease ran out at once: the delivery is anyone's again.
    assert [d.kind for d in box.claim("pacs", "node-c", lease_seconds=60.0)] == ["sr"]


def test_recovery_takes_back_this_nodes_claims_not_another_live_nodes(spool: Spool,
                                                                       tmp_path: Path) -> None:
    queued_jobs(spool, 3)
    mine = spool.claim_next_job("node-a", lease_seconds=600.0)
    theirs = spool.claim_next_job("node-b", lease_seconds=600.0)
    done = spool.claim_next_job("node-a", lease_seconds=600.0)
    assert mine and theirs and done
    box = Outbox(spool)
    box.record_result_set(done, tmp_path, objects(tmp_path, 2), {"pacs": ("seg",),
                                                                   "viewer": ("sr",)})
    assert [d.kind for d in box.claim("pacs", "node-a", 600.0)] == ["seg"]
    assert [d.kind for d in box.claim("viewer", "node-b", 600.0)] == ["sr"]
    spool.recover("node-a")  # node-a restarted under its own id
    assert box.release("node-a") == 1
    states = {j.job_id: j.state for j in spool.list_jobs()}
    assert (states[mine.job_id], states[theirs.job_id]) == ("queued", "processing")
    assert [d.kind for d in box.claim("pacs", "node-c", 600.0)] == ["seg"]
    assert box.claim("viewer", "node-c", 600.0) == []  # node-b is still at it


def test_a_result_set_is_recorded_only_by_the_jobs_latest_claim(spool: Spool,
                                                                tmp_path: Path) -> None:
    """A worker whose lease ran out while it analysed, and whose job another node claimed,
    records no result set; the latest claim records one and finishes the job with it."""
    queued_jobs(spool, 1)
    first = spool.claim_next_job("node-a", lease_seconds=-1.0)  # runs out at once
    second = spool.claim_next_job("node-b", lease_seconds=60.0)
    assert first and second and second.claim == 2
    box = Outbox(spool)
    for finish in (True, False):
        assert box.record_result_set(first, tmp_path, objects(tmp_path), DESTINATIONS,
                                     finish=finish) is None
    assert box.deliveries() == [] and spool.list_jobs()[0].state == "processing"
    set_id = box.record_result_set(second, tmp_path, objects(tmp_path), DESTINATIONS,
                                   finish=True)
    assert set_id is not None and box.result_set_counts(set_id) == {"pending": 3}
    (job,) = spool.list_jobs()
    assert (job.state, job.claim) == ("done", 2)
    record = spool.get_series(job.study_instance_uid, job.series_instance_uid)
    assert record is not None and record.state == "done"
    assert not spool.renew_lease(second, 60.0)  # finished: nothing left to renew


def test_delivery_outcomes_are_recorded_only_by_their_claimer(spool: Spool,
                                                              tmp_path: Path) -> None:
    queued_jobs(spool, 1)
    job = spool.claim_next_job()
    assert job is not None
    box = Outbox(spool)
    box.record_result_set(job, tmp_path, objects(tmp_path, 2), {"pacs": ("seg", "sr")})
    stale = box.claim("pacs", "node-a", lease_seconds=-1.0)  # runs out at once
    assert box.renew("pacs", "node-a", -1.0) == 2
    now = spool.now()
    assert box.next_attempt_at("pacs") <= now
    held = box.claim("pacs", "node-b", lease_seconds=60.0)
    assert [d.delivery_id for d in held] == [d.delivery_id for d in stale]
    assert box.next_attempt_at("pacs") >= now + 59  # nothing to claim before node-b's ends
    assert box.renew("pacs", "node-a", 60.0) == 0
    box.mark_sent(stale[0], owner="node-a")
    box.mark_dead(stale[1], "refused", owner="node-a")
    assert box.counts() == {"pacs": {"pending": 2}}
    box.mark_sent(held[0], owner="node-b")
    box.mark_retry(held[1], "busy", now - 1, owner="node-b")
    assert box.counts() == {"pacs": {"pending": 1, "sent": 1}}
    assert box.release("node-b") == 0  # an outcome ended the lease already
    again = box.claim("pacs", "node-b", lease_seconds=60.0)
    assert [d.delivery_id for d in again] == [held[1].delivery_id]
    assert box.mark_sent(again[0], owner="node-b")  # the set's last object: complete
    # A late outcome from the claim taken over records nothing and completes nothing.
    assert not box.mark_sent(stale[1], owner="node-a")
    assert box.counts() == {"pacs": {"sent": 2}}


def test_store_url_is_unset_by_default_and_only_postgresql() -> None:
    assert parse_settings({}).store.url is None
    url = "postgresql://dcn@db.example:5432/dcn"
    assert parse_settings({"store": {"url": url}}).store.url == url
    with pytest.raises(ConfigError, match="store.url: .*postgresql:// URL"):
        parse_settings({"store": {"url": "mysql://db/dcn"}})


def test_a_postgresql_store_without_psycopg_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(ConfigError, match=r"dcn-node\[cluster\]"):
        Spool(tmp_path / "spool", url="postgresql:///dcn")


# -- claimers sharing one index (nodes of a cluster) ----------------------------------


def claim_all(spool_dir: Path, url: str | None, claimers: int, take) -> list[list]:
    """Run ``claimers`` threads, each with its own Spool on the shared index (as nodes
    would), each calling ``take(spool, name)`` until it returns nothing."""
    spools = [Spool(spool_dir, url=url) for _ in range(claimers)]
    taken: list[list] = [[] for _ in range(claimers)]
    start = threading.Barrier(claimers)

    def run(i: int) -> None:
        start.wait()
        while got := take(spools[i], f"node-{i}"):
            taken[i].extend(got)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for opened in spools:
        opened.close()
    return taken


def test_concurrent_claimers_never_take_the_same_job(spool: Spool, tmp_path: Path,
                                                     store_url: str | None) -> None:
    queued_jobs(spool, 40)

    def take(claimer: Spool, name: str) -> list[Job]:
        job = claimer.claim_next_job(name, lease_seconds=60.0)
        return [job] if job else []

    taken = claim_all(spool.root, store_url, 4, take)
    ids = [j.job_id for part in taken for j in part]
    assert sorted(ids) == sorted(j.job_id for j in spool.list_jobs())
    assert len(set(ids)) == len(ids) == 40
    assert spool.count_jobs("processing") == 40


def test_concurrent_claimers_never_take_the_same_delivery(spool: Spool, tmp_path: Path,
                                                          store_url: str | None) -> None:
    box = Outbox(spool)
    for _ in queued_jobs(spool, 10):
        job = spool.claim_next_job()
        assert job is not None
        box.record_result_set(job, tmp_path, objects(tmp_path, 4), {"pacs": ("seg", "sr", "sc")})

    taken = claim_all(spool.root, store_url, 4,
                      lambda claimer, name: Outbox(claimer).claim("pacs", name, 60.0, limit=3))
    ids = [d.delivery_id for part in taken for d in part]
    assert len(set(ids)) == len(ids) == 40


# -- PostgreSQL: rows another transaction holds are passed over, not waited for --------


def test_postgresql_claims_skip_rows_locked_by_another_claimer(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    import psycopg

    url = postgres_server.new_database()
    spool = Spool(tmp_path / "spool", url=url)
    try:
        queued_jobs(spool, 2)
        first = spool.list_jobs()[0]
        job = spool.claim_next_job()
        assert job is not None
        box = Outbox(spool)
        box.record_result_set(job, tmp_path, objects(tmp_path, 2), {"pacs": ("seg", "sr")})
        delivery = box.due("pacs")[0]
        spool.recover()  # the claimed job is queued again: both jobs claimable
        with psycopg.connect(url) as other:  # a claimer mid-transaction holds the first rows
            other.execute("SELECT 1 FROM jobs WHERE job_id=%s FOR UPDATE", (first.job_id,))
            other.execute("SELECT 1 FROM deliveries WHERE delivery_id=%s FOR UPDATE",
                          (delivery.delivery_id,))
            started = time.monotonic()
            claimed = spool.claim_next_job("node-b", lease_seconds=60.0)
            held = box.claim("pacs", "node-b", 60.0)
            assert time.monotonic() - started < 5
            assert claimed is not None and claimed.job_id != first.job_id
            assert [d.delivery_id for d in held] != [] and \
                delivery.delivery_id not in [d.delivery_id for d in held]
    finally:
        spool.close()


def test_postgresql_timestamps_come_from_the_database(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    import psycopg

    url = postgres_server.new_database()
    spool = Spool(tmp_path / "spool", url=url)
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()
        assert row is not None and abs(spool.now() - row[0]) < 5
        header = received_series(spool, 1)[0]
        with psycopg.connect(url) as conn:
            (received_at,), = conn.execute("SELECT received_at FROM instances").fetchall()
            (now,), = conn.execute("SELECT EXTRACT(EPOCH FROM now())::float8").fetchall()
        assert now - 5 < received_at <= now
        assert spool.get_series(header.study_instance_uid, header.series_instance_uid)
    finally:
        spool.close()


def test_the_node_keeps_its_index_in_the_configured_postgresql(
        start_node, tmp_path: Path, postgres_server: PostgresServer) -> None:
    """store.url wires the node to PostgreSQL: a received series is recorded, completed and
    queued there, and no index.sqlite3 is made in the spool."""
    import psycopg

    url = postgres_server.new_database()
    node = start_node(store={"url": url})
    series = ct_series(6)
    assert send_datasets(series, node.receiver.port) == [0] * 6
    record = wait_for(lambda: next(iter(node.spool.list_series("queued")), None), timeout=15)
    assert record.series_instance_uid == series[0].SeriesInstanceUID and record.instances == 6
    with psycopg.connect(url) as conn:
        jobs = conn.execute("SELECT series_instance_uid, state, generation FROM jobs").fetchall()
    assert jobs == [(series[0].SeriesInstanceUID, "queued", 0)]
    assert not (node.spool.root / "index.sqlite3").exists()
