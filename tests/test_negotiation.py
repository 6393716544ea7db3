"""Association negotiation, seen from a PACS administrator's side: every presentation context
the node refuses is logged (calling AE, SOP class, transfer syntaxes, why; a WARNING the first
time per peer and context, DEBUG while it repeats within the day) and counted by reason, an
association with nothing usable is rejected (A-ASSOCIATE-RJ) rather than accepted empty, and a
peer that then goes away leaves no ERROR.

The senders are stock dcmtk ``storescu`` (out of process) and pynetdicom.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from tests.conftest import NODE_AET, dcmtk_env, require_tool, send_datasets
from tests.dicom_factory import ct_series, write_files
from tests.test_metrics import value

MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


def storescu(port: int, paths: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-aet", "MODALITY1", "-aec", NODE_AET, *options,
         "127.0.0.1", str(port), *(str(p) for p in paths)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60)


def warnings_and_errors(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    records = [r for r in caplog.records if r.name.startswith(("dcn_node", "pynetdicom"))]
    return ([r.getMessage() for r in records if r.levelno == logging.WARNING],
            [r.getMessage() for r in records if r.levelno >= logging.ERROR])


def test_only_a_non_ct_sop_class_is_rejected_logged_and_counted(
    start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    caplog.set_level(logging.DEBUG)
    series = ct_series(1)
    series[0].SOPClassUID = MR
    series[0].Modality = "MR"
    # -R: propose only the SOP classes of the files sent.
    done = storescu(node.receiver.port, write_files(series, tmp_path / "mr"), "-R")
    assert done.returncode != 0
    assert "Association Rejected" in done.stdout + done.stderr, done.stderr
    warnings, errors = warnings_and_errors(caplog)
    refused = [w for w in warnings if w.startswith("Refusing presentation context")]
    assert refused and all("MODALITY1@127.0.0.1" in w and MR in w and "SOP class" in w
                           for w in refused), warnings
    assert any("Refusing association from MODALITY1" in w and "no presentation context" in w
               for w in warnings), warnings
    assert not errors, errors
    assert value(node, "dcn_contexts_refused_total", reason="sop_class") == len(refused)
    assert value(node, "dcn_associations_refused_total", reason="no_context") == 1
    assert value(node, "dcn_associations_accepted_total") == 0
    assert node.spool.list_series() == []


def test_lossy_jpeg_is_rejected_for_its_transfer_syntax(
    start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    caplog.set_level(logging.DEBUG)
    (original,) = write_files(ct_series(1), tmp_path / "ct")
    lossy = tmp_path / "lossy.dcm"  # dcmtk's JPEG Extended (process 2+4): lossy, 12 bit
    subprocess.run([require_tool("dcmcjpeg"), "+ee", str(original), str(lossy)], check=True,
                   capture_output=True, timeout=60)
    # -xx: propose JPEG lossy for 12 bit data, and the uncompressed syntaxes (separately).
    done = storescu(node.receiver.port, [lossy], "-R", "-xx")
    assert done.returncode != 0, done.stderr  # storescu cannot send the lossy file
    warnings, errors = warnings_and_errors(caplog)
    refused = [w for w in warnings if w.startswith("Refusing presentation context")]
    assert len(refused) == 1 and "transfer syntaxes" in refused[0] \
        and JPEG_EXTENDED in refused[0], warnings
    assert not errors, errors
    assert value(node, "dcn_contexts_refused_total", reason="transfer_syntax") == 1
    assert node.spool.list_series() == []
    # The lossless original, proposed the same way, is stored: only the syntax was refused.
    assert storescu(node.receiver.port, [original], "-R", "-xx").returncode == 0
    assert value(node, "dcn_contexts_refused_total", reason="transfer_syntax") == 2
    assert len(node.spool.list_series()) == 1


def test_a_mixed_proposal_is_accepted_with_the_usable_contexts(
    start_node, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node()
    caplog.set_level(logging.DEBUG)
    ae = AE(ae_title="MIXED_SCU")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=NODE_AET)
    try:
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CTImageStorage]
    finally:
        assoc.release()
    warnings, errors = warnings_and_errors(caplog)
    assert sum(w.startswith("Refusing presentation context") and "MIXED_SCU" in w
               for w in warnings) == 1
    assert not errors, errors
    assert value(node, "dcn_contexts_refused_total", reason="sop_class") == 1
    assert value(node, "dcn_associations_refused_total", reason="no_context") == 0
    assert send_datasets(ct_series(2), node.receiver.port) == [0, 0]


def test_storescus_wide_proposal_names_the_refused_sop_class_once(
    start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain storescu proposes some 60 storage classes: the association is accepted for CT,
    the MR file cannot be sent (storescu says so), and the node's log says which classes it
    refused, each once, however often the peer comes back."""
    node = start_node()
    caplog.set_level(logging.DEBUG)
    series = ct_series(1)
    series[0].SOPClassUID = MR
    paths = write_files(series, tmp_path / "mr")
    for _ in range(2):
        assert storescu(node.receiver.port, paths).returncode != 0
    warnings, errors = warnings_and_errors(caplog)
    about_mr = [w for w in warnings if "Refusing presentation context" in w
                and f"SOP class {MR}," in w]
    assert len(about_mr) == 2, about_mr  # two proposals (syntax sets) for MR, each once
    assert not errors, errors
    refused = value(node, "dcn_contexts_refused_total", reason="sop_class")
    assert refused > 2 * 40  # every refusal counted, logged or not
    assert value(node, "dcn_associations_accepted_total") == 2


