"""The C-STORE SCU: delivers the outbox to each destination, with retries.

One thread per destination, so a PACS that is down or slow delays only its own results.
Each pass claims the due deliveries in the node's name (:meth:`Outbox.claim`; under a
lease, renewed while the pass runs, when the store is shared), opens one association per
result set (proposing, for each SOP class, the file's own transfer syntax and the two
uncompressed ones, so the peer picks what it accepts), sends the objects in order and
releases. Outcomes (recorded only while the delivery is still this node's claim):

- Success or Warning status: ``sent``.
- Out of resources (0xA7xx), resource limitation (0x0213), processing failure (0x0110),
  a refused, aborted or timed-out association, a connection error: retried with
  exponential backoff and jitter until ``sender.max_age_seconds``, then ``dead``.
- Any other failure status, or no accepted presentation context for the SOP class: the
  peer will answer the same next time, so ``dead`` at once with the reason.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable
from itertools import groupby

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext

from dcn_node.config import Destination, SenderSettings
from dcn_node.errors import StoreUnavailableError
from dcn_node.net import transport_tuning
from dcn_node.store.lease import LeaseKeeper, default_node_id
from dcn_node.store.outbox import Delivery, Outbox

LOGGER = logging.getLogger(__name__)

#: Failure statuses worth retrying: the peer may accept the same object later.
_TRANSIENT_STATUSES = {0x0110, 0x0213}

#: Told when an object was acknowledged: (delivery, completed the set for this destination).
DeliveredCallback = Callable[[Delivery, bool], None]
#: Told each delivery's outcome: (delivery, "sent" | "retry" | "dead"), after it is recorded
#: (for "sent", after the DeliveredCallback).
OutcomeCallback = Callable[[Delivery, str], None]


class TransientError(Exception):
    """A failure that a later attempt may not meet (network, busy peer)."""


def is_transient_status(status: int) -> bool:
    return (status & 0xFF00) == 0xA700 or status in _TRANSIENT_STATUSES


def backoff_seconds(attempts: int, settings: SenderSettings, rng: random.Random) -> float:
    """Delay before attempt ``attempts + 1``: initial * 2**(attempts - 1), capped, +-25%."""
    base = settings.retry_initial_seconds * 2 ** max(0, attempts - 1)
    return min(base, settings.retry_max_interval_seconds) * rng.uniform(0.75, 1.25)


def keep_rejects(rejects: list[A_ASSOCIATE_RJ]) -> Callable[[evt.Event], None]:
    """An EVT_PDU_RECV handler that keeps each A-ASSOCIATE-RJ received in ``rejects``: the
    reject as it came off the wire. pynetdicom 3.0.4's requestor reports a received reject as
    an abort when its DUL thread closed the socket (AE-4) before the user thread looked."""

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejects.append(event.pdu)

    return on_pdu


def _tcp_nodelay(event: evt.Event) -> None:
    # Without it, small PDUs wait for delayed ACKs (~40 ms each on Linux loopback).
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_context(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """The ``tls_args`` for pynetdicom, or None when the destination is plain TCP."""
    tls = destination.tls
    if tls is None:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context, tls.server_hostname or destination.host


class DestinationSender:
    """Delivers one destination's share of the outbox on its own thread.

    Parameters
    ----------
    outbox:
        Where the deliveries are recorded.
    destination:
        The peer.
    settings:
        Retry and timeout settings.
    calling_ae_title:
        Our AE title on these associations.
    owner, lease_seconds:
        The node's name on its claims (default: :func:`default_node_id`), and how long a
        claim holds unless renewed (None: until an outcome; one node, SQLite).
    """

    def __init__(
        self,
        outbox: Outbox,
        destination: Destination,
        settings: SenderSettings,
        calling_ae_title: str,
        *,
        on_delivered: DeliveredCallback | None = None,
        on_outcome: OutcomeCallback | None = None,
        owner: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.outbox = outbox
        self.owner = owner or default_node_id()
        self.lease_seconds = lease_seconds
        self.destination = destination
        self.settings = settings
        self.calling_ae_title = calling_ae_title
        self._on_delivered = on_delivered
        self._on_outcome = on_outcome
        self._rng = random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"sender-{destination.name}", daemon=True
        )

    def start(self) -> None:
        # pynetdicom's requestor may lose a fast response to its own reactor otherwise.
        transport_tuning.install_safeguards()
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the object being sent, release, and stop (pending rows stay pending)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = 5.0
            try:
                self.send_due()
                next_at = self.outbox.next_attempt_at(self.destination.name)
                if next_at is not None:
                    wait = min(5.0, max(0.05, next_at - self.outbox.spool.now()))
            except StoreUnavailableError as exc:  # logged by the store once; try again
                LOGGER.debug("Sender %s waits for the store: %s", self.destination.name, exc)
            except Exception:  # keep delivering; the reason goes to the log
                LOGGER.exception("Sender %s: unexpected error", self.destination.name)
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    def send_due(self) -> None:
        """One pass: every due delivery, claimed, one association per result set; what
        the pass leaves unsent (stopping) is released for the next claim."""
        name, lease = self.destination.name, self.lease_seconds
        due = self.outbox.claim(name, self.owner, lease)
        if not due:
            return
        keeper = None
        if lease is not None:
            keeper = LeaseKeeper(lease / 3, name=f"sender-{name}-leases")
            keeper.hold(name, lambda: self.outbox.renew(name, self.owner, lease) > 0)
        try:
            for _, group in groupby(due, key=lambda d: d.result_set_id):
                if self._stop.is_set():
                    return
                self._send_result_set(list(group))
        finally:
            if keeper is not None:
                keeper.stop()
            self.outbox.release(self.owner, name)

    def _send_result_set(self, deliveries: list[Delivery]) -> None:
        datasets: dict[int, pydicom.Dataset] = {}
        for delivery in deliveries:
            try:
                datasets[delivery.delivery_id] = pydicom.dcmread(delivery.path)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                self._dead(delivery, f"cannot read {delivery.path.name}: {exc}")
        todo = [d for d in deliveries if d.delivery_id in datasets]
        if not todo:
            return
        try:
            assoc = self._associate(todo, datasets)
        except TransientError as exc:
            self._retry_together(todo, str(exc))
            return
        try:
            for index, delivery in enumerate(todo):
                if self._stop.is_set():
                    return  # what is left stays pending for the next start
                if not assoc.is_established:
                    self._retry_together(todo[index:], "association ended early")
                    return
                self._send_one(assoc, delivery, datasets[delivery.delivery_id])
        finally:
            if assoc.is_established:
                assoc.release()

    def _associate(self, deliveries: list[Delivery],
                   datasets: dict[int, pydicom.Dataset]) -> Association:
        dest, settings = self.destination, self.settings
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = settings.acse_timeout_seconds
        ae.dimse_timeout = settings.dimse_timeout_seconds
        ae.network_timeout = settings.dimse_timeout_seconds
        ae.connection_timeout = settings.connect_timeout_seconds
        syntaxes: dict[str, list[str]] = {}
        for delivery in deliveries:
            own = str(datasets[delivery.delivery_id].file_meta.TransferSyntaxUID)
            wanted = syntaxes.setdefault(delivery.sop_class_uid, [])
            for uid in (own, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if uid not in wanted:
                    wanted.append(uid)
        contexts: list[PresentationContext] = []
        for sop_class, transfer_syntaxes in syntaxes.items():
            # One context per syntax: the peer accepts each on its own merits.
            contexts.extend(build_context(sop_class, ts) for ts in transfer_syntaxes)
        if len(contexts) > 128:
            raise TransientError("too many presentation contexts")
        rejects: list[A_ASSOCIATE_RJ] = []
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, _tcp_nodelay), (evt.EVT_PDU_RECV, keep_rejects(rejects))]
        try:
            assoc = ae.associate(
                dest.host, dest.port, contexts=contexts, ae_title=dest.ae_title,
                tls_args=tls_context(dest), evt_handlers=handlers,
            )
        except (OSError, ssl.SSLError) as exc:
            raise TransientError(f"cannot connect: {exc}") from exc
        if assoc.is_established:
            return assoc
        if rejects:
            reject = rejects[0]
            raise TransientError(f"association rejected by {dest.ae_title}@{dest.host}:"
                                 f"{dest.port}: {reject.result_str}, {reject.source_str}, "
                                 f"{reject.reason_str}")
        if assoc.is_aborted:
            raise TransientError(f"association aborted by {dest.ae_title}@{dest.host}:"
                                 f"{dest.port}")
        raise TransientError(f"no association with {dest.ae_title}@{dest.host}:{dest.port} "
                             "(connection refused or timed out)")

    def _send_one(self, assoc: Association, delivery: Delivery, ds: pydicom.Dataset) -> None:
        accepted = [c for c in assoc.accepted_contexts
                    if c.abstract_syntax == delivery.sop_class_uid]
        if not accepted:
            self._dead(delivery, f"{self.destination.name} accepts no presentation context "
                                 f"for SOP class {delivery.sop_class_uid}")
            return
        own = str(ds.file_meta.TransferSyntaxUID)
        if own not in {str(c.transfer_syntax[0]) for c in accepted}:
            # Accepted only in another uncompressed syntax: pynetdicom re-encodes.
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                self._dead(delivery, f"{self.destination.name} does not accept transfer "
                                     f"syntax {own} for {delivery.sop_class_uid}")
                return
        try:
            response = assoc.send_c_store(ds)
        except (OSError, ValueError, RuntimeError) as exc:
            self._retry(delivery, f"C-STORE failed: {type(exc).__name__}: {exc}")
            return
        status = getattr(response, "Status", None)
        if status is None:
            self._retry(delivery, "no C-STORE response (timeout or association aborted)")
            return
        status = int(status)
        comment = str(response.get("ErrorComment", "") or "")
        if status == 0x0000 or (status & 0xF000) == 0xB000 or status == 0x0001:
            complete = self.outbox.mark_sent(delivery, owner=self.owner)
            if self._on_delivered is not None:
                self._on_delivered(delivery, complete)
            self._outcome(delivery, "sent")
        elif is_transient_status(status):
            self._retry(delivery, f"status 0x{status:04X} {comment}".strip())
        else:
            self._dead(delivery, f"status 0x{status:04X} {comment}".strip())

    # -- outcomes ----------------------------------------------------------------------

    def _retry(self, delivery: Delivery, error: str) -> None:
        self._retry_together([delivery], error)

    def _retry_together(self, deliveries: list[Delivery], error: str) -> None:
        """Schedule the next attempt of objects that failed together at one time (one
        jitter draw), so that they go out again over one association."""
        now = self.outbox.spool.now()  # the database's clock on PostgreSQL, as created_at
        waiting = []
        for delivery in deliveries:
            age = now - delivery.created_at
            if age >= self.settings.max_age_seconds:
                self._dead(delivery, f"undelivered for {age / 3600:.1f} h; last error: "
                                     f"{error}")
            else:
                waiting.append(delivery)
        if not waiting:
            return
        attempts = max(d.attempts for d in waiting) + 1
        delay = backoff_seconds(attempts, self.settings, self._rng)
        for delivery in waiting:
            self.outbox.mark_retry(delivery, error, now + delay, owner=self.owner)
            self._outcome(delivery, "retry")
        first = waiting[0]
        LOGGER.warning("Sender %s: %d object(s) of series %s not delivered (%s); retry in "
                       "%.0f s", self.destination.name, len(waiting),
                       first.series_instance_uid, error, delay)

    def _dead(self, delivery: Delivery, reason: str) -> None:
        self.outbox.mark_dead(delivery, reason, owner=self.owner)
        LOGGER.error("Sender %s: %s %s of series %s is a dead letter: %s",
                     self.destination.name, delivery.kind, delivery.sop_instance_uid,
                     delivery.series_instance_uid, reason)
        self._outcome(delivery, "dead")

    def _outcome(self, delivery: Delivery, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(delivery, outcome)
