"""Key images: a Key Object Selection document (KOS), as IHE AI Results asks of an AI result.

It points at the CT slices the overlays show (the largest lesions, the strongest heat map:
``sc.key_slices``, chosen once by the builder) and at the overlay images themselves, titled
"Best In Set" (DCM 113013), with the algorithm as the device observer. A viewer that shows
key images jumps to them; a PACS worklist can flag the study. Built with highdicom's ``ko`` package.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dcn_node.config import ResultsSettings
from dcn_node.results import common
from dcn_node.volume import Volume

if TYPE_CHECKING:
    from dcn_node.inference.engine import AnalysisResult

LOGGER = logging.getLogger(__name__)


def build_key_images(volume: Volume, result: AnalysisResult, settings: ResultsSettings,
                     indices: list[int], overlays: list[Dataset]
                     ) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS of ``result``: the key CT slices ``indices`` (head first) and the
    ``overlays``."""
    version = result.model_version
    key_ct: dict[str, Dataset] = {}
    for index in indices:  # a multi-frame source is one instance: named once
        key_ct.setdefault(volume.sop_instance_uids[index], volume.source_datasets[index])
    referenced = [*key_ct.values(), *overlays]
    # highdicom copies patient and study from the first: give it the completed header.
    referenced[0] = common.source_header(volume, indices[0])
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.BestInSet,
        referenced_objects=referenced,
        observer_device_context=common.device_observer(settings, version),
        description=f"Key slices of the AI result ({common.NOT_FOR_DIAGNOSIS}): " + (
            "not assessable, the slice with the most lung" if result.lesions_withheld
            else "largest lesions and strongest heat map"),
    )
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=common.result_uid(settings, volume, version, "ko-series"),
        series_number=settings.ko.series_number,
        sop_instance_uid=common.result_uid(settings, volume, version, "ko"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name,
        contributing_equipment=common.contributing_equipment(settings, version),
        specific_character_set=common.character_sets(volume)[1],
    )
    document.SeriesDescription = settings.ko.series_description
    common.finish(document, settings, volume)
    LOGGER.info("KOS %s for series %s: %d key CT image(s), %d overlay(s)",
                document.SOPInstanceUID, volume.series_instance_uid, len(key_ct),
                len(overlays))
    return document
