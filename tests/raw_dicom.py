"""Send bytes that are not (quite) a dataset: truncated, corrupt or fuzzed C-STOREs.

pynetdicom's SCU encodes a pydicom Dataset before sending it, so it cannot send broken
bytes; with ``STORE_SEND_CHUNKED_DATASET`` it sends a file's dataset bytes as they are,
which is what a misbehaving modality or PACS does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import _config
from pynetdicom.association import Association

from dcn_node.net.receiver import encode_file_meta


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    """A dataset's bytes as sent in a C-STORE (little endian, no file meta)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def send_raw(assoc: Association, sop_class_uid: str, sop_instance_uid: str,
             transfer_syntax_uid: str, body: bytes) -> int | None:
    """C-STORE ``body`` as the dataset; returns the status (None: no response)."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid,
                                      "RAW"))
        handle.write(body)
        handle.flush()
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = assoc.send_c_store(Path(handle.name))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
    value = getattr(status, "Status", None)
    return None if value is None else int(value)
