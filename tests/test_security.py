"""Who may talk to the node and how much they may send: DICOM TLS (SCP and sender, with
certificates made here), PDU and dataset size limits, a deflate bomb, secrets in config.
Allowlists (calling AE, host) and the called AE check: tests/test_receiver.py."""

from __future__ import annotations

import os
import ssl
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dcn_node.config import parse_settings, security_warnings
from tests.conftest import NODE_AET, send_datasets, test_config, wait_for
from tests.dicom_factory import ct_series, ct_slice
from tests.load import peak_rss_bytes
from tests.raw_dicom import encode, send_raw
from tests.recording_pacs import RecordingPacs
from tests.test_metrics import value
from tests.tls_certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_node_settings(pki: Pki, **extra: object) -> dict:
    return {"node": {"tls": {"cert_file": str(pki.server.cert_file),
                             "key_file": str(pki.server.key_file),
                             "ca_file": str(pki.ca.cert_file),
                             "require_client_cert": True, **extra}}}


def client_context(pki: Pki, cert: object | None, *,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca.cert_file))
    if cert is not None:
        context.load_cert_chain(str(cert.cert_file), str(cert.key_file))  # type: ignore[attr-defined]
    if max_version is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = max_version
    return context


def echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET,
                             tls_args=(context, "localhost") if context else None)
    except (OSError, ssl.SSLError):
        return False
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def test_tls_scp_admits_only_peers_with_a_certificate_from_its_ca(start_node, pki: Pki) -> None:
    node = start_node(**tls_node_settings(pki))
    port = node.receiver.port
    assert echo(port, client_context(pki, pki.client))
    assert not echo(port, client_context(pki, None))  # no client certificate
    assert not echo(port, client_context(pki, pki.stranger))  # another CA
    assert not echo(port, None)  # plain TCP on the TLS port
    assert not echo(port, client_context(pki, pki.client,
                                         max_version=ssl.TLSVersion.TLSv1_1))  # too old
    # Series over TLS are stored as usual.
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET,
                         tls_args=(client_context(pki, pki.client), "localhost"))
    assert assoc.is_established
    assert [assoc.send_c_store(ds).Status for ds in ct_series(3)] == [0, 0, 0]
    assoc.release()
    assert node.receiver.is_listening


def test_sender_delivers_over_tls_with_a_client_certificate(
    start_node, pki: Pki, untrained_models: Path
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca.cert_file))
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(str(pki.server.cert_file), str(pki.server.key_file))
    pacs = RecordingPacs(ssl_context=server)
    pacs.start()
    try:
        destination = {**pacs.destination(), "tls": {
            "ca_file": str(pki.ca.cert_file), "cert_file": str(pki.client.cert_file),
            "key_file": str(pki.client.key_file), "server_hostname": "localhost"}}
        node = start_node(destinations=[destination],
                          inference={"enabled": True, "device": "cpu",
                                     "models_dir": str(untrained_models)})
        series = ct_series(6, rows=64, columns=64)
        assert send_datasets(series, node.receiver.port) == [0] * 6
        wait_for(lambda: pacs.complete(series[0].StudyInstanceUID), timeout=120)
    finally:
        pacs.stop()


def test_pdu_longer_than_the_limit_closes_the_connection_without_allocating(
    start_node
) -> None:
    node = start_node(node={"maximum_pdu_size": 16384})
    # A peer that respects the negotiated maximum is fine, whatever the dataset size.
    series = ct_series(3, rows=256, columns=256)  # 128 KiB each, in 16 KiB PDUs
    assert send_datasets(series, node.receiver.port) == [0] * 3
    before = peak_rss_bytes(os.getpid())
    ae = AE(ae_title="LIAR")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AET)
    assert assoc.is_established
    # A P-DATA-TF PDU that declares 1.5 GB (and sends a few bytes of it).
    assoc.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0, 1_500_000_000) + b"\0" * 64)
    wait_for(lambda: not assoc.is_established, timeout=10)
    assert value(node, "dcn_bad_input_total", reason="pdu_too_large") == 1
    assert peak_rss_bytes(os.getpid()) - before < 200 * 2**20
    assert send_datasets(ct_series(1), node.receiver.port) == [0]  # still serving


@pytest.mark.parametrize("maximum_pdu_size", [16384, 0])
def test_dataset_larger_than_the_limit_is_cut_off_while_it_arrives(
    start_node, caplog, maximum_pdu_size: int
) -> None:
    node = start_node(node={"maximum_pdu_size": maximum_pdu_size,
                            "max_dataset_bytes": 1_000_000})
    big = ct_slice(generate_uid(), generate_uid(), 0.0)
    block = big.private_block(0x0029, "DCN TEST VENDOR", create=True)
    block.add_new(0x10, "OB", b"\1" * 3_000_000)
    statuses = []
    try:
        statuses = send_datasets([big], node.receiver.port)
    except Exception:  # noqa: BLE001 - the association may die under the sender
        pass
    assert statuses in ([], [-1])  # no Success: the sender keeps the instance
    reason = "pdu_too_large" if maximum_pdu_size == 0 else "dataset_too_large"
    wait_for(lambda: value(node, "dcn_bad_input_total", reason=reason) == 1)
    assert "node.max_dataset_bytes" in caplog.text
    assert node.spool.list_series() == []
    assert send_datasets(ct_series(2), node.receiver.port) == [0, 0]


def test_deflate_bomb_is_refused(start_node) -> None:
    node = start_node(node={"max_dataset_bytes": 8_000_000})
    ds = ct_slice(generate_uid(), generate_uid(), 0.0)
    block = ds.private_block(0x0029, "DCN TEST VENDOR", create=True)
    block.add_new(0x10, "OB", bytes(64_000_000))  # 64 MB of zeros: ~60 KB deflated
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(encode(ds)) + compressor.flush()
    assert len(body) < 1_000_000
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AET)
    status = send_raw(assoc, ds.SOPClassUID, ds.SOPInstanceUID,
                      DeflatedExplicitVRLittleEndian, body)
    assoc.release()
    assert status == 0xC000
    assert value(node, "dcn_bad_input_total", reason="dataset_too_large") == 1


def test_config_naming_private_keys_warns_when_others_can_read_it(
    tmp_path: Path, pki: Pki
) -> None:
    config = test_config(tmp_path / "spool", **tls_node_settings(pki))
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    settings = parse_settings(config)
    warnings = security_warnings(settings, path)
    assert warnings == [f"{path} names private keys and is readable by other users "
                        "(chmod 640 or 600)"]
    checked = subprocess.run([sys.executable, "-m", "dcn_node", "check-config", "--config",
                              str(path)], capture_output=True, text=True, check=True)
    assert "WARNING" in checked.stdout and "readable by other users" in checked.stdout
    path.chmod(0o640)
    pki.server.key_file.chmod(0o644)
    try:
        assert security_warnings(settings, path) == [
            f"private key {pki.server.key_file} is readable by group or others (chmod 600)"]
    finally:
        pki.server.key_file.chmod(0o600)
    assert security_warnings(settings, path) == []


def test_serve_logs_the_secrets_warning_at_start(tmp_path: Path, pki: Pki) -> None:
    from tests.node_process import NodeProcess

    node = NodeProcess(tmp_path, **tls_node_settings(pki))
    node.config_path.chmod(0o644)
    process = subprocess.Popen([sys.executable, "-m", "dcn_node", "serve", "--config",
                                str(node.config_path)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            if "listening" in line or not line:
                break
        log = "".join(lines)
        assert "WARNING" in log and "names private keys" in log, log
    finally:
        process.terminate()
        process.wait(30)
