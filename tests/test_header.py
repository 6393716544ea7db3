"""The fast header scan (dcn_node/header.py) gives what pydicom's reader gives: the same
InstanceHeader, the same stream position before the pixel data, the same refusals."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dcn_node import header as header_module
from dcn_node.errors import InvalidInstanceError
from dcn_node.header import read_header
from tests.dicom_factory import ct_slice
from tests.raw_dicom import encode
from tests.test_receiver import enhanced_ct


def _slice(**overrides: object) -> Dataset:
    return ct_slice(generate_uid(), generate_uid(), 12.5, images_in_acquisition=40, **overrides)


def _with_undefined_length_sequences(ds: Dataset) -> Dataset:
    """dcmtk's default: sequences and items of undefined length, nested."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = generate_uid()
    item.PurposeOfReferenceCodeSequence = [inner]
    item.PurposeOfReferenceCodeSequence.is_undefined_length = True
    ds.ReferencedImageSequence = [item, Dataset()]
    ds.ReferencedImageSequence.is_undefined_length = True
    for each in ds.ReferencedImageSequence:
        each.is_undefined_length_sequence_item = True
    return ds


def _with_private_and_unicode(ds: Dataset) -> Dataset:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Thorax nativ – Lunge"
    block = ds.private_block(0x0029, "DCN TEST", create=True)
    block.add_new(0x10, "OB", b"\x01" * 70_000)
    block.add_new(0x11, "LO", "private")
    return ds


def _no_pixels(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


DATASETS = {
    "plain": _slice,
    "undefined-length sequences": lambda: _with_undefined_length_sequences(_slice()),
    "private tags, UTF-8": lambda: _with_private_and_unicode(_slice()),
    "no pixel data": lambda: _no_pixels(_slice()),
    "enhanced CT": lambda: enhanced_ct(6),
}


def _read(encoded: bytes, syntax: str, **options: object):  # type: ignore[no-untyped-def]
    stream = BytesIO(encoded)
    try:
        return read_header(stream, syntax, **options), stream.tell()
    except InvalidInstanceError as exc:
        return f"refused: {exc.code}", stream.tell()


@pytest.fixture
def pydicom_only(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def refuse(stream, implicit):  # type: ignore[no-untyped-def]
        raise header_module._NotScanned

    def read(encoded: bytes, syntax: str, **options: object):  # type: ignore[no-untyped-def]
        with monkeypatch.context() as patch:
            patch.setattr(header_module, "_scan_header", refuse)
            return _read(encoded, syntax, **options)

    return read


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("name", list(DATASETS))
def test_scan_matches_pydicom(name: str, syntax: str, pydicom_only) -> None:
    encoded = encode(DATASETS[name](), implicit=syntax == ImplicitVRLittleEndian)
    implicit = syntax == ImplicitVRLittleEndian
    if name == "enhanced CT":  # functional groups: left to pydicom on purpose
        with pytest.raises(header_module._NotScanned):
            header_module._scan_header(BytesIO(encoded), implicit)
    else:  # the fast path really ran
        assert header_module._scan_header(BytesIO(encoded), implicit)
    fast = _read(encoded, syntax)
    assert fast == pydicom_only(encoded, syntax)
    assert not isinstance(fast[0], str)
    checked = _read(encoded, syntax, check_pixel_data=True)
    assert checked == pydicom_only(encoded, syntax, check_pixel_data=True)
    if name == "no pixel data":
        assert checked[0] == "refused: no_pixel_data"


def test_scan_reads_the_values_the_node_files_by() -> None:
    ds = _with_undefined_length_sequences(_slice())
    header, position = _read(encode(ds), ExplicitVRLittleEndian)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.positions == (tuple(float(v) for v in ds.ImagePositionPatient),)
    assert header.images_in_acquisition == 40
    assert (header.rows, header.columns) == (ds.Rows, ds.Columns)


@pytest.mark.parametrize("cut", [3, 9, 200, -100])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_torn_datasets_are_refused_as_pydicom_refuses_them(cut: int, syntax: str,
                                                           pydicom_only) -> None:
    encoded = encode(_with_undefined_length_sequences(_slice()),
                     implicit=syntax == ImplicitVRLittleEndian)
    torn = encoded[:cut]
    options = {"check_pixel_data": True}
    assert _read(torn, syntax, **options) == pydicom_only(torn, syntax, **options)
