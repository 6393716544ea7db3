"""C-STORE command sets read and written directly (implicit VR little endian, PS3.7
6.3.1 and 9.3.1): the response as pynetdicom would encode it, the request's fields as
pynetdicom's setters would accept them. Anything else: None, and pynetdicom does it.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import _validators

from dcn_node.header import is_valid_uid


def _element(element: int, value: bytes) -> bytes:
    """A command-group (0000,eeee) element in implicit VR little endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\0" if len(encoded) % 2 else encoded


def encode_store_response(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP, as pynetdicom would encode it, or None when the
    response carries more than the six usual elements (pynetdicom encodes those)."""
    if (primitive.OffendingElement is not None or primitive.ErrorComment is not None
            or primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None
            or primitive.MessageIDBeingRespondedTo is None or primitive.Status is None):
        return None
    body = b"".join((
        _element(0x0002, _uid(primitive.AffectedSOPClassUID)),
        _element(0x0100, struct.pack("<H", 0x8001)),  # CommandField: C-STORE-RSP
        _element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _element(0x0800, struct.pack("<H", 0x0101)),  # CommandDataSetType: no data set
        _element(0x0900, struct.pack("<H", primitive.Status)),
        _element(0x1000, _uid(primitive.AffectedSOPInstanceUID)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


#: Command-set elements of a C-STORE-RQ (PS3.7 9.3.1.1) and how each is read.
_STORE_REQUEST_ELEMENTS = {
    0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US", 0x0800: "US",
    0x1000: "UI", 0x1030: "AE", 0x1031: "US",
}


def _command_elements(encoded: bytes) -> dict[int, bytes] | None:
    """Group 0000 elements (implicit VR little endian) by element number, or None when
    the bytes hold anything but C-STORE-RQ elements, each once."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(encoded)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", encoded, offset)
        offset += 8
        if (group != 0x0000 or element not in _STORE_REQUEST_ELEMENTS
                or element in elements or offset + length > end):
            return None
        elements[element] = encoded[offset:offset + length]
        offset += length
    return elements


class _CheckedUID(UID):
    """A UID already found conformant and 1-64 characters long: pynetdicom's ``set_uid``
    would accept it without a word, so :func:`_set_uid_trusting_checked` passes it on
    as is (the C-STORE response repeats the request's UIDs)."""


def _conformant_uid(raw: bytes) -> UID | None:
    text = raw.rstrip(b"\0 ").decode("ascii", "replace")
    if is_valid_uid(text):
        return _CheckedUID(text, validation_mode=pydicom_config.IGNORE)
    return None


def _us(raw: bytes) -> int | None:
    return struct.unpack("<H", raw)[0] if len(raw) == 2 else None


class _StoreFields(NamedTuple):
    """The command fields of a plain C-STORE request, read once."""

    message_id: int
    priority: int
    class_uid: UID
    instance_uid: UID


def _plain_store_fields(elements: dict[int, bytes] | None) -> _StoreFields | None:
    """The fields of a C-STORE-RQ with a data set, not a C-MOVE sub-operation (rare:
    pynetdicom converts those), whose values read the way pynetdicom's setters would
    accept silently; None for anything else."""
    if (elements is None or _config_validators_changed()
            or not {0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000} <= elements.keys()
            or 0x1030 in elements or 0x1031 in elements
            or _us(elements[0x0100]) != 0x0001
            or _us(elements[0x0800]) in (None, 0x0101)):
        return None
    message_id, priority = _us(elements[0x0110]), _us(elements[0x0700])
    class_uid = _conformant_uid(elements[0x0002])
    instance_uid = _conformant_uid(elements[0x1000])
    if (message_id is None or priority not in (0, 1, 2) or class_uid is None
            or instance_uid is None):
        return None
    return _StoreFields(message_id, priority, class_uid, instance_uid)


def _config_validators_changed() -> bool:
    return pynetdicom_config.VALIDATORS.get("UI") is not _validators.validate_ui
