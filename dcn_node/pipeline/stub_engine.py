"""A stand-in for the model, for tests and benchmarks only (``inference.stub_seconds``).

It sleeps instead of computing, so that timing-controlled tests (a worker killed while it
"analyses") and the scaling benchmark (bench/scale.py: how the system around the model
scales with workers) do not depend on the CPU the networks would need. Its output goes
through the real encoder: a lung mask from a plain HU threshold, no lesion, probability 0,
model version ``sleep-stub``. Never point a node running it at a real PACS.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dcn_node.inference.engine import AnalysisResult
    from dcn_node.volume import Volume

LOGGER = logging.getLogger(__name__)

STUB_MODEL_VERSION = "sleep-stub"


class SleepStubEngine:
    """Sleeps ``seconds`` per series; the result has the shape of a real analysis."""

    model_version = STUB_MODEL_VERSION
    device = "none"

    def __init__(self, seconds: float) -> None:
        import dcn_node.inference.engine  # noqa: F401  (torch: loaded with the "model")

        self.seconds = seconds
        LOGGER.warning("inference.stub_seconds is set: no model runs, each series sleeps "
                       "%.1f s and reports nothing found (tests and benchmarks only)",
                       seconds)

    def analyze(self, volume: Volume) -> AnalysisResult:
        from dcn_node.inference.engine import AnalysisResult

        started = time.perf_counter()
        time.sleep(self.seconds)
        hu = np.asarray(volume.hu)
        masks = np.zeros((*hu.shape, 2), bool)
        masks[..., 1] = (hu > -950) & (hu < -400)  # air-filled tissue: a crude lung mask
        return AnalysisResult(
            lung=masks[..., 1], lesion=masks[..., 0],
            slice_probabilities=np.zeros(hu.shape[0], np.float32), attention=[],
            probability=0.0, positive=False, model_version=STUB_MODEL_VERSION,
            seconds=time.perf_counter() - started, timings={"dcn": self.seconds})
