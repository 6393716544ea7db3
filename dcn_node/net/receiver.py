"""The Storage SCP: thin C-STORE handlers, access control, DICOM statuses.

The C-STORE handler parses the header (only the tags the node files by), writes the encoded
dataset as received to the spool and answers. It never decodes pixels, runs the model or
sends anything: that happens on other workers, so receiving never waits on them.

Failure classes map to DICOM statuses here, at the protocol edge:

=====================================  ======  ==============================
what went wrong                        status  meaning
=====================================  ======  ==============================
spool write failed, disk (nearly) full 0xA700  Refused: Out of Resources
dataset cannot be parsed / lacks UIDs  0xC000  Error: Cannot understand
no or truncated Pixel Data             0xC000  Error: Cannot understand
dataset over node.max_dataset_bytes    0xC000  (or the association aborted
                                               while it arrives: limits.py)
dataset UIDs differ from the request   0xA900  Error: Data Set does not match
=====================================  ======  ==============================

A refused instance is not acknowledged, so the sender keeps it and reports the failure;
the node logs the reason and counts it (``dcn_bad_input_total{reason}``). An instance
refused for its content (0xC000, 0xA900) is also kept in the quarantine with the reason
(:mod:`dcn_node.store.quarantine`); an 0xA700 refusal is not (the disk is the problem, and the
sender sends it again).

Transfer syntaxes are offered only when pydicom has a working decoder for them (the
pylibjpeg plugins), so data the node could not decode is refused at negotiation rather
than accepted and failed later. With ``node.tls`` the port speaks DICOM over TLS only
(TLS 1.2 or newer; peer certificates checked against ``node.tls.ca_file``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import __version__ as pynetdicom_version
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification  # type: ignore[attr-defined]  # made in globals() at import
from pynetdicom.transport import ThreadedAssociationServer

from dcn_node import __version__
from dcn_node.config import ScpTlsSettings, Settings
from dcn_node.errors import InvalidInstanceError, SpoolWriteError
from dcn_node.header import InstanceHeader, is_valid_uid, read_header
from dcn_node.net import limits, transport_tuning
from dcn_node.store.quarantine import Quarantine, RefusedInstance
from dcn_node.store.spool import Spool

LOGGER = logging.getLogger(__name__)

#: Transfer syntaxes we may accept: the uncompressed ones and the lossless compressed ones
#: the pylibjpeg plugins (libjpeg, openjpeg, rle) decode; see accepted_transfer_syntaxes().
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
]
STORAGE_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)



def accepted_transfer_syntaxes() -> list[str]:
    """:data:`TRANSFER_SYNTAXES` less the compressed ones no installed decoder handles."""
    accepted = []
    for uid in TRANSFER_SYNTAXES:
        if uid.is_compressed:
            try:
                available = get_decoder(uid).is_available
            except NotImplementedError:
                available = False
            if not available:
                LOGGER.warning("Not accepting %s (%s): no pixel data decoder installed",
                               uid.name, uid)
                continue
        accepted.append(str(uid))
    return accepted


def scp_ssl_context(tls: ScpTlsSettings) -> ssl.SSLContext:
    """Server-side TLS context: TLS 1.2+, our certificate, peers checked against ca_file."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                         cafile=str(tls.ca_file) if tls.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else (
        ssl.CERT_OPTIONAL if tls.ca_file else ssl.CERT_NONE)
    return context


STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: A UUID-derived UID (PS3.5 B.2), fixed for dcn-node: no registered root is needed.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    uuid.uuid5(uuid.NAMESPACE_URL, "urn:dcn-node:implementation").int
)
IMPLEMENTATION_VERSION_NAME = f"DCN_NODE_{__version__}"[:16]


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1), encoded directly.

    pynetdicom's ``Event.encoded_dataset()`` builds the same bytes through pydicom
    datasets, which cost ~0.5 ms per instance on the association thread; this is a few us.
    tests/test_receiver.py checks that pydicom reads these bytes back as written.
    """
    body = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
            _element(0x0002, 0x0010, b"UI", _uid(transfer_syntax_uid)),
            _element(0x0002, 0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _element(0x0002, 0x0016, b"AE", _text(source_ae_title.strip() or "UNKNOWN")),
        )
    )
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # ErrorComment is LO: 64 characters at most.
    ds.ErrorComment = comment[:64]
    return ds


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused: A-ASSOCIATE-RJ (result, source, diagnostic)."""

    reason: str
    result: int = 0x01  # rejected-permanent
    source: int = 0x01  # DICOM UL service-user
    diagnostic: int = 0x01  # no reason given
    #: Short fixed name of the reason (the metrics label): calling_ae, host, ...
    code: str = "other"


