"""The whole loop against a real PACS: Orthanc pushes a chest CT to the node, the node
sends SEG, SC and SR back into the same study, whatever fails on the way."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dcn_node.store.outbox import Outbox
from dcn_node.store.spool import Spool
from dcn_train.phantom import PhantomCase, generate_phantom
from tests.conftest import (
    NODE_AET,
    AssociationRejected,
    associate,
    free_port,
    require_tool,
    send_datasets,
    wait_for,
)
from tests.node_process import NodeProcess
from tests.orthanc import ORTHANC_AET, Orthanc, orthanc_workdir

RESULT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.7": "sc",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4": "sc",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.88.59": "ko",  # Key Object Selection Document
}


@pytest.fixture
def orthanc() -> Iterator[Orthanc]:
    require_tool("Orthanc")
    with orthanc_workdir() as workdir:
        pacs = Orthanc(workdir, free_port(), free_port())
        pacs.start()
        yield pacs
        pacs.stop()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomCase:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), seed=31, slices=24,
                            matrix=128, thickness_mm=5.0)


def upload(pacs: Orthanc, case: PhantomCase) -> str:
    """Put the phantom CT into Orthanc; returns Orthanc's id of the CT series."""
    for path in sorted(case.series_dir.glob("*.dcm")):
        pacs.upload(path)
    series = pacs.request("POST", "/tools/find", {
        "Level": "Series", "Query": {"SeriesInstanceUID": case.series_instance_uid}})
    assert len(series) == 1
    return str(series[0])


def push_to_node(pacs: Orthanc, series_id: str) -> None:
    """Orthanc sends the CT series to the node (synchronously: returns once every
    instance was acknowledged), as a PACS routing rule would."""
    pacs.request("POST", "/modalities/node/store",
                 {"Resources": [series_id], "Synchronous": True})


