"""What one analysis leaves on disk: ``summary.json`` and ``masks.npz``.

Written by ``dcn-node analyze`` and by the node's model worker alike; scripts outside the
project rely on these names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dcn_node.inference.engine import AnalysisResult
from dcn_node.volume import Volume


def summarize(volume: Volume, result: AnalysisResult) -> dict[str, Any]:
    """The summary of one analysis, volumes in millilitres."""
    voxel_ml = volume.voxel_volume_ml
    lung_ml = float(result.lung.sum() * voxel_ml)
    lesion_ml = float(result.lesion.sum() * voxel_ml)
    quality = result.quality.as_dict() if result.quality is not None else None
    return {
        "series_instance_uid": volume.series_instance_uid,
        "study_instance_uid": volume.study_instance_uid,
        # Not assessable (the quality gate): no probability, no verdict, the reason instead.
        "assessable": result.assessable,
        "not_assessable_reason": None if result.assessable or quality is None
        else quality["reason"],
        "probability": round(result.probability, 6) if result.assessable else None,
        "positive": bool(result.positive) if result.assessable else None,
        "threshold": result.threshold,
        # What the pattern mapping weighed (its features), when the model uses it.
        "pattern_features": ({k: round(v, 4) for k, v in result.pattern_features.items()}
                             if result.pattern_features is not None else None),
        "quality_gate": quality,
        # Not assessable, lesions withheld (quality_gate.report_lesions_when_not_assessable):
        # no lesion figures rather than a zero that reads as "no lesions".
        "lesions_withheld": result.lesions_withheld,
        "lesion_volume_ml": None if result.lesions_withheld else round(lesion_ml, 2),
        "lung_volume_ml": round(lung_ml, 2),
        "involvement_percent": None if result.lesions_withheld
        else round(100.0 * lesion_ml / lung_ml, 3) if lung_ml else 0.0,
        "slices": int(volume.hu.shape[0]),
        "seconds": round(result.seconds, 3),
        "model_version": result.model_version,
        "note": "research use only, not for diagnostic use",
    }


def write_analysis(out_dir: Path, volume: Volume, result: AnalysisResult) -> dict[str, Any]:
    """Write ``summary.json`` and ``masks.npz`` (``lesion``, ``lung`` as (slices, rows,
    columns) booleans, ``sop_instance_uids`` in the same slice order); returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(volume, result)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(
        out_dir / "masks.npz",
        lesion=result.lesion,
        lung=result.lung,
        sop_instance_uids=np.array(volume.sop_instance_uids),
    )
    return summary
