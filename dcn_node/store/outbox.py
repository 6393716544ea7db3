"""The durable outbox: result objects waiting to reach each destination.

A result set (the SEG, SC, SR and KOS files of one model run) is recorded here, in the spool's
index (SQLite, or PostgreSQL with ``store.url``), before anything is sent, with one delivery
row per object and destination.
The sender works through the rows; each ends ``sent`` (acknowledged by the peer), ``dead``
(a failure that retrying will not change, or undeliverable for longer than the configured
maximum age; ``dcn-node retry`` re-queues them) or ``superseded`` (a newer result set of
the same series replaced it before it was sent). Rows survive restarts, so results
acknowledged by nobody are sent after the node comes back.

Senders take their deliveries with :meth:`Outbox.claim`: a lease in the sender's node's
name on each row, taken with ``FOR UPDATE SKIP LOCKED``, so two senders sharing the index
(the nodes of a cluster) never hold the same delivery; an outcome is recorded only while
the delivery is still its claimer's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dcn_node.store.spool import Job, Spool

LOGGER = logging.getLogger(__name__)

DELIVERY_STATES = ("pending", "sent", "dead", "superseded")


@dataclass(frozen=True)
class ResultObject:
    """One file of a result set."""

    kind: str  # "seg", "sc", "sr" or "ko"
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Delivery:
    """One object on its way to one destination."""

    delivery_id: int
    result_set_id: int
    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None
    study_instance_uid: str
    series_instance_uid: str
    generation: int


@dataclass
class Backlog:
    """One destination's undelivered objects."""

    pending: int = 0
    dead: int = 0
    #: When the oldest pending object was recorded (None: nothing pending).
    oldest_pending_at: float | None = None


_DELIVERY_SELECT = (
    "SELECT d.delivery_id, d.result_set_id, d.destination, d.kind, d.sop_class_uid, "
    "d.sop_instance_uid, d.path, d.state, d.attempts, d.next_attempt_at, d.last_error, "
    "d.created_at, d.sent_at, r.study_instance_uid, r.series_instance_uid, r.generation "
    "FROM deliveries d JOIN result_sets r ON r.result_set_id = d.result_set_id"
)


