"""Malformed and mutated PDUs and datasets against a running Storage SCP on loopback.

Shared by tests/test_fuzz.py (hypothesis, bounded) and bench/fuzz.py (seeded random
mutations for as long as asked). A mutation is a list of operations on the bytes of a
valid message, so hypothesis and a random generator draw the same kinds of change.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Sequence

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import NODE_AET
from tests.dicom_factory import ct_slice
from tests.raw_dicom import encode, send_raw

#: (kind, position, value): flip a byte, set a 32-bit length, truncate, insert bytes.
Operation = tuple[str, int, int]
OPERATION_KINDS = ("byte", "length", "truncate", "insert", "delete")


def mutate(data: bytes, operations: Sequence[Operation]) -> bytes:
    out = bytearray(data)
    for kind, position, value in operations:
        if not out:
            break
        at = position % len(out)
        if kind == "byte":
            out[at] = value & 0xFF
        elif kind == "length":
            out[at:at + 4] = struct.pack("<I", (0xFFFFFFFF, 0, 0x7FFFFFFF, value)[value % 4])
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value & 0xFF]) * (1 + value % 64)
        elif kind == "delete":
            del out[at:at + 1 + value % 16]
    return bytes(out)


def _capture_associate_rq() -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom sends for CT storage + verification, as bytes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    captured: list[bytes] = []

    def accept() -> None:
        connection, _ = listener.accept()
        connection.settimeout(5)
        header = connection.recv(6)
        length = struct.unpack(">I", header[2:6])[0]
        body = b""
        while len(body) < length:
            body += connection.recv(length - len(body))
        captured.append(header + body)
        connection.close()

    thread = threading.Thread(target=accept)
    thread.start()
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.acse_timeout = 2
    ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    thread.join(10)
    listener.close()
    return captured[0]


def _echo_p_data() -> bytes:
    """A P-DATA-TF PDU carrying a C-ECHO-RQ on presentation context 3 (Verification)."""
    request = C_ECHO()
    request.MessageID = 1
    request.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    (primitive,) = list(message.encode_msg(3, 0))
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()  # type: ignore[no-any-return]


class Seeds:
    """Valid messages to mutate (made once)."""

    def __init__(self) -> None:
        self.associate_rq = _capture_associate_rq()
        self.echo_p_data = _echo_p_data()
        ds = ct_slice(generate_uid(), generate_uid(), 0.0, rows=16, columns=16)
        self.dataset = encode(ds)
        self.sop_class_uid = str(ds.SOPClassUID)
        self.sop_instance_uid = str(ds.SOPInstanceUID)


def _read_some(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (TimeoutError, OSError):
        return b""


def send_pdus(port: int, seeds: Seeds, operations: Sequence[Operation], *,
              target: str, timeout: float = 0.5) -> None:
    """One connection: a mutated A-ASSOCIATE-RQ (``target='associate'``), or a valid one
    followed by a mutated P-DATA (``target='p_data'``); reads what comes back, closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if target == "associate":
            sock.sendall(mutate(seeds.associate_rq, operations))
            _read_some(sock)
            return
        sock.sendall(seeds.associate_rq)
        answer = _read_some(sock)
        if not answer.startswith(b"\x02"):  # not accepted (e.g. busy): nothing to fuzz
            return
        try:
            sock.sendall(mutate(seeds.echo_p_data, operations))
        except OSError:
            return
        _read_some(sock)


class DatasetFuzzer:
    """Keeps one association open and C-STOREs mutated datasets over it (reconnecting
    after the node aborts one); counts the answers."""

    def __init__(self, port: int, seeds: Seeds) -> None:
        self.port = port
        self.seeds = seeds
        self.assoc: Association | None = None
        self.statuses: dict[str, int] = {}

    def _association(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            ae = AE(ae_title="FUZZER")
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2
            self.assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
            if not self.assoc.is_established:
                raise ConnectionError("node refused the fuzzing association")
        return self.assoc

    def send(self, operations: Sequence[Operation]) -> int | None:
        body = mutate(self.seeds.dataset, operations)
        assoc = self._association()
        try:
            status = send_raw(assoc, self.seeds.sop_class_uid, self.seeds.sop_instance_uid,
                              ExplicitVRLittleEndian, body)
        except (RuntimeError, OSError, ValueError):
            status = None
        key = "aborted" if status is None else f"0x{status:04X}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        return status

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
