"""From one analysis to the objects a radiologist finds in the study: SEG, SCs, SR, KOS.

``build_results`` encodes; ``ResultSet.write`` stores them as ``seg/``, ``sc/``, ``sr/``,
``ko/`` with
the SOP Instance UID as file name, each through a temporary file renamed into place, so a
reader (the sender) never sees half a file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dcn_node.config import ResultsSettings
from dcn_node.ops.memory import trim
from dcn_node.results.ko import build_key_images
from dcn_node.results.sc import build_overlays, key_slices
from dcn_node.results.seg import build_segmentation
from dcn_node.results.sr import build_report
from dcn_node.volume import Volume

if TYPE_CHECKING:
    from dcn_node.inference.engine import AnalysisResult

LOGGER = logging.getLogger(__name__)

#: The object kinds, also the names of the folders they are written to.
KINDS = ("seg", "sc", "sr", "ko")


@dataclass
class ResultSet:
    """The result objects of one analysis, by kind (an empty list when a kind is off)."""

    seg: list[Dataset] = field(default_factory=list)
    sc: list[Dataset] = field(default_factory=list)
    sr: list[Dataset] = field(default_factory=list)
    ko: list[Dataset] = field(default_factory=list)

    def by_kind(self) -> dict[str, list[Dataset]]:
        return {"seg": self.seg, "sc": self.sc, "sr": self.sr, "ko": self.ko}

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``out_dir/<kind>/<SOPInstanceUID>.dcm`` for every object, atomically.

        Returns the paths written, SEG first, then SCs, SRs and the KOS. An existing file of the
        same name (an earlier run of the same model on the same series) is replaced.

        Raises
        ------
        OSError
            If a file cannot be written; files already renamed into place stay.
        """
        paths = []
        for kind, datasets in self.by_kind().items():
            if not datasets:
                continue
            folder = Path(out_dir) / kind
            folder.mkdir(parents=True, exist_ok=True)
            for ds in datasets:
                paths.append(_write_atomically(ds, folder / f"{ds.SOPInstanceUID}.dcm"))
        return paths


def _write_atomically(ds: Dataset, target: Path) -> Path:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            dcmwrite(stream, ds, enforce_file_format=True)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def build_results(volume: Volume, result: AnalysisResult, settings: ResultsSettings
                  ) -> ResultSet:
    """Encode ``result`` as the configured DICOM objects, each valid once built.

    The SEG is built first: the SR ties its volumes to the SEG's segments.

    Raises
    ------
    dcn_node.results.seg.ResultEncodingError
        If the result does not match the volume.
    ValueError
        If highdicom rejects an input (a source header it cannot use).
    """
    results = ResultSet()
    seg = build_segmentation(volume, result, settings) if settings.seg.enabled else None
    if seg is not None:
        results.seg.append(seg)
    trim()  # highdicom's frame by frame encoding leaves the heap fragmented
    # The key slices, chosen once for the overlays and the KOS; head first, as slices are
    # usually read (slice 0 is the lowest along the normal).
    shown = sorted(key_slices(result, settings.sc, volume.slice_offsets), reverse=True) \
        if settings.sc.enabled or settings.ko.enabled else []
    if settings.sc.enabled:
        results.sc.extend(build_overlays(volume, result, settings, shown))
    if settings.sr.enabled:
        results.sr.append(build_report(volume, result, settings, seg))
        trim()
    if settings.ko.enabled:  # after the SCs, which it names among the key images
        results.ko.append(build_key_images(volume, result, settings, shown, results.sc))
    LOGGER.info("Series %s: %d SEG, %d SC, %d SR, %d KOS built", volume.series_instance_uid,
                len(results.seg), len(results.sc), len(results.sr), len(results.ko))
    return results