def _fence(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The condition that applies an outcome only to ``owner``'s claim (None: anyone's)."""
    return ("", ()) if owner is None else (" AND lease_owner=?", (owner,))


def _delivery(row: tuple) -> Delivery:
    values = list(row)
    values[6] = Path(values[6])
    return Delivery(*values)


class Outbox:
    """Delivery bookkeeping kept in the spool's index.

    Parameters
    ----------
    spool:
        The spool whose SQLite index holds the outbox tables.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def record_result_set(
        self, job: Job, folder: Path, objects: Sequence[ResultObject],
        destinations: Mapping[str, Iterable[str]], *, finish: bool = False,
    ) -> int | None:
        """Record a result set and one pending delivery per object and destination.

        ``destinations`` maps each destination name to the object kinds it takes. Pending
        deliveries of older result sets of the same series are superseded in the same
        transaction: the new objects replace them. With ``finish`` the job is marked
        ``done`` in that transaction too. Fenced like
        :meth:`~dcn_node.store.spool.Spool.finish_job`: when ``job`` is no longer its
        latest claim (the lease ran out and another node took it), nothing is recorded and
        None is returned; otherwise the result set's id.
        """
        with self.spool.transaction() as db:
            if finish and not self.spool.finish_in(db, job, "done"):
                return None
            if not finish and job.claim and db.execute(
                    "SELECT claims FROM jobs WHERE job_id=?" + self.spool.dialect.lock_rows,
                    (job.job_id,)).fetchone() != (job.claim,):
                LOGGER.warning("Job %d of series %s (claim %d) was claimed again since; its "
                               "results are not recorded", job.job_id,
                               job.series_instance_uid, job.claim)
                return None
            now = db.now()
            superseded = db.execute(
                "UPDATE deliveries SET state='superseded', last_error='replaced by a newer "
                "result set' WHERE state IN ('pending', 'dead') AND result_set_id IN ("
                "SELECT result_set_id FROM result_sets WHERE study_instance_uid=? AND "
                "series_instance_uid=?)",
                (job.study_instance_uid, job.series_instance_uid),
            ).rowcount
            result_set_id = int(db.execute(
                "INSERT INTO result_sets (study_instance_uid, series_instance_uid, "
                "generation, folder, created_at) VALUES (?,?,?,?,?) RETURNING result_set_id",
                (job.study_instance_uid, job.series_instance_uid, job.generation,
                 str(folder), now),
            ).fetchone()[0])
            for name, kinds in destinations.items():
                wanted = set(kinds)
                db.executemany(
                    "INSERT INTO deliveries (result_set_id, destination, kind, sop_class_uid, "
                    "sop_instance_uid, path, state, next_attempt_at, created_at) "
                    "VALUES (?,?,?,?,?,?,'pending',?,?)",
                    [
                        (result_set_id, name, o.kind, o.sop_class_uid, o.sop_instance_uid,
                         str(o.path), now, now)
                        for o in objects
                        if o.kind in wanted
                    ],
                )
        if superseded:
            LOGGER.info("Series %s: %d undelivered object(s) of an older result set "
                        "superseded", job.series_instance_uid, superseded)
        return result_set_id

    # -- what the sender reads ---------------------------------------------------------

    def due(self, destination: str, now: float | None = None, limit: int = 500) -> list[Delivery]:
        """Pending deliveries to ``destination`` whose next attempt is due, oldest result
        set first, objects of one set together (not those a sender holds a lease on)."""
        now = self.spool.now() if now is None else now
        rows = self.spool.query(
            _DELIVERY_SELECT + " WHERE d.state='pending' AND d.destination=? AND "
            "d.next_attempt_at<=? AND (d.lease_expires_at IS NULL OR d.lease_expires_at<=?) "
            "ORDER BY d.result_set_id, d.delivery_id LIMIT ?",
            (destination, now, now, limit),
        )
        return [_delivery(r) for r in rows]

    def claim(self, destination: str, owner: str, lease_seconds: float | None,
              limit: int = 500) -> list[Delivery]:
        """Take the due deliveries to ``destination`` (as :meth:`due`) under a lease held by
        ``owner`` for ``lease_seconds``: until an outcome is recorded or the lease runs
        out, no other claimer gets them. Rows another claimer is taking at the same moment
        are passed over (PostgreSQL: ``FOR UPDATE SKIP LOCKED``), never waited for.

        ``lease_seconds`` None (one node, SQLite): the rows are marked ``owner``'s (which
        fences the outcomes) but not held against another claim."""
        with self.spool.transaction() as db:
            now = db.now()
            ids = [r[0] for r in db.execute(
                "SELECT delivery_id FROM deliveries WHERE state='pending' AND destination=? "
                "AND next_attempt_at<=? AND (lease_expires_at IS NULL OR lease_expires_at<=?) "
                "ORDER BY result_set_id, delivery_id LIMIT ?" + self.spool.dialect.skip_locked,
                (destination, now, now, limit),
            ).fetchall()]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            until = None if lease_seconds is None else now + lease_seconds
            db.execute(f"UPDATE deliveries SET lease_owner=?, lease_expires_at=? WHERE "
                       f"delivery_id IN ({marks})", (owner, until, *ids))
            rows = db.execute(_DELIVERY_SELECT + f" WHERE d.delivery_id IN ({marks}) ORDER BY "
                              "d.result_set_id, d.delivery_id", ids).fetchall()
        return [_delivery(r) for r in rows]

    def renew(self, destination: str, owner: str, lease_seconds: float) -> int:
        """Extend, from now, the leases ``owner`` holds on deliveries to ``destination``;
        returns how many it still holds."""
        with self.spool.transaction() as db:
            return int(db.execute(
                "UPDATE deliveries SET lease_expires_at=? WHERE state='pending' AND "
                "destination=? AND lease_owner=?",
                (db.now() + lease_seconds, destination, owner)).rowcount)

    def release(self, owner: str, destination: str | None = None) -> int:
        """End the leases ``owner`` holds (on one destination's deliveries, or all): what
        it did not send is anyone's to claim again. Returns how many were released."""
        sql = "UPDATE deliveries SET lease_owner=NULL, lease_expires_at=NULL WHERE " \
              "state='pending' AND lease_owner=?"
        args: tuple = (owner,)
        if destination is not None:
            sql, args = sql + " AND destination=?", (owner, destination)
        with self.spool.transaction() as db:
            return int(db.execute(sql, args).rowcount)

    def next_attempt_at(self, destination: str) -> float | None:
        """When the next pending delivery to ``destination`` can be claimed (its attempt
        is due and no lease holds it; None: none pending)."""
        rows = self.spool.query(
            "SELECT MIN(CASE WHEN lease_expires_at > next_attempt_at THEN lease_expires_at "
            "ELSE next_attempt_at END) FROM deliveries WHERE state='pending' AND "
            "destination=?",
            (destination,),
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    def deliveries(self, *, result_set_id: int | None = None,
                   state: str | None = None) -> list[Delivery]:
        where: list[str] = []
        args: list[int | str] = []
        if result_set_id is not None:
            where.append("d.result_set_id=?")
            args.append(result_set_id)
        if state is not None:
            where.append("d.state=?")
            args.append(state)
        sql = _DELIVERY_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        return [_delivery(r) for r in self.spool.query(sql + " ORDER BY d.delivery_id",
                                                       tuple(args))]

    # -- outcomes ----------------------------------------------------------------------

    def mark_sent(self, delivery: Delivery, at: float | None = None,
                  owner: str | None = None) -> bool:
        """Record the peer's acknowledgement; True when that completed the result set's
        delivery to this destination.

        The outcomes (this, :meth:`mark_retry`, :meth:`mark_dead`) given ``owner`` are
        recorded only while the delivery is still ``owner``'s claim."""
        fence, args = _fence(owner)
        with self.spool.transaction() as db:
            updated = db.execute(
                "UPDATE deliveries SET state='sent', sent_at=?, attempts=attempts+1, "
                "last_error=NULL, lease_owner=NULL, lease_expires_at=NULL "
                "WHERE delivery_id=? AND state='pending'" + fence,
                (db.now() if at is None else at, delivery.delivery_id, *args),
            ).rowcount
            if updated == 0:  # taken over or already recorded: this call completed nothing
                return False
            left = db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE result_set_id=? AND destination=? "
                "AND state='pending'",
                (delivery.result_set_id, delivery.destination),
            ).fetchone()[0]
        return left == 0

    def mark_retry(self, delivery: Delivery, error: str, next_attempt_at: float,
                   owner: str | None = None) -> None:
        fence, args = _fence(owner)
        with self.spool.transaction() as db:
            db.execute(
                "UPDATE deliveries SET attempts=attempts+1, last_error=?, next_attempt_at=?, "
                "lease_owner=NULL, lease_expires_at=NULL WHERE delivery_id=? AND "
                "state='pending'" + fence,
                (error[:500], next_attempt_at, delivery.delivery_id, *args),
            )

    def mark_dead(self, delivery: Delivery, reason: str, owner: str | None = None) -> None:
        fence, args = _fence(owner)
        with self.spool.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state='dead', attempts=attempts+1, last_error=?, "
                "lease_owner=NULL, lease_expires_at=NULL WHERE delivery_id=? AND "
                "state='pending'" + fence,
                (reason[:500], delivery.delivery_id, *args),
            )

    def retry_dead(self, destination: str | None = None) -> int:
        """Re-queue dead letters (all, or one destination's) for an attempt now."""
        sql = "UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=?, " \
              "created_at=? WHERE state='dead'"
        with self.spool.transaction() as db:
            now = db.now()
            args: tuple = (now, now)
            if destination is not None:
                sql, args = sql + " AND destination=?", (*args, destination)
            return int(db.execute(sql, args).rowcount)

    # -- reporting ---------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries per destination and state."""
        out: dict[str, dict[str, int]] = {}
        for destination, state, count in self.spool.query(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"
        ):
            out.setdefault(destination, {})[state] = count
        return out

    def backlog(self) -> dict[str, Backlog]:
        """Per destination with anything pending or dead: the counts, and when the oldest
        pending object was recorded (what metrics and readiness look at)."""
        out: dict[str, Backlog] = {}
        for destination, state, count, oldest in self.spool.query(
            "SELECT destination, state, COUNT(*), MIN(created_at) FROM deliveries "
            "WHERE state IN ('pending', 'dead') GROUP BY destination, state"
        ):
            entry = out.setdefault(destination, Backlog())
            if state == "pending":
                entry.pending, entry.oldest_pending_at = count, oldest
            else:
                entry.dead = count
        return out

    def result_set_counts(self, result_set_id: int) -> dict[str, int]:
        """A result set's deliveries by state."""
        return dict(self.spool.query(
            "SELECT state, COUNT(*) FROM deliveries WHERE result_set_id=? GROUP BY state",
            (result_set_id,),
        ))

    def deliveries_of(self, study: str, series: str, generation: int) -> int:
        """Deliveries recorded for one generation of a series (0: nobody takes them)."""
        rows = self.spool.query(
            "SELECT COUNT(*) FROM deliveries d JOIN result_sets r "
            "ON r.result_set_id = d.result_set_id WHERE r.study_instance_uid=? AND "
            "r.series_instance_uid=? AND r.generation=? AND d.state != 'superseded'",
            (study, series, generation),
        )
        return int(rows[0][0])