#: Callback asked before accepting an association; returns a refusal (e.g. backpressure).
AdmissionCheck = Callable[[], Refusal | None]
#: Callback told about every stored instance (metrics, tests).
StoredCallback = Callable[[InstanceHeader, str], None]
#: Callback told how each association request ended: None (accepted) or a refusal code.
AssociationCallback = Callable[[str | None], None]
#: Callback told about every C-STORE response: (status, bytes stored; 0 unless Success).
StoreStatusCallback = Callable[[int, int], None]
#: Callback told the reason code of every instance refused for its content (metrics).
BadInputCallback = Callable[[str], None]
#: Callback told about every presentation context refused at negotiation: the reason code.
ContextRefusedCallback = Callable[[str], None]

#: A refused context already logged for a peer is logged again (WARNING) after a day;
#: in between at DEBUG (storescu, for one, proposes over 100 contexts per association).
CONTEXT_WARNING_REPEAT_SECONDS = 86400.0

#: A-ASSOCIATE-AC presentation context results -> (reason code, what the log says).
_CONTEXT_REFUSALS: dict[int | None, tuple[str, str]] = {
    0x01: ("user", "refused by the acceptor"),
    0x02: ("other", "no reason given"),
    0x03: ("sop_class", "SOP class not accepted (the node takes CT images and Verification)"),
    0x04: ("transfer_syntax", "none of the transfer syntaxes can be decoded"),
}

#: pynetdicom's own rejections (A-ASSOCIATE-RJ result, source, diagnostic) -> refusal code.
_PYNETDICOM_REJECTIONS = {(0x01, 0x01, 0x07): "called_ae", (0x02, 0x03, 0x02): "max_associations"}


