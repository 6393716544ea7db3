"""One summary log line per series, whatever became of it.

Emitted once per series generation when its path through the node ends: ``ignored`` or
``rejected`` at completion, ``failed`` (model or encoding), ``processed`` (results recorded
and no destination takes them), ``delivered`` (every object acknowledged),
``partly_delivered`` or ``undelivered`` (some or all objects are dead letters). The human
format reads as a sentence; the JSON format carries the same facts as fields
(``event: series_summary``). UIDs, counts, the model's output and timings only: never
patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dcn_node.store.spool import Spool

# The summary lines are an interface (docs/operations.md): the logger keeps its name.
LOGGER = logging.getLogger("dcn_node.summary")

#: ``outcome`` values of the summary line.
SUMMARY_OUTCOMES = ("ignored", "rejected", "failed", "processed", "delivered",
                    "partly_delivered", "undelivered")


def build_summary(
    spool: Spool, study: str, series: str, generation: int, outcome: str, *,
    reason: str | None = None, results: dict[str, int] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The facts of one series generation's summary line.

    ``results`` counts the result objects by delivery state (``sent``, ``dead``);
    ``seconds`` runs from the series' last instance received to ``now``.
    """
    if outcome not in SUMMARY_OUTCOMES:
        raise ValueError(f"unknown summary outcome {outcome!r}")
    now = spool.now() if now is None else now  # the clock that stamped the arrivals
    record = spool.get_series(study, series)
    summary: dict[str, Any] = {
        "event": "series_summary",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "generation": generation,
        "outcome": outcome,
    }
    if reason:
        summary["reason"] = reason
    if record is not None:
        summary["instances"] = record.instances
        summary["seconds"] = round(max(0.0, now - record.last_received_at), 3)
    analysis = spool.results_dir_for(series, generation) / "summary.json"
    if analysis.exists():
        try:
            data = json.loads(analysis.read_text())
            summary.update({key: data[key] for key in ("probability", "positive",
                                                       "model_version") if key in data})
            if data.get("assessable") is False:
                summary["not_assessable_reason"] = data.get("not_assessable_reason")
        except (OSError, ValueError) as exc:
            LOGGER.debug("Cannot read %s: %s", analysis, exc)
    if results is not None:
        summary["results"] = dict(results)
    events = spool.timeline(study, series)
    events = [e for e in events if e[0] == generation or e[1] == "first_received"]
    if events:
        start = events[0][2]
        summary["steps"] = [
            {"event": event, "seconds": round(at - start, 3)}
            for _, event, at, _ in events if event != "acknowledged"
        ]
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The summary as one human sentence."""
    parts = [f"Series {summary['series_instance_uid']} {summary['outcome'].replace('_', ' ')}"]
    if summary["generation"]:
        parts[0] += f" (generation {summary['generation']})"
    details = []
    if "reason" in summary:
        details.append(summary["reason"])
    if "not_assessable_reason" in summary:
        details.append(f"not assessable ({summary['not_assessable_reason']})")
    elif summary.get("probability") is not None:
        verdict = "positive" if summary.get("positive") else "negative"
        details.append(f"probability {summary['probability']:.3f} ({verdict})")
    if "results" in summary:
        counts = summary["results"]
        details.append(", ".join(f"{count} {state}" for state, count in counts.items())
                       + " result objects")
    if "instances" in summary:
        details.append(f"{summary['instances']} instances")
    if "seconds" in summary:
        details.append(f"{summary['seconds']:.1f} s after the last instance")
    return parts[0] + (": " + "; ".join(details) if details else "")


def log_summary(summary: dict[str, Any]) -> None:
    """Log the line: the sentence as the message, the facts as ``fields`` (JSON format)."""
    LOGGER.info("%s", describe(summary), extra={"fields": summary})