#: A dcmtk association profile file: CT proposed with one transfer syntax only, which the
#: node does not take (storescu's own options always add the uncompressed syntaxes).
ONLY_ONE_SYNTAX = """
[[TransferSyntaxes]]
[BigEndian]
TransferSyntax1 = BigEndianExplicit
[JPEG2000Lossy]
TransferSyntax1 = JPEG2000
[[PresentationContexts]]
[CTBigEndian]
PresentationContext1 = CTImageStorage\\BigEndian
[CTJPEG2000Lossy]
PresentationContext1 = CTImageStorage\\JPEG2000Lossy
[[Profiles]]
[BigEndianOnly]
PresentationContexts = CTBigEndian
[JPEG2000LossyOnly]
PresentationContexts = CTJPEG2000Lossy
"""


@pytest.mark.parametrize(("profile", "syntax"), [
    ("BigEndianOnly", "1.2.840.10008.1.2.2"),
    ("JPEG2000LossyOnly", "1.2.840.10008.1.2.4.91"),
])
def test_a_ct_proposed_only_in_a_refused_syntax_is_logged_counted_and_rejected(
    start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture, profile: str, syntax: str
) -> None:
    node = start_node()
    caplog.set_level(logging.DEBUG)
    config = tmp_path / "storescu.cfg"
    config.write_text(ONLY_ONE_SYNTAX)
    paths = write_files(ct_series(1), tmp_path / "ct")
    done = storescu(node.receiver.port, paths, "-xf", str(config), profile)
    assert done.returncode != 0
    assert "Association Rejected" in done.stdout + done.stderr, done.stdout + done.stderr
    warnings, errors = warnings_and_errors(caplog)
    refused = [w for w in warnings if w.startswith("Refusing presentation context")]
    assert len(refused) == 1 and "MODALITY1@127.0.0.1" in refused[0] \
        and CTImageStorage in refused[0] and f"transfer syntaxes {syntax}" in refused[0], \
        warnings
    assert not errors, errors
    assert value(node, "dcn_contexts_refused_total", reason="transfer_syntax") == 1
    assert value(node, "dcn_associations_refused_total", reason="no_context") == 1
    assert node.spool.list_series() == []
