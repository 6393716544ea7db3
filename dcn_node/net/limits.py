"""Size limits on what a peer may make the node hold in memory while it receives.

pynetdicom reads a PDU whose length the peer declares (up to 4 GiB) and appends every
P-DATA fragment of a DIMSE message to one buffer until the message is complete; only then
does a C-STORE handler see it. So a limit checked in the handler comes too late: the
memory is spent. Two checks run where the bytes arrive instead:

* **PDU length** (:func:`check_pdu_length`, called by the socket read in
  :mod:`dcn_node.net.transport_tuning`): a PDU longer than ``node.maximum_pdu_size`` (when set;
  otherwise ``node.max_dataset_bytes`` plus room for the command) closes the connection
  before anything is allocated.
* **Malformed DIMSE messages** abort the association instead of killing pynetdicom's
  DUL thread (see :func:`bounded_receive_primitive`).
* **Dataset size** (:func:`bounded_receive_primitive`, wrapping pynetdicom's
  ``DIMSEServiceProvider.receive_primitive``): once the fragments of one message exceed
  ``node.max_dataset_bytes``, the buffer is dropped and the association aborted (A-ABORT),
  the way pynetdicom itself answers an invalid DIMSE message.

Both apply only to associations of an AE that carries the limits (the Storage SCP sets
them with :func:`set_limits`); our own sender's associations are not limited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pynetdicom.dimse

LOGGER = logging.getLogger(__name__)

#: Room beside the dataset in an unlimited-PDU association: command set, PDV headers.
COMMAND_ALLOWANCE_BYTES = 64 * 1024
#: Slack over the negotiated maximum: PDV item headers (4-byte length + 2 bytes each).
PDU_HEADER_SLACK_BYTES = 64

_ATTRIBUTE = "_dcn_limits"


@dataclass(frozen=True)
class Limits:
    """What one AE's peers may send."""

    #: Largest PDU body accepted, bytes.
    max_pdu_bytes: int
    #: Largest dataset of one DIMSE message, bytes.
    max_dataset_bytes: int
    #: Told the reason code (``pdu_too_large``, ``dataset_too_large``, ``unparsable``) of
    #: each association cut off.
    on_exceeded: Callable[[str], None] | None = None


def set_limits(ae: Any, maximum_pdu_size: int, max_dataset_bytes: int,
               on_exceeded: Callable[[str], None] | None = None) -> Limits:
    """Attach limits to a pynetdicom AE (its associations are checked from now on)."""
    if maximum_pdu_size:
        max_pdu = maximum_pdu_size + PDU_HEADER_SLACK_BYTES
    else:
        max_pdu = max_dataset_bytes + COMMAND_ALLOWANCE_BYTES
    limits = Limits(max_pdu, max_dataset_bytes, on_exceeded)
    setattr(ae, _ATTRIBUTE, limits)
    install()
    return limits


def _limits_of(assoc: Any) -> Limits | None:
    ae = getattr(assoc, "ae", None)
    return getattr(ae, _ATTRIBUTE, None)


def _peer(assoc: Any) -> str:
    try:
        requestor = assoc.requestor
        return f"{requestor.ae_title.strip() or '?'}@{requestor.address}"
    except Exception:  # the association may be half set up
        return "?"


def check_pdu_length(assoc_socket: Any, nr_bytes: int) -> None:
    """Raise OSError when the peer declared a PDU longer than its AE's limit (pynetdicom
    then closes the connection: 'Connection closed before the entire PDU was received')."""
    limits = _limits_of(getattr(assoc_socket, "_assoc", None))
    if limits is None or nr_bytes <= limits.max_pdu_bytes:
        return
    assoc = assoc_socket._assoc
    LOGGER.warning("Closing association from %s: PDU of %d bytes declared, limit %d "
                   "(node.maximum_pdu_size / node.max_dataset_bytes)", _peer(assoc),
                   nr_bytes, limits.max_pdu_bytes)
    if limits.on_exceeded is not None:
        limits.on_exceeded("pdu_too_large")
    raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {limits.max_pdu_bytes}")


_original_receive_primitive = pynetdicom.dimse.DIMSEServiceProvider.receive_primitive


def bounded_receive_primitive(self: Any, primitive: Any) -> None:
    """pynetdicom's ``receive_primitive``, then: abort when the message being assembled
    has grown past the AE's ``max_dataset_bytes``.

    Also aborts when pynetdicom fails on a malformed command set (found by fuzzing:
    ``decode_msg`` raises AttributeError or TypeError for a command set without a usable
    CommandField, which killed the association's DUL thread and left it hanging)."""
    limits = _limits_of(self.assoc)
    try:
        _original_receive_primitive(self, primitive)
    except Exception as exc:
        if limits is None:
            raise
        LOGGER.warning("Aborting association from %s: invalid DIMSE message (%s: %s)",
                       _peer(self.assoc), type(exc).__name__, exc)
        if limits.on_exceeded is not None:
            limits.on_exceeded("unparsable")
        self.message = None
        self.dul.event_queue.put("Evt19")  # invalid PDU -> A-ABORT, connection closed
        return
    message = self.message
    if message is None:
        return
    data_set = getattr(message, "data_set", None)
    if limits is None or not isinstance(data_set, BytesIO):
        return
    if dataset_too_large(self.assoc, data_set.tell()):
        message.data_set = BytesIO()
        self.message = None
        self.dul.event_queue.put("Evt19")  # invalid PDU -> A-ABORT, connection closed


def dataset_too_large(assoc: Any, size: int) -> bool:
    """True (logged and counted) when a dataset being received has grown past its AE's
    ``max_dataset_bytes``: the caller drops it and aborts the association."""
    limits = _limits_of(assoc)
    if limits is None or size <= limits.max_dataset_bytes:
        return False
    LOGGER.warning("Aborting association from %s: dataset over %d bytes exceeds "
                   "node.max_dataset_bytes (%d); not acknowledged, the sender keeps it",
                   _peer(assoc), size, limits.max_dataset_bytes)
    if limits.on_exceeded is not None:
        limits.on_exceeded("dataset_too_large")
    return True


_installed = False


def install() -> None:
    """Wrap pynetdicom's DIMSE receive (idempotent)."""
    global _installed
    if not _installed:
        pynetdicom.dimse.DIMSEServiceProvider.receive_primitive = (  # type: ignore[method-assign]
            bounded_receive_primitive)
        _installed = True
