"""The job queue in the index: one job per series generation, claimed by model workers.

:class:`JobQueue` is a part of :class:`~dcn_node.store.spool.Spool` (its jobs, in the same
index and transactions). A job is claimed (``claims`` counts the claims) under an
optional lease in its claimer's name; only its latest claim can finish it, and a series
only at the job's generation. Claimers on PostgreSQL pass over each other's rows
(``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dcn_node.store.database import Transaction

if TYPE_CHECKING:
    from dcn_node.store.schema import Dialect

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    generation: int
    state: str
    reason: str | None
    #: Which claim of the job this is (1 the first, 0: not from a claim). Only the job's
    #: latest claim can finish it: a worker whose lease ran out and whose job was claimed
    #: again cannot record an outcome.
    claim: int = 0


_JOB_COLUMNS = ("job_id, study_instance_uid, series_instance_uid, generation, state, reason, "
                "claims")


class JobQueue:
    """The jobs methods of the spool (needs its index: ``_transaction``, ``query``,
    ``now`` and ``dialect``)."""

    dialect: Dialect
    _transaction: Callable[[], AbstractContextManager[Transaction]]

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def list_jobs(self, state: str | None = None) -> list[Job]:
        query = f"SELECT {_JOB_COLUMNS} FROM jobs"
        args: tuple = ()
        if state is not None:
            query, args = query + " WHERE state = ?", (state,)
        return [Job(*r) for r in self.query(query + " ORDER BY job_id", args)]

    def count_jobs(self, state: str) -> int:
        """Jobs in ``state`` (backpressure and queue gauges ask on every association and
        scrape: a count, not the rows)."""
        return int(self.query("SELECT COUNT(*) FROM jobs WHERE state=?", (state,))[0][0])

    def claim_next_job(self, owner: str | None = None,
                       lease_seconds: float | None = None) -> Job | None:
        """Take the oldest queued job: job and series become ``processing``.

        With ``lease_seconds`` the claim is a lease held by ``owner``: when it runs out
        (:meth:`renew_lease` extends it), the job may be claimed again, by any node, and
        this claim can no longer finish it. Without, the job is held until it finishes or
        the node recovers (one node). Claimers on PostgreSQL pass over each other's rows
        (``FOR UPDATE SKIP LOCKED``): two never take the same job.
        """
        with self._transaction() as db:
            now = db.now()
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state='queued' OR (state='processing' "
                "AND lease_expires_at <= ?) ORDER BY job_id LIMIT 1" + self.dialect.skip_locked,
                (now,),
            ).fetchone()
            return None if row is None else _take(db, Job(*row), owner, lease_seconds, now)

    def claim_job(self, job_id: int, owner: str | None = None,
                  lease_seconds: float | None = None) -> Job | None:
        """Take one job by its id (a broker's task names it), as :meth:`claim_next_job`
        takes the oldest: only while it is queued, or processing under a lease that ran
        out. None: it is finished, unknown, or another claim holds it (a duplicate or
        redelivered task; the store's row decides, not the message)."""
        with self._transaction() as db:
            now = db.now()
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id=? AND (state='queued' OR "
                "(state='processing' AND lease_expires_at <= ?))" + self.dialect.skip_locked,
                (job_id, now),
            ).fetchone()
            return None if row is None else _take(db, Job(*row), owner, lease_seconds, now)

    def release_jobs(self, owner: str) -> int:
        """Give back the jobs ``owner`` holds (a worker restarted under the same
        ``node.id``: its claims were cut short); returns how many. They are queued again,
        and their claim count fences whatever the old claim might still try to record."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET state='queued', lease_owner=NULL, lease_expires_at=NULL, "
                "updated_at=? WHERE state='processing' AND lease_owner=?",
                (db.now(), owner)).rowcount

    def unclaimed_jobs(self, limit: int = 1000) -> list[Job]:
        """Jobs a worker could claim now, oldest first: queued, or processing under a
        lease that ran out (``claim`` is the job's claim count so far)."""
        now = self.now()
        return [Job(*r) for r in self.query(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state='queued' OR (state='processing' "
            f"AND lease_expires_at <= ?) ORDER BY job_id LIMIT {int(limit)}", (now,))]

    def renew_lease(self, job: Job, lease_seconds: float) -> bool:
        """Extend the lease of a claimed job from now; False when the claim is no longer
        the job's (it ran out and the job was claimed again, or it finished)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET lease_expires_at=? WHERE job_id=? AND claims=? AND "
                "state='processing'",
                (db.now() + lease_seconds, job.job_id, job.claim),
            ).rowcount == 1

    def finish_job(self, job: Job, state: str, reason: str | None = None) -> bool:
        """Record a job's outcome (``done`` or ``failed``) on the job and, unless a late
        arrival reopened it meanwhile, on its series.

        Fenced: a job from a claim (``job.claim`` > 0) is finished only while that claim is
        the job's latest, and a series only at the job's generation, so a stale claim
        never marks a newer claim's or generation's work. Returns whether the job's
        outcome was recorded.
        """
        with self._transaction() as db:
            return self.finish_in(db, job, state, reason)

    def finish_in(self, db: Transaction, job: Job, state: str, reason: str | None = None
                  ) -> bool:
        """:meth:`finish_job` within the transaction ``db`` (the outbox records a result
        set and finishes its job in one)."""
        if state not in ("done", "failed"):
            raise ValueError(f"a job finishes done or failed, not {state!r}")
        fence, args = ("", ()) if job.claim == 0 else (" AND claims=?", (job.claim,))
        now = db.now()
        if db.execute("UPDATE jobs SET state=?, reason=?, lease_owner=NULL, "
                      "lease_expires_at=NULL, updated_at=? WHERE job_id=?" + fence,
                      (state, reason, now, job.job_id, *args)).rowcount != 1:
            LOGGER.warning("Job %d of series %s (claim %d) was claimed again since; its "
                           "outcome %s is not recorded", job.job_id,
                           job.series_instance_uid, job.claim, state)
            return False
        db.execute(
            "UPDATE series SET state=?, reason=?, updated_at=? WHERE study_instance_uid=? "
            "AND series_instance_uid=? AND generation=? AND state='processing'",
            (state, reason, now, job.study_instance_uid, job.series_instance_uid,
             job.generation),
        )
        return True


def _take(db: Transaction, job: Job, owner: str | None, lease_seconds: float | None,
          now: float) -> Job:
    """Inside a claimer's transaction: ``job`` and its series become ``processing`` under
    a new claim (its number fences what the claim may record later)."""
    claim = db.execute(
        "UPDATE jobs SET state='processing', claims=claims+1, lease_owner=?, "
        "lease_expires_at=?, updated_at=? WHERE job_id=? RETURNING claims",
        (owner, None if lease_seconds is None else now + lease_seconds, now, job.job_id),
    ).fetchone()[0]
    db.execute(
        "UPDATE series SET state='processing', updated_at=? WHERE study_instance_uid=? "
        "AND series_instance_uid=? AND generation=? AND state IN ('queued', 'processing')",
        (now, job.study_instance_uid, job.series_instance_uid, job.generation),
    )
    return Job(job.job_id, job.study_instance_uid, job.series_instance_uid, job.generation,
               "processing", None, int(claim))