def result_instances(pacs: Orthanc, case: PhantomCase) -> dict[str, list[pydicom.Dataset]]:
    """The result objects Orthanc holds in the phantom's study, by kind."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for series in pacs.series_of_study(case.study_instance_uid):
        for instance_id in series["Instances"]:
            raw = pacs.request("GET", f"/instances/{instance_id}/file")
            ds = pydicom.dcmread(io.BytesIO(raw))
            kind = RESULT_SOP_CLASSES.get(str(ds.SOPClassUID))
            if kind:
                found.setdefault(kind, []).append(ds)
    return found


def node_config(pacs: Orthanc, models: Path, **extra: dict) -> dict:
    return {
        "destinations": [{"name": "pacs", "ae_title": ORTHANC_AET, "host": "127.0.0.1",
                          "port": pacs.dicom_port}],
        "inference": {"enabled": True, "device": "cpu", "models_dir": str(models)},
        "sender": {"retry_initial_seconds": 0.5, "retry_max_interval_seconds": 2.0},
        **extra,
    }


def delivered_sets(spool: Spool) -> int:
    """Result sets whose every delivery was acknowledged."""
    rows = spool.query(
        "SELECT COUNT(*) FROM result_sets r WHERE NOT EXISTS (SELECT 1 FROM deliveries d "
        "WHERE d.result_set_id = r.result_set_id AND d.state != 'sent') AND EXISTS ("
        "SELECT 1 FROM deliveries d WHERE d.result_set_id = r.result_set_id)")
    return int(rows[0][0])


def check_references(found: dict[str, list[pydicom.Dataset]], case: PhantomCase) -> None:
    ct_uids = set(case.sop_instance_uids)
    assert set(found) == {"seg", "sc", "sr", "ko"}, f"result kinds in Orthanc: {sorted(found)}"
    for kind, datasets in found.items():
        for ds in datasets:
            assert ds.StudyInstanceUID == case.study_instance_uid, kind
            assert ds.SeriesInstanceUID != case.series_instance_uid, kind
    (seg,) = found["seg"]
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == case.series_instance_uid
    assert referenced == ct_uids
    (sr,) = found["sr"]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert ct_uids <= evidence
    assert seg.SOPInstanceUID in evidence


@pytest.mark.slow
def test_orthanc_round_trip_resend_and_transcoded_input(
    start_node, orthanc: Orthanc, untrained_models: Path, phantom: PhantomCase
) -> None:
    node = start_node(**node_config(orthanc, untrained_models))
    orthanc.add_modality("node", NODE_AET, node.receiver.port)
    series_id = upload(orthanc, phantom)

    push_to_node(orthanc, series_id)
    wait_for(lambda: delivered_sets(node.spool) == 1, timeout=120, interval=0.2)
    first = result_instances(orthanc, phantom)
    check_references(first, phantom)
    counts = {kind: len(v) for kind, v in first.items()}
    uids = {kind: sorted(ds.SOPInstanceUID for ds in v) for kind, v in first.items()}

    # Timeline: every step of the series is recorded, in order.
    record = node.spool.get_series(phantom.study_instance_uid, phantom.series_instance_uid)
    events = [e for _, e, _, _ in node.spool.timeline(phantom.study_instance_uid,
                                                      phantom.series_instance_uid)]
    for step in ("first_received", "complete", "inference_start", "inference_end",
                 "results_recorded", "acknowledged", "results_delivered"):
        assert step in events, (step, events)
    assert events.index("inference_start") < events.index("results_recorded")
    assert record is not None and record.state == "done"

    # The same series again, then transcoded by Orthanc to JPEG-LS and J2K lossless
    # (Orthanc 1.10 proposes only the stored syntax, so the stored copy is transcoded):
    # each run's results replace the last in Orthanc (same UIDs), with the same masks.
    received_syntaxes = []
    for number, syntax in enumerate([None, JPEGLSLossless, JPEG2000Lossless], start=2):
        if syntax == JPEG2000Lossless:
            orthanc.stop()
            orthanc.start(gdcm=True)
        if syntax is not None:
            series_id = upload(orthanc, phantom)  # the uncompressed originals again
            orthanc.transcode_series(series_id, str(syntax))
        push_to_node(orthanc, series_id)
        wait_for(lambda n=number: delivered_sets(node.spool) == n, timeout=120,
                 interval=0.2)
        received_syntaxes.append({
            str(i.transfer_syntax_uid)
            for i in node.spool.series_instances(phantom.study_instance_uid,
                                                 phantom.series_instance_uid)
        })
    assert received_syntaxes == [{str(ExplicitVRLittleEndian)}, {str(JPEGLSLossless)},
                                 {str(JPEG2000Lossless)}]
    again = result_instances(orthanc, phantom)
    assert {kind: len(v) for kind, v in again.items()} == counts  # no duplicates
    assert {kind: sorted(ds.SOPInstanceUID for ds in v) for kind, v in again.items()} == uids

    summaries, masks = [], []
    for job in node.spool.list_jobs("done"):
        folder = node.spool.results_dir(job)
        summaries.append(json.loads((folder / "summary.json").read_text()))
        masks.append(np.load(folder / "masks.npz"))
    assert len(summaries) == 4
    for summary, mask in zip(summaries[1:], masks[1:], strict=True):
        assert summary["probability"] == summaries[0]["probability"]
        np.testing.assert_array_equal(mask["lesion"], masks[0]["lesion"])
        np.testing.assert_array_equal(mask["lung"], masks[0]["lung"])


def test_results_wait_for_the_pacs_to_come_back(
    start_node, orthanc: Orthanc, untrained_models: Path, tmp_path: Path
) -> None:
    # No announced slice count: the series completes after the 5 s quiet period only.
    phantom = generate_phantom(tmp_path / "case", seed=32, slices=24, matrix=128,
                               ImagesInAcquisition=None)
    node = start_node(**node_config(orthanc, untrained_models),
                      completion={"quiet_seconds": 5.0})
    orthanc.add_modality("node", NODE_AET, node.receiver.port)
    push_to_node(orthanc, upload(orthanc, phantom))
    orthanc.stop()  # down before the quiet period ends: results find nobody to take them

    outbox = Outbox(node.spool)
    wait_for(lambda: any(d.attempts >= 2 and d.state == "pending"
                         for d in outbox.deliveries()), timeout=120, interval=0.2)
    assert not outbox.deliveries(state="sent")
    orthanc.start()
    wait_for(lambda: delivered_sets(node.spool) == 1, timeout=60, interval=0.2)
    found = result_instances(orthanc, phantom)
    check_references(found, phantom)
    sent = outbox.deliveries(state="sent")
    assert sum(len(v) for v in found.values()) == len(sent)  # each object once
    assert all(d.attempts >= 2 for d in sent)  # failed at least once, then sent


@pytest.mark.slow
def test_kill_9_before_results_are_sent_then_restart(
    tmp_path: Path, orthanc: Orthanc, untrained_models: Path, phantom: PhantomCase
) -> None:
    workdir = tmp_path / "node"
    workdir.mkdir()
    node = NodeProcess(workdir, **node_config(orthanc, untrained_models))
    node.start()
    try:
        orthanc.add_modality("node", NODE_AET, node.port)
        push_to_node(orthanc, upload(orthanc, phantom))  # acknowledged by the node
        node.kill()  # within the 2 s quiet period: nothing inferred or sent yet
        assert result_instances(orthanc, phantom) == {}
        node.start()
        wait_for(lambda: len(result_instances(orthanc, phantom)) == 4, timeout=120,
                 interval=0.5)
        check_references(result_instances(orthanc, phantom), phantom)
        status = node.status()
        assert status["outbox"]["pacs"].get("pending", 0) == 0
        (series,) = status["series"]
        assert series["state"] == "done"
        assert "results_delivered" in [e["event"] for e in series["timeline"]]
    finally:
        if node.process is not None and node.process.poll() is None:
            assert node.terminate() == 0


def test_refusals_that_will_not_change_become_dead_letters_and_retry_requeues_them(
    start_node, untrained_models: Path, phantom: PhantomCase
) -> None:
    """A destination that stores SR, answers SEG with 0xC000 and has no context for SC or
    KOS: SEG, SC and KOS would meet the same answer again, so they are dead letters at
    once."""
    from pynetdicom import evt
    from pynetdicom.sop_class import (
        Comprehensive3DSRStorage,
        SegmentationStorage,
    )

    def on_store(event: evt.Event) -> int:
        return 0xC000 if event.request.AffectedSOPClassUID == SegmentationStorage else 0x0000

    peer = AE(ae_title="PICKY")
    peer.add_supported_context(Comprehensive3DSRStorage)
    peer.add_supported_context(SegmentationStorage)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = start_node(
            destinations=[{"name": "picky", "ae_title": "PICKY", "host": "127.0.0.1",
                           "port": port}],
            inference={"enabled": True, "device": "cpu",
                       "models_dir": str(untrained_models)},
        )
        datasets = [pydicom.dcmread(p) for p in sorted(phantom.series_dir.glob("*.dcm"))]
        assert set(send_datasets(datasets, node.receiver.port)) == {0}
        outbox = Outbox(node.spool)
        wait_for(lambda: outbox.deliveries() and not outbox.deliveries(state="pending"),
                 timeout=120, interval=0.2)
        dead = outbox.deliveries(state="dead")
        assert {d.kind for d in dead} == {"seg", "sc", "ko"}
        assert {d.kind for d in outbox.deliveries(state="sent")} == {"sr"}
        assert all(d.attempts == 1 for d in dead)
        for d in dead:
            expected = "0xC000" if d.kind == "seg" else "accepts no presentation context"  # SC, KOS
            assert expected in (d.last_error or ""), d.last_error
        assert outbox.retry_dead("picky") == len(dead)
        assert len(outbox.deliveries(state="pending")) + len(
            outbox.deliveries(state="dead")) == len(dead)
    finally:
        server.shutdown()


def test_backpressure_refuses_associations_as_transient(
    start_node, untrained_models: Path, phantom: PhantomCase
) -> None:
    node = start_node(inference={"enabled": True, "device": "cpu", "queue_high_water": 1,
                                 "models_dir": str(untrained_models)})
    node.worker.stop()  # the model is busy elsewhere: the queue only grows
    datasets = [pydicom.dcmread(p) for p in sorted(phantom.series_dir.glob("*.dcm"))]
    assert set(send_datasets(datasets, node.receiver.port)) == {0}
    wait_for(lambda: node.spool.list_jobs("queued"), timeout=30)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CTImageStorage)
    with pytest.raises(AssociationRejected) as refused:
        associate(ae, node.receiver.port)
    # rejected-transient, DUL service provider (presentation), local-limit-exceeded
    assert refused.value.reason == (0x02, 0x03, 0x02)


def test_sigterm_finishes_in_flight_stores_and_refuses_new_ones(
    start_node, phantom: PhantomCase
) -> None:
    import threading

    node = start_node()
    datasets = [pydicom.dcmread(p) for p in sorted(phantom.series_dir.glob("*.dcm"))] * 4
    statuses: list[int] = []
    sender = threading.Thread(target=lambda: statuses.extend(
        send_datasets(datasets, node.receiver.port)))
    sender.start()
    wait_for(lambda: node.spool.list_series(), timeout=10, interval=0.01)
    stopper = threading.Thread(target=node.stop)
    started = time.monotonic()
    stopper.start()
    time.sleep(0.05)
    ae = AE(ae_title="LATE_SCU")
    ae.add_requested_context(CTImageStorage)
    late = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AET)
    assert not late.is_established
    sender.join(30)
    stopper.join(30)
    assert statuses == [0] * len(datasets)  # the in-flight association finished
    assert time.monotonic() - started < node.settings.node.shutdown_timeout_seconds
