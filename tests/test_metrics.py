"""/metrics, /healthz and /readyz of a running node: what is counted, the naming rules,
promtool's verdict on the output, and every reason readiness can give."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from dcn_node.node import Node
from dcn_node.ops.health import Liveness, Readiness
from dcn_node.ops.metrics import MetricsServer, NodeMetrics
from dcn_node.store.outbox import ResultObject
from dcn_node.store.spool import Job
from tests.conftest import (
    AssociationRejected,
    associate,
    free_port,
    require_tool,
    send_datasets,
    wait_for,
)
from tests.dicom_factory import ct_series, ct_slice

#: Label names a dcn_ metric may carry: small fixed sets, never a UID.
ALLOWED_LABELS = {"reason", "status", "outcome", "stage", "destination", "kind", "check",
                  "name", "version", "profile", "device", "python", "pynetdicom", "pydicom",
                  "torch", "le", "role"}


def get(node: Node, path: str) -> tuple[int, bytes]:
    assert node.metrics_server is not None
    url = f"http://127.0.0.1:{node.metrics_server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(node: Node) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    status, body = get(node, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(node: Node, name: str, **labels: str) -> float:
    return samples(node).get((name, frozenset(labels.items())), 0.0)


def test_receiving_is_counted_and_the_output_passes_promtool(start_node, tmp_path: Path) -> None:
    node = start_node(node={"allowed_calling_aets": ["TEST_SCU"]})
    series = ct_series(6)
    assert send_datasets(series, node.receiver.port) == [0] * 6
    broken = ct_slice(generate_uid(), generate_uid(), 0.0)
    del broken.SeriesInstanceUID
    assert send_datasets([broken], node.receiver.port) == [0xC000]
    with pytest.raises(AssociationRejected) as refused:
        send_datasets(series[:1], node.receiver.port, calling_aet="INTRUDER")
    assert refused.value.reason == (0x01, 0x01, 0x03)
    with pytest.raises(AssociationRejected) as refused:
        send_datasets(series[:1], node.receiver.port, called_aet="SOMEONE_ELSE")
    assert refused.value.reason == (0x01, 0x01, 0x07)

    assert value(node, "dcn_instances_received_total") == 6
    stored = sum(p.stat().st_size for p in node.spool.instances_dir.rglob("*.dcm"))
    assert value(node, "dcn_received_bytes_total") == stored
    assert value(node, "dcn_cstore_responses_total", status="0x0000") == 6
    assert value(node, "dcn_cstore_responses_total", status="0xC000") == 1
    assert value(node, "dcn_cstore_responses_total", status="0xA700") == 0
    assert value(node, "dcn_associations_accepted_total") == 2
    wait_for(lambda: value(node, "dcn_associations_refused_total", reason="called_ae") == 1)
    assert value(node, "dcn_associations_refused_total", reason="calling_ae") == 1
    assert value(node, "dcn_series_waiting") == 1

    # Complete after the 1 s quiet period; the model is off, so it stays queued.
    wait_for(lambda: value(node, "dcn_series_total", outcome="completed") == 1, timeout=20)
    assert value(node, "dcn_series_waiting") == 0
    assert value(node, "dcn_inference_queue") == 1
    assert value(node, "dcn_ready") == 1
    assert value(node, "dcn_spool_free_bytes") > 0
    assert value(node, "dcn_build_info", **_build_labels(node)) == 1

    status, body = get(node, "/metrics")
    exposition = tmp_path / "metrics.txt"
    exposition.write_bytes(body)
    promtool = require_tool("promtool")
    with exposition.open("rb") as stdin:
        result = subprocess.run([promtool, "check", "metrics"], stdin=stdin,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _build_labels(node: Node) -> dict[str, str]:
    (key,) = [k for k in samples(node) if k[0] == "dcn_build_info"]
    return dict(key[1])


def test_names_and_labels_follow_the_conventions(start_node) -> None:
    node = start_node(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                     "port": free_port()}])
    status, body = get(node, "/metrics")
    families = [f for f in text_string_to_metric_families(body.decode())
                if not f.name.startswith("process_")]
    names = {f.name for f in families}
    for expected in ("dcn_instances_received", "dcn_received_bytes",
                     "dcn_associations_accepted", "dcn_associations_refused",
                     "dcn_cstore_responses", "dcn_series", "dcn_series_waiting",
                     "dcn_inference_queue", "dcn_outbox_pending", "dcn_inference_stage_seconds",
                     "dcn_series_end_to_end_seconds", "dcn_result_deliveries",
                     "dcn_dead_letters", "dcn_spool_free_bytes", "dcn_model_info",
                     "dcn_build_info", "dcn_ready"):
        assert expected in names, expected
    for family in families:
        assert family.name.startswith("dcn_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
            for label_value in sample.labels.values():
                assert not label_value.count(".") > 3, (sample.name, label_value)  # no UIDs
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert not any(unit in family.name for unit in ("_ms", "milliseconds", "_kb", "_mb"))
    # Label values known in advance exist from the start (rate() sees the first event).
    assert value(node, "dcn_result_deliveries_total", destination="pacs", kind="sr",
                 outcome="dead") == 0
    assert ("dcn_inference_stage_seconds_count", frozenset({("stage", "dcn")})) in samples(node)


def test_health_endpoints(start_node) -> None:
    node = start_node()
    assert get(node, "/healthz") == (200, b'{"status": "alive"}')
    assert get(node, "/readyz") == (200, b'{"status": "ready"}')
    assert get(node, "/nothing-here")[0] == 404
    assert node.metrics_server is not None
    port = node.metrics_server.port
    node.stop()
    with pytest.raises(urllib.error.URLError):  # closed with the node
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_metrics_negotiation_and_errors() -> None:
    """/metrics is prometheus_client's app (OpenMetrics by Accept, gzip, name[] filters);
    the probes answer only GET, and a probe that raises answers 500 with its reason."""
    def broken() -> Readiness:
        raise RuntimeError("boom")

    server = MetricsServer("127.0.0.1", 0, NodeMetrics(), broken, lambda: Liveness(()))
    server.start()
    url = f"http://127.0.0.1:{server.port}"

    def fetch(path: str, method: str = "GET", **headers: str) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    try:
        status, headers, body = fetch(
            "/metrics", Accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics")
        assert body.endswith(b"# EOF\n") and b"dcn_build_info" in body
        status, headers, body = fetch("/metrics?name[]=dcn_build_info",
                                      **{"Accept-Encoding": "gzip"})
        assert headers["Content-Type"].startswith("text/plain")
        assert headers["Content-Encoding"] == "gzip"
        families = list(text_string_to_metric_families(gzip.decompress(body).decode()))
        assert [f.name for f in families] == ["dcn_build_info"]
        assert fetch("/healthz")[::2] == (200, b'{"status": "alive"}')
        assert fetch("/healthz", method="POST")[0] == 405
        assert fetch("/readyz")[::2] == (500, b'{"status": "error", "reason": "RuntimeError"}')
        assert fetch("/metrics/")[0] == 404
    finally:
        server.stop()


def test_metrics_server_listens_on_ipv6() -> None:
    server = MetricsServer("::1", 0, NodeMetrics(), lambda: Readiness({}), lambda: Liveness(()))
    try:
        server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/readyz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()


def test_not_ready_while_the_spool_is_short_of_space(start_node) -> None:
    node = start_node(storage={"min_free_bytes": 2**62})
    status, body = get(node, "/readyz")
    assert status == 503
    reasons = json.loads(body)["reasons"]
    assert set(reasons) == {"spool"} and "storage.min_free_bytes" in reasons["spool"]
    assert value(node, "dcn_ready") == 0
    assert value(node, "dcn_ready_check", check="spool") == 0
    assert value(node, "dcn_ready_check", check="scp") == 1
    assert get(node, "/healthz")[0] == 200  # alive all the same: no restart would help


def test_not_ready_without_a_model_and_not_alive_without_its_worker(
    start_node, tmp_path: Path
) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    node = start_node(inference={"enabled": True, "device": "cpu", "models_dir": str(empty)})
    wait_for(lambda: node.worker.engine_error, timeout=30)
    status, body = get(node, "/readyz")
    assert status == 503
    assert "model not loaded" in json.loads(body)["reasons"]["model"]
    assert value(node, "dcn_ready_check", check="model") == 0
    node.worker.stop(5)
    status, body = get(node, "/healthz")
    assert status == 503 and "model worker thread stopped" in json.loads(body)["reasons"]


def test_model_info_once_loaded(start_node, untrained_models: Path) -> None:
    node = start_node(inference={"enabled": True, "device": "cpu",
                                 "models_dir": str(untrained_models)})
    wait_for(lambda: node.worker.engine_loaded, timeout=60)
    info = [dict(labels) for name, labels in samples(node) if name == "dcn_model_info"]
    assert len(info) == 1
    assert info[0]["profile"] == "lite" and info[0]["device"] == "cpu"
    assert info[0]["version"].startswith("lite-")
    assert get(node, "/readyz")[0] == 200


def queue_one_object(node: Node, tmp_path: Path, destination: str) -> None:
    """Record one result object for ``destination`` and wait until it was retried twice."""
    ds = ct_series(1)[0]
    path = tmp_path / "object.dcm"
    ds.save_as(path, enforce_file_format=True)
    job = Job(1, ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, "processing", None)
    node.outbox.record_result_set(job, tmp_path, [
        ResultObject("sr", str(ds.SOPClassUID), str(ds.SOPInstanceUID), path)],
        {destination: ("sr",)})
    node._wake_senders()
    wait_for(lambda: value(node, "dcn_result_deliveries_total", destination=destination,
                           kind="sr", outcome="retry") >= 2, timeout=30)


def test_stuck_outbox_makes_the_node_not_ready(start_node, tmp_path: Path) -> None:
    """A destination nobody listens on: deliveries are retried, the oldest grows older
    than metrics.outbox_stuck_seconds and readiness says so."""
    node = start_node(
        destinations=[{"name": "gone", "ae_title": "GONE", "host": "127.0.0.1",
                       "port": free_port()}],
        sender={"retry_initial_seconds": 0.2, "retry_max_interval_seconds": 0.5,
                "connect_timeout_seconds": 1},
        metrics={"outbox_stuck_seconds": 1.0},
    )
    queue_one_object(node, tmp_path, "gone")
    time.sleep(1.1)
    status, body = get(node, "/readyz")
    assert status == 503
    assert "gone" in json.loads(body)["reasons"]["outbox"]
    assert value(node, "dcn_outbox_pending", destination="gone") == 1
    assert value(node, "dcn_outbox_oldest_pending_age_seconds", destination="gone") > 1.0
    assert value(node, "dcn_dead_letters", destination="gone") == 0


def test_a_destination_that_rejects_is_retried_with_its_reason(start_node, tmp_path: Path) -> None:
    """A peer that rejects our association (here: stock pynetdicom, called AE title not
    its own): the delivery stays pending, is retried and carries the peer's reason."""
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    peer = AE(ae_title="RIGHT")
    peer.require_called_aet = True
    peer.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False)
    try:
        node = start_node(
            destinations=[{"name": "picky", "ae_title": "WRONG", "host": "127.0.0.1",
                           "port": port}],
            sender={"retry_initial_seconds": 0.2, "retry_max_interval_seconds": 0.5},
        )
        queue_one_object(node, tmp_path, "picky")
        [delivery] = node.outbox.deliveries()
        assert delivery.state == "pending"
        assert "association rejected by WRONG@127.0.0.1" in (delivery.last_error or "")
        assert "Called AE title not recognised" in (delivery.last_error or "")
    finally:
        server.shutdown()


def test_refusals_when_full_are_counted_by_reason(start_node) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    node = start_node(node={"max_associations": 1})
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CTImageStorage)
    first = ae.associate("127.0.0.1", node.receiver.port, ae_title="DCN_NODE")
    try:
        assert first.is_established
        with pytest.raises(AssociationRejected):
            associate(ae, node.receiver.port)
        wait_for(lambda: value(node, "dcn_associations_active") == 1)
    finally:
        first.release()
    wait_for(lambda: value(node, "dcn_associations_refused_total",
                           reason="max_associations") == 1)
    assert value(node, "dcn_associations_accepted_total") == 1
