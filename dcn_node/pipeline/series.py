"""Series assembly: when a series is complete, whether it is a CT we can read, whether to run it.

DICOM has no "series complete" signal. A series is complete when

* no instance arrived for ``completion.quiet_seconds`` (what Orthanc, mercure and MONAI's
  Informatics Gateway do), or earlier
* when the number received equals the count the scanner announced (ImagesInAcquisition,
  or NumberOfFrames of a lone Enhanced CT instance) and the slice positions are contiguous.

A complete series is then validated (CT, axial, one geometry, enough slices, no duplicates,
no gaps, not a localizer), checked against the selection rules, and queued for the model.
A late arrival reopens the series (see :mod:`dcn_node.store.spool`), which then completes again
after the quiet period (the announced count is reached already by the earlier instances, so
it cannot tell that a re-send is over).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from dcn_node.config import CompletionSettings, SelectionSettings
from dcn_node.store.lease import default_node_id
from dcn_node.store.spool import SeriesRecord, Spool, StoredInstance

LOGGER = logging.getLogger(__name__)

_LOCALIZER_WORDS = re.compile(r"\b(localizer|localiser|scout|topogram|scanogram|surview)\b", re.I)


@dataclass(frozen=True)
class Assessment:
    """The outcome of assessing a complete series: its new state and the reason."""

    state: str  # "queued", "ignored" or "rejected"
    reason: str | None
    #: Short fixed name of the reason (a metrics label, see metrics.BAD_INPUT_REASONS).
    code: str | None = None


@dataclass(frozen=True)
class SliceGeometry:
    """Slices of a series ordered along the slice normal."""

    #: Position of each slice along the normal, ascending.
    offsets: np.ndarray
    normal: np.ndarray


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    return normal / (np.linalg.norm(normal) or 1.0)


def _frames(instances: list[StoredInstance]) -> list[tuple[float, float, float]]:
    return [p for i in instances for p in i.header.positions]


def _expected_count(instances: list[StoredInstance]) -> int | None:
    """The number of frames the data announces, when every instance announces the same."""
    announced = {i.header.announced_frames for i in instances}
    return announced.pop() if len(announced) == 1 else None


def _offsets_along_normal(instances: list[StoredInstance]) -> np.ndarray | None:
    orientation = instances[0].header.image_orientation
    positions = _frames(instances)
    if orientation is None or not positions:
        return None
    return np.sort(np.asarray(positions) @ slice_normal(orientation))


def _largest_gap_problem(offsets: np.ndarray, max_gap_factor: float) -> str | None:
    if len(offsets) < 3:
        return None
    steps = np.diff(offsets)
    typical = float(np.median(steps))
    if typical <= 0:
        return None
    worst = int(np.argmax(steps))
    if steps[worst] > max_gap_factor * typical:
        return (
            f"gap of {steps[worst]:.2f} mm between slices {worst + 1} and {worst + 2} "
            f"(typical spacing {typical:.2f} mm)"
        )
    return None


def is_contiguous(instances: list[StoredInstance], settings: CompletionSettings) -> bool:
    """True when positions are unique and have no gap (early-completion check)."""
    offsets = _offsets_along_normal(instances)
    if offsets is None:
        return False
    if len(offsets) > 1 and np.min(np.diff(offsets)) < settings.duplicate_tolerance_mm:
        return False
    return _largest_gap_problem(offsets, settings.max_gap_factor) is None


def _is_localizer(instances: list[StoredInstance]) -> bool:
    first = instances[0].header
    return "LOCALIZER" in first.image_type or bool(
        _LOCALIZER_WORDS.search(first.series_description)
    )


def validate(instances: list[StoredInstance], settings: CompletionSettings) -> Assessment | None:
    """Check a complete series is an axial CT volume the model can read.

    Returns ``None`` when valid, else an :class:`Assessment` (``ignored`` for localizers
    and non-CT data, ``rejected`` for CT series the node cannot use), with the reason.
    """
    headers = [i.header for i in instances]
    if _is_localizer(instances):
        return Assessment("ignored", "localizer/scout series", "localizer")
    modalities = {h.modality for h in headers}
    if modalities != {"CT"}:
        return Assessment(
            "ignored", f"modality {'/'.join(sorted(modalities)) or 'missing'}, not CT", "not_ct"
        )
    for name, values in (
        ("Rows/Columns", {(h.rows, h.columns) for h in headers}),
        ("PixelSpacing", {h.pixel_spacing for h in headers}),
        ("ImageOrientationPatient", {h.image_orientation for h in headers}),
        ("FrameOfReferenceUID", {h.frame_of_reference_uid for h in headers}),
    ):
        if len(values) > 1:
            return Assessment("rejected", f"mixed {name} within the series ({len(values)} values)",
                              "mixed_geometry")
        if None in values or "" in values:
            return Assessment("rejected", f"{name} missing", "missing_geometry")
    orientation = headers[0].image_orientation
    assert orientation is not None  # checked above
    normal = slice_normal(orientation)
    if abs(normal[2]) < 1.0 - settings.axial_tolerance:
        return Assessment("rejected", "not axial (slice normal is not along the patient z axis)",
                          "not_axial")
    positions = _frames(instances)
    frame_total = sum(h.number_of_frames for h in headers)
    if len(positions) != frame_total:
        return Assessment("rejected", "ImagePositionPatient missing on some slices",
                          "missing_position")
    if frame_total < settings.min_slices:
        return Assessment(
            "rejected",
            f"{frame_total} slices, fewer than completion.min_slices ({settings.min_slices})",
            "too_few_slices",
        )
    offsets = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(offsets)
    duplicates = int(np.sum(steps < settings.duplicate_tolerance_mm))
    if duplicates:
        acquisitions = {h.acquisition_number for h in headers}
        if len(acquisitions) > 1:
            return Assessment(
                "rejected",
                f"series holds {len(acquisitions)} acquisitions over the same positions "
                "(AcquisitionNumber differs); send them as separate series",
                "two_acquisitions",
            )
        return Assessment("rejected", f"{duplicates} duplicate slice position(s)",
                          "duplicate_positions")
    if (gap := _largest_gap_problem(offsets, settings.max_gap_factor)) is not None:
        return Assessment("rejected", gap, "gap")
    return None


def select(instances: list[StoredInstance], settings: SelectionSettings) -> str | None:
    """Apply the selection rules to a valid series; returns why it is not selected, or None."""
    first = instances[0].header
    body_part = first.body_part_examined.strip().upper()
    allowed = {b.upper() for b in settings.body_parts}
    if allowed:
        if not body_part and not settings.allow_missing_body_part:
            return "BodyPartExamined missing (selection.allow_missing_body_part is false)"
        if body_part and body_part not in allowed:
            return f"BodyPartExamined {body_part} not in selection.body_parts"
    description = first.series_description
    include = settings.series_description_include
    if include and not re.search(include, description, re.I):
        return "SeriesDescription does not match selection.series_description_include"
    exclude = settings.series_description_exclude
    if exclude and re.search(exclude, description, re.I):
        return "SeriesDescription matches selection.series_description_exclude"
    thicknesses = Counter(h.header.slice_thickness for h in instances)
    thickness = thicknesses.most_common(1)[0][0]
    bounds = settings.slice_thickness_mm
    if thickness is not None and not bounds.min <= thickness <= bounds.max:
        return f"SliceThickness {thickness:g} mm outside selection.slice_thickness_mm"
    return None


class SeriesAssembler:
    """Decides completion of the series being received; run periodically by the scheduler.

    Parameters
    ----------
    spool:
        The index of received instances and series.
    completion, selection:
        The ``completion`` and ``selection`` config sections.
    owner, lease_seconds:
        The node's name on the series it assesses (default: :func:`default_node_id`), and
        how long such a claim holds (None: until decided or the node restarts; one node).
        A series is assessed by one node at a time: the others pass it over.
    """

    def __init__(
        self, spool: Spool, completion: CompletionSettings, selection: SelectionSettings,
        *, owner: str | None = None, lease_seconds: float | None = None,
    ) -> None:
        self.spool = spool
        self.completion = completion
        self.selection = selection
        self.owner = owner or default_node_id()
        self.lease_seconds = lease_seconds

    def check(self, now: float | None = None) -> list[tuple[SeriesRecord, Assessment]]:
        """Assess every series that is complete now; return what was decided.

        ``now`` defaults to the store's time, whose clock stamped the arrivals (the
        database's in cluster mode: a host with a skewed clock completes on time).
        """
        now = self.spool.now() if now is None else now
        decided = []
        for record in self.spool.series_to_assess(now):
            quiet = now - record.quiet_since >= self.completion.quiet_seconds
            if not quiet and record.generation > 0:
                # Reopened: the earlier instances already reach the announced count, so
                # only the quiet period tells when a re-send or late arrivals are over.
                continue
            if not quiet and record.frames != record.announced_frames:
                continue  # cheap test from the index; headers are loaded only when it may be done
            instances = None
            if not quiet:
                instances = self._load(record)
                if not instances or not self._announced_and_contiguous(instances):
                    continue
            if not self.spool.claim_assessment(record, self.owner, self.lease_seconds):
                continue  # an instance arrived since, or another node is assessing it
            instances = self._load(record) if instances is None else instances
            if not instances:
                self.spool.release_assessment(record, self.owner)
                continue
            how = "quiet period" if quiet else "announced count reached"
            try:
                assessment = self.assess(instances)
            except Exception:  # not left held: the next check assesses it again
                self.spool.release_assessment(record, self.owner)
                raise
            applied = self.spool.close_series(
                record, assessment.state, assessment.reason,
                enqueue=assessment.state == "queued", owner=self.owner,
            )
            if not applied:
                continue  # an instance arrived meanwhile (or the claim was taken over)
            decided.append((record, assessment))
            LOGGER.info(
                "Series %s complete (%s, %d instances, generation %d): %s%s",
                record.series_instance_uid,
                how,
                len(instances),
                record.generation,
                assessment.state,
                f" ({assessment.reason})" if assessment.reason else "",
            )
        return decided

    def _load(self, record: SeriesRecord) -> list[StoredInstance]:
        return self.spool.series_instances(record.study_instance_uid,
                                           record.series_instance_uid)

    def _announced_and_contiguous(self, instances: list[StoredInstance]) -> bool:
        expected = _expected_count(instances)
        received = sum(i.header.number_of_frames for i in instances)
        return (
            expected is not None
            and received == expected
            and is_contiguous(instances, self.completion)
        )

    def assess(self, instances: list[StoredInstance]) -> Assessment:
        """Validate then select a complete series."""
        problem = validate(instances, self.completion)
        if problem is not None:
            return problem
        unselected = select(instances, self.selection)
        if unselected is not None:
            return Assessment("ignored", f"not selected: {unselected}", "not_selected")
        return Assessment("queued", None)