class StorageSCP:
    """The node's DICOM listener.

    Parameters
    ----------
    settings:
        The node configuration (``node`` and ``storage`` sections are used).
    spool:
        Where received instances are written and indexed.
    admission_check:
        Optional callback consulted for every association request after the allowlists;
        a :class:`Refusal` it returns is sent as A-ASSOCIATE-RJ.
    on_stored:
        Optional callback run after an instance is stored (with its header and calling AE).
    on_association:
        Optional callback told how every association request ended (metrics).
    on_store_status:
        Optional callback told every C-STORE status answered and the bytes stored (metrics).
    on_bad_input:
        Optional callback told the reason code of every instance refused for its content.
    quarantine:
        Where instances refused for their content are kept (None: nowhere).
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        *,
        admission_check: AdmissionCheck | None = None,
        on_stored: StoredCallback | None = None,
        on_association: AssociationCallback | None = None,
        on_store_status: StoreStatusCallback | None = None,
        on_bad_input: BadInputCallback | None = None,
        on_context_refused: ContextRefusedCallback | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self._admission_check = admission_check
        self._on_stored = on_stored
        self._on_association = on_association
        self._on_store_status = on_store_status
        self._on_bad_input = on_bad_input
        self._on_context_refused = on_context_refused
        self._context_warned: dict[tuple[str, ...], float] = {}  # refusal -> last WARNING
        self._context_lock = threading.Lock()
        self._quarantine = quarantine
        self._server: ThreadedAssociationServer | None = None
        self._accepting = threading.Event()
        self._allowed_aets = {a.strip() for a in settings.node.allowed_calling_aets}
        self._allowed_networks = [
            ipaddress.ip_network(h, strict=False) for h in settings.node.allowed_hosts
        ]
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.maximum_pdu_size
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        # Called AE title must be ours; calling AE / host allowlists are checked in
        # _on_requested so that every refusal is logged with its reason.
        ae.require_called_aet = True
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        limits.set_limits(ae, node.maximum_pdu_size, node.max_dataset_bytes,
                          self._bad_input)
        # Our C-STORE handler sends nothing back on the association: it may run on the
        # thread that read the request (dcn_node/net/transport_tuning.py).
        transport_tuning.serve_stores_inline(ae)
        return ae

    def _bad_input(self, code: str) -> None:
        if self._on_bad_input is not None:
            self._on_bad_input(code)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start listening (returns at once; associations run on their own threads)."""
        # Always: bulk reads carry the PDU length limit (dcn_node/net/limits.py), and
        # pynetdicom's requestors must keep their responses (our sender is one).
        transport_tuning.install_safeguards()
        if self.settings.node.transport_tuning:
            transport_tuning.install()
        node = self.settings.node
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        context = scp_ssl_context(node.tls) if node.tls is not None else None
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers, ssl_context=context
        )
        self._accepting.set()
        LOGGER.info(
            "Storage SCP %s listening on %s:%d%s (pynetdicom %s, max %d associations)",
            node.ae_title,
            node.host,
            self.port,
            " over TLS" if context is not None else "",
            pynetdicom_version,
            node.max_associations,
        )

    @property
    def port(self) -> int:
        """The TCP port listened on (useful when configured as 0 in tests)."""
        if self._server is None:
            return self.settings.node.port
        return int(self._server.server_address[1])

    @property
    def is_listening(self) -> bool:
        return self._server is not None and self._accepting.is_set()

    def refuse_new_associations(self) -> None:
        """Refuse new associations from now on (graceful shutdown, first step)."""
        self._accepting.clear()

    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish (up to ``timeout``), close."""
        self.refuse_new_associations()
        deadline = time.monotonic() + timeout
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            LOGGER.warning(
                "Aborting %d association(s) still open after %.0f s",
                len(self.ae.active_associations),
                timeout,
            )
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers ----------------------------------------------------------------------

    def _refusal_for(self, calling_ae: str, host: str) -> Refusal | None:
        if not self._accepting.is_set():
            return Refusal("node is shutting down", 0x02, 0x03, 0x01, code="shutting_down")
        if self._allowed_aets and calling_ae not in self._allowed_aets:
            return Refusal("calling AE title not in node.allowed_calling_aets", 0x01, 0x01, 0x03,
                           code="calling_ae")
        if self._allowed_networks:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return Refusal(f"peer address {host!r} is not an IP address", code="host")
            if not any(address in network for network in self._allowed_networks):
                return Refusal("peer host not in node.allowed_hosts", code="host")
        if self._admission_check is not None:
            return self._admission_check()
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None  # the A-ASSOCIATE request this event is about
        calling_ae = primitive.calling_ae_title.strip()
        called_ae = primitive.called_ae_title.strip()
        host = assoc.requestor.address
        if called_ae != self.settings.node.ae_title:
            # pynetdicom rejects this itself (require_called_aet); we log why.
            LOGGER.warning(
                "Refusing association from %s@%s: called AE title %r is not ours (%r)",
                calling_ae,
                host,
                called_ae,
                self.settings.node.ae_title,
            )
            return
        refusal = self._refusal_for(calling_ae, host) or self._negotiate(assoc, calling_ae, host)
        if refusal is None:
            LOGGER.debug("Accepting association from %s@%s", calling_ae, host)
            return
        LOGGER.warning("Refusing association from %s@%s: %s", calling_ae, host, refusal.reason)
        assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        if self._on_association is not None:
            self._on_association(refusal.code)
        assoc.kill()

    def _negotiate(self, assoc: Association, calling_ae: str, host: str) -> Refusal | None:
        """Log and count each presentation context pynetdicom is about to refuse; a refusal
        when none is left (pynetdicom would accept an association with nothing usable).

        The same public function pynetdicom negotiates with, on the same inputs, runs here
        first: pynetdicom has no hook between its negotiation and its A-ASSOCIATE-AC, and a
        reject must be sent before that.
        """
        requested = assoc.requestor.requested_contexts
        roles = {uid: (item.scu_role, item.scp_role)
                 for uid, item in assoc.requestor.role_selection.items()}
        results, _ = negotiate_as_acceptor(requested, assoc.acceptor.supported_contexts, roles)
        proposed = {cx.context_id: cx for cx in requested}
        for result in results:
            if result.result == 0x00:
                continue
            code, why = _CONTEXT_REFUSALS.get(result.result, ("other", "no reason given"))
            asked = proposed.get(result.context_id, result)
            syntaxes = ", ".join(str(ts) for ts in asked.transfer_syntax) or "none"
            level = self._context_log_level((calling_ae, host, code, str(asked.abstract_syntax),
                                             syntaxes))
            LOGGER.log(level, "Refusing presentation context %s from %s@%s: %s (SOP class %s, "
                       "transfer syntaxes %s)", result.context_id, calling_ae, host, why,
                       asked.abstract_syntax, syntaxes)
            if self._on_context_refused is not None:
                self._on_context_refused(code)
        if any(result.result == 0x00 for result in results):
            return None
        # A-ASSOCIATE-RJ has no reason "no presentation context": rejected permanent,
        # by the service user, no reason given; the log says why.
        return Refusal("no presentation context it proposed can be accepted", 0x01, 0x01, 0x01,
                       code="no_context")

    def _context_log_level(self, key: tuple[str, ...]) -> int:
        """WARNING the first time a peer's context is refused (and again a day on)."""
        now = time.monotonic()
        with self._context_lock:
            last = self._context_warned.get(key)
            if last is not None and now - last < CONTEXT_WARNING_REPEAT_SECONDS:
                return logging.DEBUG
            if len(self._context_warned) > 10_000:  # many peers: forget the oldest half
                for old in sorted(self._context_warned,
                                  key=self._context_warned.__getitem__)[:5_000]:
                    del self._context_warned[old]
            self._context_warned[key] = now
            return logging.WARNING

    def _on_accepted(self, event: evt.Event) -> None:
        if self._on_association is not None:
            self._on_association(None)

    def _on_rejected(self, event: evt.Event) -> None:
        # Only pynetdicom's own rejections get here (called AE title, too many
        # associations): a refusal sent from _on_requested does not trigger EVT_REJECTED.
        primitive = event.assoc.acceptor.primitive
        key = None if primitive is None else (primitive.result, primitive.result_source,
                                              primitive.diagnostic)
        code = _PYNETDICOM_REJECTIONS.get(key, "other")  # type: ignore[arg-type]
        if code == "max_associations":
            LOGGER.warning("Refusing association from %s@%s: node.max_associations (%d) reached",
                           event.assoc.requestor.ae_title.strip(), event.assoc.requestor.address,
                           self.settings.node.max_associations)
        if self._on_association is not None:
            self._on_association(code)

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        request = cast(C_STORE, event.request)  # pynetdicom types it as any DIMSE request
        calling_ae = event.assoc.requestor.ae_title.strip()
        transfer_syntax = str(event.context.transfer_syntax)
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        # The dataset as received, in pynetdicom's own buffer: parsed and written in place.
        stream = request.DataSet
        assert stream is not None  # a C-STORE request always carries its data set
        size = stream.seek(0, 2)
        stream.seek(0)
        limit = self.settings.node.max_dataset_bytes
        if size > limit:
            reason = f"dataset of {size} bytes exceeds node.max_dataset_bytes ({limit})"
            return self._refuse_content(event, STATUS_CANNOT_UNDERSTAND, reason,
                                        "dataset_too_large")
        try:
            header = read_header(stream, transfer_syntax, check_pixel_data=True,
                                 max_inflated_bytes=limit)
        except InvalidInstanceError as exc:
            return self._refuse_content(event, STATUS_CANNOT_UNDERSTAND, str(exc), exc.code)
        if header.sop_instance_uid != sop_instance_uid or header.sop_class_uid != str(
            request.AffectedSOPClassUID
        ):
            reason = "dataset SOP Class/Instance UID differs from the C-STORE request"
            return self._refuse_content(event, STATUS_DATASET_MISMATCH, reason,
                                        "uid_mismatch", header)
        free = self._free_bytes()
        if free < self.settings.storage.min_free_bytes:
            reason = f"spool has {free} bytes free, below storage.min_free_bytes"
            return self._refuse(STATUS_OUT_OF_RESOURCES, sop_instance_uid, calling_ae, reason)
        meta = encode_file_meta(
            header.sop_class_uid, header.sop_instance_uid, transfer_syntax, calling_ae
        )
        try:
            with stream.getbuffer() as body:
                size = len(meta) + body.nbytes
                replaced = self.spool.store_instance(
                    header,
                    (meta, body),
                    transfer_syntax_uid=transfer_syntax,
                    calling_ae_title=calling_ae,
                )
        except SpoolWriteError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, sop_instance_uid, calling_ae, str(exc))
        if replaced:
            LOGGER.debug(
                "Instance %s re-sent by %s replaced its earlier copy", sop_instance_uid, calling_ae
            )
        if self._on_stored is not None:
            self._on_stored(header, calling_ae)
        if self._on_store_status is not None:
            self._on_store_status(STATUS_SUCCESS, size)
        return STATUS_SUCCESS

    def _refuse(self, status: int, sop_instance_uid: str, calling_ae: str, reason: str,
                code: str | None = None) -> Dataset:
        """Log why a C-STORE failed and build its failure status (ErrorComment = reason);
        ``code`` names a refusal for the instance's content (counted as bad input)."""
        log = LOGGER.error if status == STATUS_OUT_OF_RESOURCES else LOGGER.warning
        log("C-STORE of %s from %s answered 0x%04X: %s", sop_instance_uid, calling_ae, status,
            reason)
        if code is not None:
            self._bad_input(code)
        if self._on_store_status is not None:
            self._on_store_status(status, 0)
        return _status(status, reason)

    def _refuse_content(self, event: evt.Event, status: int, reason: str, code: str,
                        header: InstanceHeader | None = None) -> Dataset:
        """Refuse an instance for what it holds (:meth:`_refuse`) and quarantine the bytes
        received. The status answered is the same whatever happens to the copy."""
        request = cast(C_STORE, event.request)
        calling_ae = event.assoc.requestor.ae_title.strip()
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        answer = self._refuse(status, sop_instance_uid, calling_ae, reason, code)
        if self._quarantine is not None and self._quarantine.enabled:
            try:
                self._keep_refused(event, calling_ae, status, reason, code, header)
            except Exception:  # the copy is a convenience: never a crash, never another status
                LOGGER.exception("Quarantining refused instance %s from %s failed",
                                 sop_instance_uid, calling_ae)
        return answer

    def _keep_refused(self, event: evt.Event, calling_ae: str, status: int, reason: str,
                      code: str, header: InstanceHeader | None) -> None:
        assert self._quarantine is not None
        request, requestor = cast(C_STORE, event.request), event.assoc.requestor
        transfer_syntax = str(event.context.transfer_syntax)
        sop_class_uid = str(request.AffectedSOPClassUID)
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        refused = RefusedInstance(
            reason_code=code,
            reason=reason,
            status=status,
            calling_ae_title=calling_ae,
            peer_address=str(requestor.address),
            peer_port=int(requestor.port or 0),
            transfer_syntax_uid=transfer_syntax,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            dataset_sop_class_uid=(header.sop_class_uid if header is not None
                                   and header.sop_class_uid != sop_class_uid else None),
            dataset_sop_instance_uid=(header.sop_instance_uid if header is not None
                                      and header.sop_instance_uid != sop_instance_uid
                                      else None),
            received_at=time.time(),
        )
        # The File Meta names the dataset's own UIDs when it could be read (a Part 10 file
        # that agrees with itself), else the request's; with neither valid: no File Meta.
        if header is not None and is_valid_uid(header.sop_class_uid) and is_valid_uid(
                header.sop_instance_uid):
            meta_uids = (header.sop_class_uid, header.sop_instance_uid)
        else:
            meta_uids = (sop_class_uid, sop_instance_uid)
        meta = (encode_file_meta(*meta_uids, transfer_syntax, calling_ae)
                if all(is_valid_uid(uid) for uid in meta_uids) else None)
        assert request.DataSet is not None  # checked by _on_store
        with request.DataSet.getbuffer() as body:
            self._quarantine.keep(refused, body, meta)

    def _free_bytes(self) -> int:
        stats = os.statvfs(self.spool.root)
        return stats.f_bavail * stats.f_frsize
