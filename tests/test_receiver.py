"""The Storage SCP against real senders on loopback: pynetdicom and dcmtk."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import EnhancedCTImageStorage, MRImageStorage, Verification

from dcn_node.net.receiver import IMPLEMENTATION_CLASS_UID, encode_file_meta
from tests.conftest import (
    NODE_AET,
    AssociationRejected,
    dcmtk_env,
    require_tool,
    send_datasets,
    wait_for,
)
from tests.dicom_factory import ct_series, ct_slice, write_files

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def test_file_meta_round_trips_through_pydicom(tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "ODD_AE")
    path = tmp_path / "x.dcm"
    path.write_bytes(meta + buffer.getvalue())

    back = pydicom.dcmread(path)
    assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.SourceApplicationEntityTitle == "ODD_AE"
    assert back.file_meta.FileMetaInformationVersion == b"\x00\x01"
    # The group length must be exact, or readers that trust it lose the first element.
    assert back.file_meta.FileMetaInformationGroupLength == len(meta) - 128 - 4 - 12
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    result = subprocess.run(
        [require_tool("dcmdump"), "-q", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_echo_with_dcmtk_echoscu(start_node) -> None:
    node = start_node()
    result = subprocess.run(
        [require_tool("echoscu"), "-aec", NODE_AET, "127.0.0.1", str(node.receiver.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_phantom_series_from_storescu_completes_once(start_node, tmp_path: Path) -> None:
    from dcn_train.phantom import generate_phantom

    case = generate_phantom(tmp_path / "case", seed=3, slices=110, matrix=128)
    node = start_node()
    result = subprocess.run(
        [
            require_tool("storescu"),
            "-aet", "PACS", "-aec", NODE_AET, "+sd", "-xs",
            "127.0.0.1", str(node.receiver.port), str(case.series_dir),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The phantom announces ImagesInAcquisition, so completion does not wait for the quiet
    # period; then wait two more quiet periods to see it is not completed a second time.
    record = wait_for(
        lambda: next(iter(node.spool.list_series("queued")), None), timeout=10
    )
    assert record.series_instance_uid == case.series_instance_uid
    assert record.instances == 110
    time.sleep(2.5 * node.settings.completion.quiet_seconds)
    jobs = node.spool.list_jobs()
    assert [(j.series_instance_uid, j.state, j.generation) for j in jobs] == [
        (case.series_instance_uid, "queued", 0)
    ]
    stored = {i.header.sop_instance_uid for i in node.spool.series_instances(
        case.study_instance_uid, case.series_instance_uid)}
    assert stored == set(case.sop_instance_uids)


def test_two_series_interleaved_over_four_parallel_associations(start_node) -> None:
    node = start_node(completion={"quiet_seconds": 1.5})
    first = ct_series(60)
    second = ct_series(60)
    interleaved = [ds for pair in zip(first, second, strict=True) for ds in pair]
    chunks = [interleaved[i::4] for i in range(4)]
    results: list[list[int]] = [[] for _ in chunks]
    barrier = threading.Barrier(4)

    def sender(index: int) -> None:
        barrier.wait()
        results[index] = send_datasets(chunks[index], node.receiver.port)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(statuses == [STATUS_SUCCESS] * 30 for statuses in results)

    wait_for(lambda: len(node.spool.list_series("queued")) == 2)
    for series in (first, second):
        record = node.spool.get_series(series[0].StudyInstanceUID, series[0].SeriesInstanceUID)
        assert record is not None and record.instances == 60 and record.state == "queued"
    assert len(node.spool.list_jobs("queued")) == 2


def test_resent_instances_replace_and_are_not_counted_twice(start_node) -> None:
    node = start_node(completion={"quiet_seconds": 1.0})
    series = ct_series(20)
    assert send_datasets(series, node.receiver.port) == [STATUS_SUCCESS] * 20
    resent = series[5:10]
    for ds in resent:
        ds.SeriesDescription = "CHEST 5mm resent"
    assert send_datasets(resent, node.receiver.port) == [STATUS_SUCCESS] * 5
    record = wait_for(lambda: next(iter(node.spool.list_series("queued")), None))
    assert record.instances == 20
    files = list((node.spool.instances_dir).rglob("*.dcm"))
    assert len(files) == 20
    newest = pydicom.dcmread(node.spool.series_instances(
        record.study_instance_uid, record.series_instance_uid)[0].path.parent
        / f"{resent[0].SOPInstanceUID}.dcm")
    assert newest.SeriesDescription == "CHEST 5mm resent"


def test_late_arrival_reopens_a_completed_series(start_node) -> None:
    node = start_node()
    series = ct_series(21, announce=True)
    late = series.pop(10)  # the announced count is not reached: completes by quiet period
    assert send_datasets(series, node.receiver.port) == [STATUS_SUCCESS] * 20
    first = wait_for(lambda: node.spool.list_series("rejected") or node.spool.list_series(
        "queued"))[0]
    assert first.state == "rejected" and "gap" in (first.reason or "")
    assert first.generation == 0

    assert send_datasets([late], node.receiver.port) == [STATUS_SUCCESS]
    reopened = node.spool.get_series(first.study_instance_uid, first.series_instance_uid)
    assert reopened is not None
    assert reopened.generation == 1
    # Now complete by announced count (21 of 21, contiguous): queued, no gap any more.
    record = wait_for(lambda: next(iter(node.spool.list_series("queued")), None))
    assert record.instances == 21 and record.generation == 1 and record.reason is None
    assert [(j.generation, j.state) for j in node.spool.list_jobs()] == [(1, "queued")]


def test_late_arrival_supersedes_queued_job(start_node) -> None:
    node = start_node()
    series = ct_series(20)
    extra = ct_slice(series[0].StudyInstanceUID, series[0].SeriesInstanceUID, -155.0, index=99)
    assert send_datasets(series, node.receiver.port) == [STATUS_SUCCESS] * 20
    wait_for(lambda: node.spool.list_series("queued"))
    assert send_datasets([extra], node.receiver.port) == [STATUS_SUCCESS]
    wait_for(lambda: len(node.spool.list_jobs()) == 2)
    jobs = node.spool.list_jobs()
    assert [(j.generation, j.state) for j in jobs] == [(0, "superseded"), (1, "queued")]
    assert node.spool.list_series("queued")[0].instances == 21


def test_localizer_is_ignored(start_node) -> None:
    node = start_node()
    localizer = ct_series(
        6, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="Topogram 0.6"
    )
    assert send_datasets(localizer, node.receiver.port) == [STATUS_SUCCESS] * 6
    record = wait_for(lambda: next(iter(node.spool.list_series("ignored")), None))
    assert record.reason == "localizer/scout series"
    assert node.spool.list_jobs() == []


@pytest.mark.parametrize(
    ("series_kwargs", "state", "reason_part"),
    [
        ({"count": 30, "skip": [12, 13, 14]}, "rejected", "gap of 20.00 mm between slices 12"),
        ({"count": 3}, "rejected", "fewer than completion.min_slices"),
        ({"count": 20, "BodyPartExamined": "HEAD"}, "ignored", "BodyPartExamined HEAD"),
        ({"count": 20, "SeriesDescription": "Chest MIP 10mm"}, "ignored", "exclude"),
        ({"count": 20, "Modality": "PT"}, "ignored", "modality PT, not CT"),
        (
            {"count": 20, "ImageOrientationPatient": [1, 0, 0, 0, 0, -1]},
            "rejected",
            "not axial",
        ),
    ],
)
def test_invalid_or_unselected_series_get_state_and_reason(
    start_node, series_kwargs, state, reason_part
) -> None:
    node = start_node()
    count = series_kwargs.pop("count")
    series = ct_series(count, **series_kwargs)
    assert send_datasets(series, node.receiver.port) == [STATUS_SUCCESS] * len(series)
    record = wait_for(lambda: next(iter(node.spool.list_series(state)), None))
    assert reason_part in (record.reason or ""), record.reason
    assert node.spool.list_jobs() == []


def test_two_acquisitions_in_one_series_are_rejected_with_reason(start_node) -> None:
    node = start_node()
    first = ct_series(20)
    second = ct_series(
        20,
        study_instance_uid=first[0].StudyInstanceUID,
        series_instance_uid=first[0].SeriesInstanceUID,
        AcquisitionNumber=2,
    )
    assert send_datasets(first + second, node.receiver.port) == [STATUS_SUCCESS] * 40
    record = wait_for(lambda: next(iter(node.spool.list_series("rejected")), None))
    assert "2 acquisitions" in (record.reason or "")


def test_unknown_calling_ae_is_refused_and_logged(start_node, caplog) -> None:
    node = start_node(node={"allowed_calling_aets": ["PACS"]})
    caplog.set_level(logging.WARNING, logger="dcn_node")
    with pytest.raises(AssociationRejected) as refused:
        send_datasets(ct_series(1), node.receiver.port, calling_aet="INTRUDER")
    assert refused.value.reason == (0x01, 0x01, 0x03)  # permanent, user, calling AE
    assert "INTRUDER" in caplog.text and "allowed_calling_aets" in caplog.text
    assert send_datasets(ct_series(1), node.receiver.port, calling_aet="PACS") == [0]


def test_wrong_called_ae_title_is_refused(start_node) -> None:
    node = start_node()
    with pytest.raises(AssociationRejected) as refused:
        send_datasets(ct_series(1), node.receiver.port, called_aet="SOMEONE_ELSE")
    assert refused.value.reason == (0x01, 0x01, 0x07)  # permanent, user, called AE


def test_unknown_host_is_refused(start_node) -> None:
    node = start_node(node={"allowed_hosts": ["10.0.0.0/8"]})
    with pytest.raises(AssociationRejected) as refused:
        send_datasets(ct_series(1), node.receiver.port)
    assert refused.value.reason == (0x01, 0x01, 0x01)  # permanent, user, no reason given


def test_other_sop_classes_are_not_negotiated(start_node) -> None:
    node = start_node()
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AET)
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {Verification}
    finally:
        assoc.release()


def test_write_failure_answers_out_of_resources_and_leaves_nothing(start_node) -> None:
    node = start_node()
    series = ct_series(3)
    # A file where the study folder should be: mkdir fails with a real OSError (this
    # works as root too, where a read-only folder would not stop the write).
    blocker = node.spool.instances_dir / series[0].StudyInstanceUID
    blocker.write_bytes(b"not a folder")
    assert send_datasets(series, node.receiver.port) == [STATUS_OUT_OF_RESOURCES] * 3
    assert list(node.spool.incoming_dir.iterdir()) == []
    assert node.spool.list_series() == []
    # The node keeps running and accepts the next good instance.
    blocker.unlink()
    assert send_datasets(series[:1], node.receiver.port) == [STATUS_SUCCESS]


def test_nearly_full_disk_answers_out_of_resources(start_node) -> None:
    node = start_node(storage={"min_free_bytes": 2**62})
    assert send_datasets(ct_series(1), node.receiver.port) == [STATUS_OUT_OF_RESOURCES]
    assert node.spool.list_series() == []


def test_unparseable_dataset_answers_failure_with_reason(start_node, caplog) -> None:
    node = start_node()
    caplog.set_level(logging.WARNING, logger="dcn_node")
    ds = ct_slice(generate_uid(), generate_uid(), 0.0)
    del ds.SeriesInstanceUID
    assert send_datasets([ds], node.receiver.port) == [STATUS_CANNOT_UNDERSTAND]
    assert "SeriesInstanceUID" in caplog.text
    assert node.spool.list_series() == []


@pytest.mark.parametrize("transfer_syntax", [JPEG2000Lossless, RLELossless])
def test_lossless_compressed_input_is_accepted_and_decodable(
    start_node, transfer_syntax: str
) -> None:
    node = start_node()
    series = ct_series(5)
    originals = [ds.pixel_array.copy() for ds in series]
    for ds in series:
        ds.compress(transfer_syntax)
    statuses = send_datasets(series, node.receiver.port, transfer_syntax=transfer_syntax)
    assert statuses == [STATUS_SUCCESS] * 5
    stored = node.spool.series_instances(series[0].StudyInstanceUID, series[0].SeriesInstanceUID)
    assert len(stored) == 5
    by_uid = {ds.SOPInstanceUID: original for ds, original in zip(series, originals,
                                                                      strict=True)}
    for instance in stored:
        ds = pydicom.dcmread(instance.path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        np.testing.assert_array_equal(ds.pixel_array, by_uid[ds.SOPInstanceUID])


def enhanced_ct(frames: int, spacing_mm: float = 5.0) -> Dataset:
    """A multi-frame Enhanced CT: geometry lives in the functional groups."""
    ds = ct_slice(generate_uid(), generate_uid(), 0.0)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SliceThickness", "InstanceNumber"):
        delattr(ds, keyword)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = frames
    plane = Dataset()
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.7]
    measures.SliceThickness = spacing_mm
    shared = Dataset()
    shared.PlaneOrientationSequence = [plane]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for index in range(frames):
        position = Dataset()
        position.ImagePositionPatient = [-11.2, -11.2, index * spacing_mm]
        item = Dataset()
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.zeros((frames, ds.Rows, ds.Columns), np.int16).tobytes()
    return ds


def test_enhanced_ct_multiframe_completes_by_its_frame_count(start_node) -> None:
    node = start_node(completion={"quiet_seconds": 60})
    ds = enhanced_ct(24)
    assert send_datasets([ds], node.receiver.port) == [STATUS_SUCCESS]
    # Completion comes from NumberOfFrames + contiguous frame positions, not the quiet period.
    record = wait_for(lambda: next(iter(node.spool.list_series("queued")), None), timeout=5)
    assert record.series_instance_uid == ds.SeriesInstanceUID


@pytest.mark.parametrize("sender", ["dcmtk", "pynetdicom"])
@pytest.mark.parametrize("tuning", [True, False])
def test_a_node_process_receives_a_storescu_series_with_tuning_on_or_off(
        tmp_path: Path, tuning: bool, sender: str) -> None:
    """node.transport_tuning in its own process (pynetdicom's patches are process-wide):
    with pynetdicom's own threads, polling and decoding, or with ours, the same series
    arrives whole, is queued once and every file is the instance sent. The senders are
    stock and out of process: dcmtk's storescu and pynetdicom's own storescu app (no
    dcn-node code, so none of its patches)."""
    from dcn_train.phantom import generate_phantom
    from tests.node_process import NodeProcess

    case = generate_phantom(tmp_path / "case", seed=5, slices=40, matrix=128)
    (tmp_path / "node").mkdir()
    node = NodeProcess(tmp_path / "node", node={"transport_tuning": tuning})
    node.start()
    try:
        command = [require_tool("storescu"), "-aet", "PACS", "-aec", NODE_AET, "+sd",
                   "127.0.0.1", str(node.port), str(case.series_dir)] if sender == "dcmtk" \
            else [sys.executable, "-m", "pynetdicom", "storescu", "-aet", "PACS", "-aec",
                  NODE_AET, "-r", "127.0.0.1", str(node.port), str(case.series_dir)]
        result = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        state = wait_for(lambda: (node.series_state(case.series_instance_uid) or {}).get(
            "state") == "queued" and node.series_state(case.series_instance_uid), timeout=30)
        assert state["instances"] == 40
    finally:
        assert node.terminate() == 0
    spooled = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData
               for p in (tmp_path / "node" / "spool" / "instances").glob("*/*/*.dcm")}
    sent = {ds.SOPInstanceUID: ds.PixelData
            for ds in map(pydicom.dcmread, case.series_dir.glob("*.dcm"))}
    assert spooled == sent


def test_storescu_files_write_into_spool_and_read_back(start_node, tmp_path: Path) -> None:
    node = start_node()
    paths = write_files(ct_series(8), tmp_path / "in")
    result = subprocess.run(
        [require_tool("storescu"), "-aec", NODE_AET, "127.0.0.1", str(node.receiver.port)]
        + [str(p) for p in paths],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for path in paths:
        sent = pydicom.dcmread(path)
        stored = next(node.spool.instances_dir.rglob(f"{sent.SOPInstanceUID}.dcm"))
        back = pydicom.dcmread(stored)
        assert back.file_meta.SourceApplicationEntityTitle == "STORESCU"
        np.testing.assert_array_equal(back.pixel_array, sent.pixel_array)
        assert back.SeriesInstanceUID == sent.SeriesInstanceUID
